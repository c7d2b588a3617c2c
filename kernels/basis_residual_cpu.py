"""CPU path of the ``basis_residual`` MoE (RFID-MoE, MoBE): layouts prepared once at load, and one C++ op per
layer (``kernels/csrc/lowrank_moe_cpu.cpp``) that loops over the experts that received tokens.

Expert e in group g at slot s, per projection q (``kernels/basis_residual_torch.py``, docs/format.md §10):

    dense        W_e x                                           (down by default)
    factorised   W_e x = A_e (R_e x) + R̂_e x,   R_e = φ(B_g)  (one basis per group, φ applied at load)
                                                 R_e = φ(Σ_j α_ej B_j)  (MoBE: made once here, per expert)
    h = w_e · silu(W_gate,e x) ⊙ (W_up,e x)        out += W_down,e h    (routing weight on the I values of h)

R̂_e[r, c] = s_π(t) η_g[π(t)] at position t = s·out·in + r·in + c of the full (all TP ranks) matrix is hashed
inside the op row by row (kernels/residual_hash.py's π), never stored: its cost is one hash and one
multiply-add per entry of the full-size matrix, so a layer with a residual is compute-bound on the CPU
(BENCHMARKS.md §10) — the compressor's default is no residual.

At decode (one token) z = R_g x is computed once per group and shared by its routed members (experts are
visited group by group); for more tokens each expert multiplies its own rows (R_g stays cache-hot between
the group's members). Products into the ranks read R [K, in] rows (``x Rᵀ``), products out of them read
A_eᵀ [K, out] rows (``z A_eᵀ``), as in ``kernels/base_delta_cpu.py``.

Prepared layout (``BasisResidualCpuLayout``):

    meta        int64 [E, 11]   per expert: group, slot, then per projection (gate, up, down) the first row
                                of R_e in ``right``, K_e, the first row of A_eᵀ in ``coef_t``
    order       int64 [E]       experts in visiting order (by right factor, then expert)
    geometry    int64 [3]       residual seed, full intermediate size, this TP rank's first intermediate channel
    per projection (gate, up, down), empty where unused:
    dense       [E, in, out]    W_eᵀ (the op adds its rows of out values, one per input value); or W_e [E, out,
                                in] where ``cpu_extension.dense_projected`` (bf16, not in the pair layout, an op
                                built with AVX512-BF16 dot products), which the op multiplies as dot products over
                                rows of in values: at Mixtral-8x7B's down 2–4 rows took 2.8–3.7 ms against W_eᵀ's
                                6.6–14.0 (docs/kernels.md)
    right       [rows, in]      φ(B_j) stacked (as loaded), or MoBE's per-expert φ(Σ_j α_ej B_j) [E·K, in]
    coef_t      [Σ_e K_e, out]  A_eᵀ stacked per expert
    (bf16/fp16: right and the row-major coef_t may end in a few zero rows, ``cpu_extension.with_tail``: products on
    ``at::mm`` round the ragged ranks up to shapes the groups share, reading the rows after a block)
    eta         [m, a]          s ⊙ η per group
    pairs       int64 [1]       1: dense (as W_eᵀ) and coef_t in the pair layout (below)

The expand-side tensors (dense as W_eᵀ, coef_t) are row-major, or, for bf16 where the op's prefill products run on
AMX, in the pair layout (``cpu_extension.pair_rows``, per expert block: rows 2p and 2p + 1 interleaved, an odd
block padded with a zero row, counted by meta's first rows of A_eᵀ), as in ``kernels/base_delta_cpu.py``.

dtype: as ``kernels.base_delta_cpu.compute_dtype`` (fp32 on CPUs without native bf16, converted here once).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .base_delta_cpu import compute_dtype
from .basis_residual_torch import PackedStarts, ProjectionWeights, materialise_mixed_right
from .cpu_extension import (cpu_ops, dense_projected, on_huge_pages, pair_layout, pair_rows, pairs_flag, row_blocks,
                            with_tail)

class BasisResidualCpuLayout(NamedTuple):
    meta: torch.Tensor
    order: torch.Tensor
    geometry: torch.Tensor
    gate_dense: torch.Tensor
    gate_right: torch.Tensor
    gate_coef_t: torch.Tensor
    gate_eta: torch.Tensor
    up_dense: torch.Tensor
    up_right: torch.Tensor
    up_coef_t: torch.Tensor
    up_eta: torch.Tensor
    down_dense: torch.Tensor
    down_right: torch.Tensor
    down_coef_t: torch.Tensor
    down_eta: torch.Tensor
    pairs: torch.Tensor


def prepare(gate: ProjectionWeights, up: ProjectionWeights, down: ProjectionWeights, expert_group: torch.Tensor,
            expert_slot: torch.Tensor, activation: str, seed: int, full_intermediate: int,
            intermediate_lo: int) -> BasisResidualCpuLayout:
    """The layout above from the torch path's tensors (``kernels/basis_residual_torch.py``: φ(B_g) already
    applied for one basis per group, raw bases and ``mix`` for MoBE, s ⊙ η); builds the C++ op."""
    cpu_ops()
    weights = (gate, up, down)
    dtype = compute_dtype(next(w.dense if w.dense.numel() else w.coef for w in weights).dtype)
    pairs = pair_layout(dtype)
    groups, slots = expert_group.tolist(), expert_slot.tolist()
    num_experts = len(groups)
    meta = [[groups[e], slots[e]] for e in range(num_experts)]
    fields = []
    for w in weights:
        empty = w.coef.new_zeros(0, dtype=dtype)
        if w.dense.numel():  # W_e [E, out, in] as loaded
            dense = w.dense if dense_projected(dtype, pairs) else w.dense.transpose(1, 2)
            fields += [on_huge_pages(pair_rows(dense) if pairs else dense, dtype), empty, empty, empty]
            for row in meta:
                row += [0, 0, 0]
            continue
        at = PackedStarts.of(w)
        right = w.right
        if w.mix.numel():  # MoBE: R_e = φ(Σ_j α_ej B_j) per expert, made once (E·K·in values)
            right = materialise_mixed_right(w.right, w.mix, activation)
            rank = at.basis_rank[0]
            right_rows = [e * rank for e in range(num_experts)]
        else:
            right_rows = [at.basis_start[g] for g in groups]
        coef_t, coef_starts = row_blocks(w.coef.T, at.expert_rank, pairs)
        for e, row in enumerate(meta):
            row += [right_rows[e], at.expert_rank[e], coef_starts[e]]
        # zero tails: products on at::mm round the ragged ranks up to shared shapes (with_tail)
        fields += [empty, on_huge_pages(with_tail(right, at.basis_rank, dtype), dtype),
                   on_huge_pages(with_tail(coef_t, at.expert_rank, dtype, pairs), dtype),
                   on_huge_pages(w.scaled_eta, dtype)]
    # Visit experts by right factor (then by id): at decode one z = R x serves every member of a group.
    order = sorted(range(num_experts), key=lambda e: (meta[e][2], e))
    return BasisResidualCpuLayout(
        torch.tensor(meta, dtype=torch.int64).reshape(num_experts, 11), torch.tensor(order, dtype=torch.int64),
        torch.tensor([seed, full_intermediate, intermediate_lo], dtype=torch.int64), *fields, pairs_flag(pairs))


def basis_residual_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       layout: BasisResidualCpuLayout) -> torch.Tensor:
    """Σ_k w_k · expert_{id_k}(x) for every token; x [T, H], topk_* [T, k] → [T, H] in x's dtype."""
    return cpu_ops().basis_residual(x, topk_ids, topk_weights, *layout)
