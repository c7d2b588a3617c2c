"""Triton path of the ``sparse_lowrank`` MoE (RS-MoE, GPU): the packed layout of ``kernels/sparse_lowrank_torch.py``.

Expert e keeps ``s_e`` sparse units (gate/up rows and down columns stored dense) and ``m_e`` low-rank units
(rank-``k`` factors over them); a shared down base ``B`` [H, I] (optional) acts on the intermediate scattered
onto the I channels (RS-MoE §3.2–3.4, docs/format.md §9). Each routed pair's intermediate is stored per
*unit*, ``h[slot] = [h_S (s_e) | h_M (m_e)]`` (width ``U = max_e s_e + m_e``). With ``T`` tokens,
``P = T·top_k`` routed pairs grouped by expert into blocks (``kernels.routing_triton.align_pairs``, one launch
for decode-sized batches; no host sync, so the forward can be captured in a CUDA graph):

| stage | kernel | computes | reads | once per |
|---|---|---|---|---|
| 0 | ``align_pairs`` | pairs sorted by expert, padded to blocks of 16 or 64 slots | ``topk_ids`` | batch |
| 1 | ``project_ranks`` | ``z = [Vg,e x, Vu,e x]`` → [slots, 2W] | each routed expert's gate/up V, once per block | pair |
| 2 | ``_gate_up_units`` | ``h = silu(g) ⊙ u``, ``g = [G_S,e x; Ug,e z_g]``, ``u = [U_S,e x; Uu,e z_u]`` → [slots, U] | sparse gate/up rows, Ug, Uu | pair |
| 3 | ``_down_project`` | ``zd = Vd,e h_M`` → [slots, Wd] | Vd | pair |
| 4 | ``_down_units`` | ``y = w · (D_S,e h_S + Ud,e zd)`` → [P, H] (routing weight folded in) | sparse down columns, Ud | pair |
| 5 | ``reduce_pairs`` | ``out_t = B (Σ_k w_tk scatter_e(h_tk)) + Σ_k y_tk`` | B | token |

Stage 2 runs the sparse units' dense GEMMs (over H) and the low-rank units' U products (over the expert's
ragged ranks) in one program per (expert block, tile of units) and applies SiLU·mul in the epilogue. Stage 5
is ``lowrank_moe_triton.reduce_pairs`` with one column map per expert (``unit_of_channel``: the unit that
sits on each channel, -1 where the expert pruned it): the routing-weighted sum of the scattered
intermediates is formed while loading the A operand of the base GEMM, which runs once per token; the top-k
reduction of ``y`` is its epilogue (fixed order, no atomics: deterministic). Skipped work: stage 1 when no
expert has gate/up ranks, stage 3 when no down rank, stage 4 when no expert has a sparse unit or a down rank
(then ``y`` = 0), the base GEMM when the layer has no base. Experts with no token get no block; an expert
with ``s_e + m_e = 0`` writes ``y = 0`` for its pairs and nothing else.

Precision and launch shapes follow ``kernels/lowrank_moe_triton.py`` (fp32 accumulation, intermediates in
the activation dtype, 16- or 64-slot blocks); the per-layer metadata (``SparseLowrankLayout``) is built once
from host lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_moe_compress.kernels.lowrank_moe_triton import (
    block_pairs, ragged_product, round_to, rows_product, dot_config, nonempty, num_warps_for, project_ranks,
    rank_chunk, reduce_pairs,
)
from vllm_moe_compress.kernels.routing import block_size_for
from vllm_moe_compress.kernels.routing_triton import align_pairs
from vllm_moe_compress.kernels.sparse_lowrank_torch import PackedOffsets

EXPERT_FIELDS = ("sparse_count", "lowrank_count", "sparse_start", "gate_u_start", "up_u_start", "gate_rank",
                 "up_rank", "down_v_start", "down_rank", "down_u_start")
"""Rows of ``SparseLowrankLayout.experts``: per expert, its unit counts, ranks and packed offsets."""
(_SPARSE_COUNT, _LOWRANK_COUNT, _SPARSE_START, _GATE_U_START, _UP_U_START, _GATE_RANK, _UP_RANK, _DOWN_V_START,
 _DOWN_RANK, _DOWN_U_START) = (tl.constexpr(i) for i in range(len(EXPERT_FIELDS)))


@dataclass(frozen=True)
class SparseLowrankLayout:
    """Per-layer metadata the kernels read, built once (from host lists, so no sync at serving time)."""

    experts: torch.Tensor
    """int32 [len(EXPERT_FIELDS), E]."""
    gate_up_v_starts: torch.Tensor
    """int32 [2, E]: first row of each expert's gate, up V in ``lowrank_gate_up_v``."""
    gate_up_ranks: torch.Tensor
    """int32 [2, E]: gate and up ranks."""
    gate_up_width: int
    """Widest gate or up rank: the width of each of the two segments of z."""
    unit_width: int
    """Most units (sparse + low-rank) of an expert: the width of h."""
    down_width: int
    """Widest down rank."""
    total_sparse: int
    """S: sparse units of the layer (up rows start at row S of ``sparse_gate_up``)."""
    unit_of_channel: torch.Tensor
    """int32 [E, I]: the column of h holding each intermediate channel of each expert, -1 if pruned
    ([E, 0] without a base: only the base reads it)."""

    @classmethod
    def from_lists(cls, sparse_counts: list[int], lowrank_counts: list[int], ranks: list[list[int]],
                   sparse_channels: list[int], lowrank_channels: list[int], base_width: int,
                   device: torch.device | str) -> SparseLowrankLayout:
        """Counts [E], ``ranks`` [[gate]*E, [up]*E, [down]*E], channels concatenated in expert order;
        ``base_width``: columns of the down base (the slice's I, or 0 without a base)."""
        at = PackedOffsets(sparse_counts, lowrank_counts, ranks)
        table = [at.s, at.m, at.sparse, at.gate_u, at.up_u, at.kg, at.ku, at.down_v, at.kd, at.down_u]
        num_experts = len(sparse_counts)
        unit_of_channel = torch.full((num_experts, base_width), -1, dtype=torch.int32)
        for e in range(num_experts if base_width else 0):
            sparse = sparse_channels[at.sparse[e]: at.sparse[e] + at.s[e]]
            lowrank = lowrank_channels[at.lowrank[e]: at.lowrank[e] + at.m[e]]
            unit_of_channel[e, torch.tensor(sparse + lowrank, dtype=torch.int64)] = torch.arange(
                at.s[e] + at.m[e], dtype=torch.int32)
        return cls(
            experts=torch.tensor(table, dtype=torch.int32, device=device),
            gate_up_v_starts=torch.tensor([at.gate_v, at.up_v], dtype=torch.int32, device=device),
            gate_up_ranks=torch.tensor([at.kg, at.ku], dtype=torch.int32, device=device),
            gate_up_width=max([*at.kg, *at.ku], default=0),
            unit_width=max((s + m for s, m in zip(at.s, at.m)), default=0),
            down_width=max(at.kd, default=0),
            total_sparse=sum(at.s),
            unit_of_channel=unit_of_channel.to(device),
        )

    @classmethod
    def from_tensors(cls, sparse_counts: torch.Tensor, lowrank_counts: torch.Tensor, ranks: torch.Tensor,
                     sparse_channels: torch.Tensor, lowrank_channels: torch.Tensor,
                     base_width: int) -> SparseLowrankLayout:
        """The same from the op's tensors (reads them on the host once: build it before CUDA-graph capture)."""
        return cls.from_lists(sparse_counts.tolist(), lowrank_counts.tolist(), ranks.tolist(),
                              sparse_channels.tolist(), lowrank_channels.tolist(), base_width, ranks.device)


@triton.jit
def _field(table_ptr, num_experts, field: tl.constexpr, expert):
    """Row ``field`` (one of EXPERT_FIELDS) of the layout's per-expert table, for ``expert``."""
    return tl.load(table_ptr + field * num_experts + expert)


@triton.jit
def _gate_up_units_kernel(
    x_ptr, stride_x, hidden,
    sparse_ptr, stride_sparse, total_sparse,
    z_ptr, stride_z, lowrank_u_ptr,
    h_ptr, stride_h,
    table_ptr, sorted_pair_ptr, block_expert_ptr, num_pairs, num_experts,
    TOP_K: tl.constexpr, SEG_WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """h[slot, n] = silu(gate_n)·up_n for units n of one tile: sparse units (n < s) from their dense rows,
    low-rank units (s ≤ n < s + m) from U_e [m, k] (flat, row-major) times z."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= num_experts:
        return
    num_sparse = _field(table_ptr, num_experts, _SPARSE_COUNT, expert)
    num_units = num_sparse + _field(table_ptr, num_experts, _LOWRANK_COUNT, expert)
    first_unit = tl.program_id(1) * BLOCK_N
    if first_unit >= num_units:
        return
    slots, pairs, valid = block_pairs(block, sorted_pair_ptr, num_pairs, BLOCK_M)
    units = first_unit + tl.arange(0, BLOCK_N)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if first_unit < num_sparse:
        sparse_ok = units < num_sparse
        rows = _field(table_ptr, num_experts, _SPARSE_START, expert) + tl.where(sparse_ok, units, 0)
        tokens = pairs // TOP_K
        gate += rows_product(x_ptr, stride_x, 1, tokens, valid, hidden, sparse_ptr, stride_sparse, 1, rows,
                              sparse_ok, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
        up += rows_product(x_ptr, stride_x, 1, tokens, valid, hidden, sparse_ptr, stride_sparse, 1,
                            total_sparse + rows, sparse_ok, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    if first_unit + BLOCK_N > num_sparse:
        lowrank_ok = (units >= num_sparse) & (units < num_units)
        lowrank_row = tl.where(lowrank_ok, units - num_sparse, 0)
        gate_rank = _field(table_ptr, num_experts, _GATE_RANK, expert)
        up_rank = _field(table_ptr, num_experts, _UP_RANK, expert)
        gate += ragged_product(z_ptr, stride_z, 0, lowrank_u_ptr, gate_rank, 1,
                                _field(table_ptr, num_experts, _GATE_U_START, expert), gate_rank,
                                slots, valid, lowrank_row, lowrank_ok, BLOCK_M, BLOCK_N, BLOCK_R, DOT_DTYPE, PRECISION)
        up += ragged_product(z_ptr, stride_z, SEG_WIDTH, lowrank_u_ptr, up_rank, 1,
                              _field(table_ptr, num_experts, _UP_U_START, expert), up_rank,
                              slots, valid, lowrank_row, lowrank_ok, BLOCK_M, BLOCK_N, BLOCK_R, DOT_DTYPE, PRECISION)
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + slots[:, None] * stride_h + units[None, :], round_to(h, h_ptr.dtype.element_ty),
             mask=valid[:, None] & (units < num_units)[None, :])


@triton.jit
def _down_project_kernel(
    h_ptr, stride_h, down_v_ptr, z_ptr, stride_z,
    table_ptr, sorted_pair_ptr, block_expert_ptr, num_pairs, num_experts,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """zd[slot, r] = Σ_j Vd_e[r, j] h_M[slot, j] for one chunk of ranks; Vd_e [kd, m] flat, row-major."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= num_experts:
        return
    rank = _field(table_ptr, num_experts, _DOWN_RANK, expert)
    first_rank = tl.program_id(1) * BLOCK_R
    if first_rank >= rank:
        return
    num_sparse = _field(table_ptr, num_experts, _SPARSE_COUNT, expert)
    num_lowrank = _field(table_ptr, num_experts, _LOWRANK_COUNT, expert)
    slots, pairs, valid = block_pairs(block, sorted_pair_ptr, num_pairs, BLOCK_M)
    ranks = first_rank + tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    acc = rows_product(h_ptr + num_sparse, stride_h, 1, slots, valid, num_lowrank,
                        down_v_ptr + _field(table_ptr, num_experts, _DOWN_V_START, expert), num_lowrank, 1,
                        ranks, rank_ok, BLOCK_M, BLOCK_R, BLOCK_K, DOT_DTYPE, PRECISION)
    tl.store(z_ptr + slots[:, None] * stride_z + ranks[None, :], round_to(acc, z_ptr.dtype.element_ty),
             mask=valid[:, None] & rank_ok[None, :])


@triton.jit
def _down_units_kernel(
    h_ptr, stride_h, sparse_down_ptr, stride_sd_out, stride_sd_col,
    z_ptr, stride_z, down_u_ptr, stride_du_out, stride_du_rank,
    out_ptr, stride_out, out_dim,
    table_ptr, weight_ptr, sorted_pair_ptr, block_expert_ptr, num_pairs, num_experts,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """y[pair] = w · (D_S,e h_S + Ud_e zd) for one tile of output columns; written for every routed pair."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= num_experts:
        return
    slots, pairs, valid = block_pairs(block, sorted_pair_ptr, num_pairs, BLOCK_M)
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ok = outs < out_dim
    acc = ragged_product(h_ptr, stride_h, 0, sparse_down_ptr, stride_sd_out, stride_sd_col,
                          _field(table_ptr, num_experts, _SPARSE_START, expert),
                          _field(table_ptr, num_experts, _SPARSE_COUNT, expert),
                          slots, valid, outs, out_ok, BLOCK_M, BLOCK_N, BLOCK_R, DOT_DTYPE, PRECISION)
    acc += ragged_product(z_ptr, stride_z, 0, down_u_ptr, stride_du_out, stride_du_rank,
                           _field(table_ptr, num_experts, _DOWN_U_START, expert),
                           _field(table_ptr, num_experts, _DOWN_RANK, expert),
                           slots, valid, outs, out_ok, BLOCK_M, BLOCK_N, BLOCK_R, DOT_DTYPE, PRECISION)
    acc *= tl.load(weight_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + pairs[:, None] * stride_out + outs[None, :], round_to(acc, out_ptr.dtype.element_ty),
             mask=valid[:, None] & out_ok[None, :])


def sparse_lowrank_moe(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, sparse_counts: torch.Tensor,
    lowrank_counts: torch.Tensor, ranks: torch.Tensor, sparse_gate_up: torch.Tensor, sparse_down: torch.Tensor,
    lowrank_gate_up_u: torch.Tensor, lowrank_gate_up_v: torch.Tensor, lowrank_down_u: torch.Tensor,
    lowrank_down_v: torch.Tensor, base_down: torch.Tensor, sparse_channels: torch.Tensor,
    lowrank_channels: torch.Tensor, layout: SparseLowrankLayout | None = None
) -> torch.Tensor:
    """Σ_k w_k · expert_{id_k}(x), same arguments and result as ``sparse_lowrank_torch.sparse_lowrank_moe``;
    ``layout`` (built once per layer) avoids reading counts, ranks and channels on the host."""
    if layout is None:
        layout = SparseLowrankLayout.from_tensors(sparse_counts, lowrank_counts, ranks, sparse_channels,
                                                  lowrank_channels, base_down.shape[1])
    x = x.contiguous()
    top_k, num_experts, hidden = topk_ids.shape[1], ranks.shape[1], x.shape[1]
    blocks = align_pairs(topk_ids, num_experts, block_size_for(topk_ids.numel(), num_experts))
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    grid_blocks = blocks.block_expert.numel()
    block_r = rank_chunk(blocks)
    common = dict(BLOCK_M=blocks.block_m, **dot_config(x.dtype), num_warps=num_warps_for(blocks.block_m))
    block_k = 32 if x.dtype == torch.float32 else 64  # fp32 FMA dots over 64-wide chunks spill on sm_90
    routed = (blocks.sorted_pair, blocks.block_expert, blocks.num_pairs, num_experts)

    z = project_ranks(x, lowrank_gate_up_v, layout.gate_up_v_starts, layout.gate_up_ranks, layout.gate_up_width,
                      blocks, top_k, a_rows_are_tokens=True)
    h = torch.empty(blocks.sorted_pair.numel(), max(layout.unit_width, 1), dtype=x.dtype, device=x.device)
    sparse_gate_up = nonempty(sparse_gate_up)
    _gate_up_units_kernel[(grid_blocks, triton.cdiv(h.shape[1], 64))](
        x, x.stride(0), hidden, sparse_gate_up, sparse_gate_up.stride(0), layout.total_sparse,
        z, z.stride(0), nonempty(lowrank_gate_up_u), h, h.stride(0), layout.experts, *routed,
        TOP_K=top_k, SEG_WIDTH=layout.gate_up_width, BLOCK_N=64, BLOCK_K=block_k, BLOCK_R=block_r, **common,
    )

    pair_outputs = None
    if layout.total_sparse or layout.down_width:
        z_down = torch.empty(h.shape[0], max(layout.down_width, 1), dtype=x.dtype, device=x.device)
        if layout.down_width:
            _down_project_kernel[(grid_blocks, triton.cdiv(layout.down_width, block_r))](
                h, h.stride(0), nonempty(lowrank_down_v), z_down, z_down.stride(0), layout.experts, *routed,
                BLOCK_R=block_r, BLOCK_K=block_k, **common,
            )
        pair_outputs = torch.empty(blocks.num_pairs, hidden, dtype=x.dtype, device=x.device)
        sparse_down, down_u = nonempty(sparse_down), nonempty(lowrank_down_u)
        _down_units_kernel[(grid_blocks, triton.cdiv(hidden, 64))](
            h, h.stride(0), sparse_down, sparse_down.stride(0), sparse_down.stride(1),
            z_down, z_down.stride(0), down_u, down_u.stride(0), down_u.stride(1),
            pair_outputs, pair_outputs.stride(0), hidden, layout.experts, weights, *routed,
            BLOCK_N=64, BLOCK_R=block_r, **common,
        )

    pair_experts = topk_ids.reshape(-1).to(torch.int32)
    return reduce_pairs(torch.empty_like(x), pair_outputs, h, layout.unit_of_channel, base_down, blocks, weights,
                        top_k, pair_experts=pair_experts)
