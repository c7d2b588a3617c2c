"""``align_pairs_by_expert`` in one Triton launch for decode-sized batches (the torch version is ~25 kernels).

One program walks the pairs in chunks of ``BLOCK_P``: a one-hot [pairs × experts] tile gives the per-expert
counts (pass 1) and, through an exclusive cumulative sum down the chunk, each pair's position among the
earlier pairs of its expert (pass 2), so the result equals the stable sort of ``kernels.routing`` exactly.
A single program is serial over chunks, so batches above ``MAX_PAIRS_ONE_PROGRAM`` pairs use the torch
version (there the GEMMs dwarf its launches).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_moe_compress.kernels.routing import ExpertBlocks, align_pairs_by_expert

MAX_PAIRS_ONE_PROGRAM = 1024
BLOCK_P = 64


@triton.jit
def _align_kernel(expert_ptr, num_pairs, num_experts, sorted_pair_ptr, num_slots, slot_of_pair_ptr,
                  block_expert_ptr, num_blocks,
                  BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, BLOCK_P: tl.constexpr):
    experts = tl.arange(0, E_PAD)
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        pairs = p0 + tl.arange(0, BLOCK_P)
        ids = tl.load(expert_ptr + pairs, mask=pairs < num_pairs, other=-1)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    run_start = padded_end - padded  # slot of each expert's first pair; advanced as pairs are placed

    for s0 in range(0, num_slots, BLOCK_P):  # every slot padding until a pair lands in it
        slots = s0 + tl.arange(0, BLOCK_P)
        tl.store(sorted_pair_ptr + slots, tl.full((BLOCK_P,), 0, tl.int32) + num_pairs, mask=slots < num_slots)
    tl.debug_barrier()
    for p0 in range(0, num_pairs, BLOCK_P):
        pairs = p0 + tl.arange(0, BLOCK_P)
        pair_ok = pairs < num_pairs
        ids = tl.load(expert_ptr + pairs, mask=pair_ok, other=-1)
        one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)
        earlier_same = tl.cumsum(one_hot, axis=0) - one_hot
        slot = tl.sum(one_hot * (run_start[None, :] + earlier_same), axis=1)
        tl.store(slot_of_pair_ptr + pairs, slot, mask=pair_ok)
        tl.store(sorted_pair_ptr + slot, pairs, mask=pair_ok)
        run_start += tl.sum(one_hot, axis=0)

    ends = tl.where(experts < num_experts, padded_end, 2**30)  # experts past E never own a block
    for b0 in range(0, num_blocks, BLOCK_P):
        blocks = b0 + tl.arange(0, BLOCK_P)
        owner = tl.sum((ends[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blocks, owner, mask=blocks < num_blocks)


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """``kernels.routing.align_pairs_by_expert``, in one launch when the batch is small enough."""
    num_pairs = topk_ids.numel()
    if num_pairs > MAX_PAIRS_ONE_PROGRAM:
        return align_pairs_by_expert(topk_ids, num_experts, block_m)
    max_blocks = -(-num_pairs // block_m) + min(num_experts, num_pairs)
    device = topk_ids.device
    sorted_pair = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    slot_of_pair = torch.empty(num_pairs, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    _align_kernel[(1,)](
        topk_ids.reshape(-1).to(torch.int32), num_pairs, num_experts, sorted_pair, sorted_pair.numel(), slot_of_pair,
        block_expert, max_blocks, BLOCK_M=block_m, E_PAD=triton.next_power_of_2(num_experts), BLOCK_P=BLOCK_P,
    )
    return ExpertBlocks(sorted_pair, slot_of_pair, block_expert, block_m, num_pairs)
