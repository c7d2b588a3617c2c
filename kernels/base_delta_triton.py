"""Triton path of the ``base_delta`` MoE (GPU): the packed layout of ``kernels/base_delta_torch.py``, fused.

The forward of D²-MoE §3.5 (docs/format.md §4) in six launches plus the device-side grouping of routed
pairs by expert (``kernels.routing_triton``: one more launch for decode-sized batches, torch ops above; no
host sync, so the whole forward can be captured in a CUDA graph):

1. ``token_gemm``:   ``B_gu x``                 base gate/up, once per token            → [T, 2C]
2. ``project_ranks``: ``V_gate,e x``, ``V_up,e x`` per routed pair, ragged ranks         → z  [slots, 2W]
3. ``expand_ranks``:  ``h = silu(U_gate,e z_g + S B_gate x) · (U_up,e z_u + S B_up x)``   → h  [slots, I]
4. ``project_ranks``: ``w · V_down,e h`` (routing weight folded in)                       → zd [slots, Wd]
5. ``expand_ranks``:  ``U_down,e zd`` per pair                                            → y  [pairs, H]
6. ``reduce_pairs``:  ``out_t = B_down (Σ_k w_tk h_tk[channels]) + Σ_k y_tk``: base down once per token on
   the routing-weighted sum (formed inside the GEMM's operand load), plus the top-k reduction; no atomics.

``S`` scatters the C base channels onto the I intermediate channels (``channel_slot``). Stages 4–5 are
skipped when every down rank is 0, stage 1 and the base part of 3 and 6 when the layer has no base (the
svd baselines). Dynamic base pruning (``num_dynamic_drop`` > 0, D²-MoE Eq. 9) needs the batch's column
norms of the weighted sum before the base down GEMM; it falls back to the torch path (host syncs: run such
a server with ``--enforce-eager``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_moe_compress.kernels import base_delta_torch
from vllm_moe_compress.kernels.lowrank_moe_triton import expand_ranks, project_ranks, reduce_pairs, token_gemm
from vllm_moe_compress.kernels.routing import block_size_for
from vllm_moe_compress.kernels.routing_triton import align_pairs


@dataclass(frozen=True)
class BaseDeltaLayout:
    """Per-layer metadata the kernels read, built once (from host lists, so no sync at serving time)."""

    starts: torch.Tensor
    """int32 [3, E]: first packed column/row of each (gate, up, down) × expert block (``rank_offsets``)."""
    ranks: torch.Tensor
    """int32 [3, E]."""
    gate_up_width: int
    """Widest gate or up rank: the width of each of the two segments of z."""
    down_width: int
    """Widest down rank."""
    channel_slot: torch.Tensor
    """int32 [I]: the base position of each intermediate channel, -1 where the base does not cover it."""
    base_channels: torch.Tensor
    """int32 [C]: the intermediate channel of each base position."""

    @classmethod
    def from_lists(cls, ranks: list[list[int]], channels: list[int], intermediate: int,
                   device: torch.device | str) -> BaseDeltaLayout:
        """``ranks`` [[gate]*E, [up]*E, [down]*E]; ``channels`` the base's intermediate channels."""
        rank_table = torch.tensor(ranks, dtype=torch.int64)
        channel_slot = torch.full((intermediate,), -1, dtype=torch.int32)
        channel_slot[torch.tensor(channels, dtype=torch.int64)] = torch.arange(len(channels), dtype=torch.int32)
        return cls(
            starts=torch.tensor(base_delta_torch.rank_offsets(rank_table), dtype=torch.int32, device=device),
            ranks=rank_table.to(device=device, dtype=torch.int32),
            gate_up_width=max(max(ranks[0]), max(ranks[1])),
            down_width=max(ranks[2]),
            channel_slot=channel_slot.to(device),
            base_channels=torch.tensor(channels, dtype=torch.int32, device=device),
        )

    @classmethod
    def from_tensors(cls, ranks: torch.Tensor, base_channels: torch.Tensor | None,
                     intermediate: int) -> BaseDeltaLayout:
        """The same from the op's tensors (reads them on the host once: build it before CUDA-graph capture)."""
        channels = base_channels.tolist() if base_channels is not None else []
        return cls.from_lists(ranks.tolist(), channels, intermediate, ranks.device)


def base_delta_moe(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, ranks: torch.Tensor,
    gate_up_u: torch.Tensor, gate_up_v: torch.Tensor, down_u: torch.Tensor, down_v: torch.Tensor,
    base_gate_up: torch.Tensor | None = None, base_down: torch.Tensor | None = None,
    base_channels: torch.Tensor | None = None, num_dynamic_drop: int = 0, layout: BaseDeltaLayout | None = None
) -> torch.Tensor:
    """Σ_k w_k · expert_{id_k}(x), same arguments and result as ``base_delta_torch.base_delta_moe``;
    ``layout`` (built once per layer) avoids reading ``ranks``/``base_channels`` on the host."""
    if num_dynamic_drop:
        return base_delta_torch.base_delta_moe(x, topk_ids, topk_weights, ranks, gate_up_u, gate_up_v, down_u, down_v,
                                               base_gate_up, base_down, base_channels, num_dynamic_drop)
    intermediate = gate_up_u.shape[0]
    if layout is None:
        layout = BaseDeltaLayout.from_tensors(ranks, base_channels, intermediate)
    x = x.contiguous()
    num_tokens, top_k = topk_ids.shape
    blocks = align_pairs(topk_ids, ranks.shape[1], block_size_for(topk_ids.numel(), ranks.shape[1]))
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    has_base = base_gate_up is not None and base_gate_up.numel() > 0
    base_gate_up_x = token_gemm(x, base_gate_up) if has_base else None

    gate_up = (layout.starts[:2], layout.ranks[:2], layout.gate_up_width)
    z = project_ranks(x, gate_up_v, *gate_up, blocks, top_k, a_rows_are_tokens=True)
    h = torch.empty(blocks.sorted_pair.numel(), intermediate, dtype=x.dtype, device=x.device)
    expand_ranks(z, gate_up_u, *gate_up, blocks, top_k, h, gated=True,
                 addend=base_gate_up_x, addend_col=layout.channel_slot)

    pair_outputs = None
    if layout.down_width:
        down = (layout.starts[2:], layout.ranks[2:], layout.down_width)
        z_down = project_ranks(h, down_v, *down, blocks, top_k, a_rows_are_tokens=False, weights=weights)
        pair_outputs = torch.empty(blocks.num_pairs, x.shape[1], dtype=x.dtype, device=x.device)
        expand_ranks(z_down, down_u, *down, blocks, top_k, pair_outputs, gated=False)

    base_down_used = base_down if has_base else x.new_empty(x.shape[1], 0)
    return reduce_pairs(torch.empty_like(x), pair_outputs, h, layout.base_channels[: base_down_used.shape[1]],
                        base_down_used, blocks, weights, top_k)
