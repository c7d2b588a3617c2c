"""CPU path of the ``sparse_lowrank`` MoE (RS-MoE): per-expert contiguous blocks prepared once at load, and
one C++ op per layer (``kernels/csrc/lowrank_moe_cpu.cpp``) that loops over the experts that received tokens.

Expert e on its routed tokens X_e with routing weights w_e (``kernels/sparse_lowrank_torch.py``'s equations,
the weight folded into the intermediates, which are s_e + m_e values per pair):

    h_S = w ⊙ silu(G_S X) ⊙ (U_S X)                  h_M = w ⊙ silu(Ug (Vg X)) ⊙ (Uu (Vu X))
    out += D_S h_S + Ud (Vd h_M)                      out += B · Σ_pairs scatter(h_S, h_M)   (base once per token)

Prepared layout (``SparseLowrankCpuLayout``): products into a smaller dimension read [out, in] rows
(``x Wᵀ``), products out of one read [in, out] rows (``z Wᵀᵀ``), as in ``kernels/base_delta_cpu.py``:

    meta          int64 [E, 12]  per expert: sparse start, s, low-rank start, m, first row in lv, kg, ku, offset
                                 in lut, offset in ldv, first row in ldut, kd, first row in sd_t
    sgu           [2S, H]        expert e's sparse gate rows then its sparse up rows, experts in order
    sd_t          [S, H]         sparse down columns, transposed
    lv            [Kg + Ku, H]   expert e's gate V rows then its up V rows
    lut           flat           expert e's Ugᵀ [kg, m] then Uuᵀ [ku, m]
    ldv           flat           Vd [kd, m] per expert (as packed)
    ldut          [Kd, H]        Udᵀ
    base_down     [I, H] or [0, H]   Bᵀ; or B [H, I] / [H, 0] where ``cpu_extension.base_down_projected``
    sparse_channels, lowrank_channels  int64, as packed
    pairs         int64 [1]      1: sd_t, lut, ldut and base_down in the pair layout

In bf16/fp16, sgu, lv and the row-major sd_t and ldut may end in a few zero rows (``cpu_extension.with_tail``): their
experts' blocks have ragged row counts (s, m and the ranks are per expert), and a product of one on ``at::mm`` is
called with the block's rows rounded up to a shape the experts share (oneDNN compiles a kernel per shape), reading
the rows after it: the next expert's, or for the last expert the tail.

The expand-side tensors (sd_t, lut, ldut, base_down as Bᵀ) are row-major, or, for bf16 where the op's prefill
products run on AMX, in the pair layout (``cpu_extension.pair_rows``, per block: an expert's sparse down, its
Ugᵀ, its Uuᵀ, its Udᵀ, the base down; an odd block padded with a zero row, counted by meta's offsets and, for the
base down, by its I: the weighted h then has one more, always zero, column), as in
``kernels/base_delta_cpu.py``.

dtype: as ``kernels.base_delta_cpu.compute_dtype`` (fp32 on CPUs without native bf16).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .base_delta_cpu import compute_dtype
from .cpu_extension import (base_down_layout, cpu_ops, on_huge_pages, pair_layout, pair_rows, pairs_flag, row_blocks,
                            with_tail)
from .sparse_lowrank_torch import PackedOffsets


class SparseLowrankCpuLayout(NamedTuple):
    meta: torch.Tensor
    sgu: torch.Tensor
    sd_t: torch.Tensor
    lv: torch.Tensor
    lut: torch.Tensor
    ldv: torch.Tensor
    ldut: torch.Tensor
    base_down: torch.Tensor
    sparse_channels: torch.Tensor
    lowrank_channels: torch.Tensor
    pairs: torch.Tensor


def prepare(sparse_counts, lowrank_counts, ranks, sparse_gate_up, sparse_down, lowrank_gate_up_u, lowrank_gate_up_v,
            lowrank_down_u, lowrank_down_v, base_down, sparse_channels, lowrank_channels) -> SparseLowrankCpuLayout:
    """The layout above from the packed tensors of ``kernels/sparse_lowrank_torch.py``; builds the C++ op."""
    cpu_ops()
    dtype = compute_dtype(sparse_gate_up.dtype)
    pairs = pair_layout(dtype)
    at = PackedOffsets(sparse_counts.tolist(), lowrank_counts.tolist(), ranks.tolist())
    total_sparse = at.totals["S"]
    sd_t, sd_starts = row_blocks(sparse_down.T, at.s, pairs)
    ldut, ldut_starts = row_blocks(lowrank_down_u.T, at.kd, pairs)
    meta, sgu_rows, lv_rows, lut_blocks, lv_row, lu_off = [], [], [], [], 0, 0
    for e, (s, m, kg, ku, kd) in enumerate(zip(at.s, at.m, at.kg, at.ku, at.kd)):
        meta.append([at.sparse[e], s, at.lowrank[e], m, lv_row, kg, ku, lu_off, at.down_v[e], ldut_starts[e], kd,
                     sd_starts[e]])
        sgu_rows += [torch.arange(at.sparse[e], at.sparse[e] + s),
                     torch.arange(total_sparse + at.sparse[e], total_sparse + at.sparse[e] + s)]
        lv_rows += [torch.arange(at.gate_v[e], at.gate_v[e] + kg), torch.arange(at.up_v[e], at.up_v[e] + ku)]
        for start, k in ((at.gate_u[e], kg), (at.up_u[e], ku)):
            block = lowrank_gate_up_u[start : start + m * k].view(m, k).T
            lut_blocks.append((pair_rows(block) if pairs else block).reshape(-1))
            lu_off += lut_blocks[-1].numel()
        lv_row += kg + ku

    def rows(t, index):
        return t[torch.cat(index)] if index else t[:0]

    def prepared(t, block_rows=(), in_pairs=False):
        """on_huge_pages; with block_rows (ragged blocks), a zero tail (with_tail)"""
        return on_huge_pages(with_tail(t, list(block_rows), dtype, in_pairs), dtype)

    return SparseLowrankCpuLayout(
        torch.tensor(meta, dtype=torch.int64).reshape(len(at.s), 12),
        prepared(rows(sparse_gate_up, sgu_rows), [2 * s for s in at.s]), prepared(sd_t, at.s, pairs),
        prepared(rows(lowrank_gate_up_v, lv_rows), [kg + ku for kg, ku in zip(at.kg, at.ku)]),
        prepared(torch.cat(lut_blocks) if lut_blocks else lowrank_gate_up_u[:0]), prepared(lowrank_down_v),
        prepared(ldut, at.kd, pairs), prepared(base_down_layout(base_down, dtype, pairs)),
        sparse_channels.long().contiguous(), lowrank_channels.long().contiguous(), pairs_flag(pairs))


def sparse_lowrank_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       layout: SparseLowrankCpuLayout) -> torch.Tensor:
    """Σ_k w_k · expert_{id_k}(x) for every token; x [T, H], topk_* [T, k] → [T, H] in x's dtype."""
    return cpu_ops().sparse_lowrank(x, topk_ids, topk_weights, *layout)
