"""Torch path of the ``basis_residual`` MoE (RFID-MoE and MoBE; CPU; GPUs run ``basis_residual_triton.py``).

Per projection (gate, up, down), one of two forms; I may be this tensor-parallel rank's slice of the
intermediate dimension (rows of gate/up, columns of down):

    dense        dense [E, out, in]                          W_e as stored (down by default)
    factorised   coef [out, Σ_e K_e]   expert e's A_e in columns [start_e, start_e + K_e), K_e = its basis rank
                 right [Σ_j K_j, in]   one-basis-per-group: φ(B_j) precomputed at load (weights only);
                                       mixed (MoBE): the raw bases B_j, and mix [E, m] = softmax weights α
                 scaled_eta [m, a]     s ⊙ η_g per group (empty: no residual)

    W_e x = A_e (R_e x) + R̂_e x,   R_e = φ(B_g(e))  or  φ(Σ_j α_ej B_j),
    R̂_e = member ``slot_e`` of reshape(P η_g(e)), regenerated from the hash in bounded chunks
           (kernels/residual_hash.py), never stored.

Experts loop over their routed tokens (grouped by expert); y = Σ_k w_k W_down,e (silu(W_gate,e x) ⊙ W_up,e x).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .grouped import offsets, pairs_by_expert
from .residual_hash import residual_matmul

ACTIVATIONS = {"silu": F.silu, "tanh": torch.tanh, "identity": lambda t: t}


class ProjectionWeights(NamedTuple):
    """One projection's tensors; unused ones are empty (numel 0)."""

    dense: torch.Tensor  # [E, out, in] or empty
    coef: torch.Tensor  # [out, Σ_e K_e]
    expert_ranks: torch.Tensor  # int64 [E]
    right: torch.Tensor  # [Σ_j K_j, in]
    basis_ranks: torch.Tensor  # int64 [m]
    mix: torch.Tensor  # [E, m] or empty
    scaled_eta: torch.Tensor  # [m, a] or empty


class ResidualGeometry(NamedTuple):
    """Where this rank's block of a projection sits in the full matrix (for the residual's positions)."""

    full_out: int
    full_in: int
    row_lo: int
    col_lo: int


class PackedStarts(NamedTuple):
    """Where each expert's coefficient columns and each group's basis rows start (host lists, read once per call)."""

    expert_start: list[int]
    expert_rank: list[int]
    basis_start: list[int]
    basis_rank: list[int]

    @classmethod
    def of(cls, w: ProjectionWeights) -> PackedStarts:
        expert_ranks, basis_ranks = w.expert_ranks.tolist(), w.basis_ranks.tolist()
        return cls(offsets(expert_ranks), expert_ranks, offsets(basis_ranks), basis_ranks)


def expert_right_factor(w: ProjectionWeights, at: PackedStarts, e: int, group: int, activation: str) -> torch.Tensor:
    """R_e [K, in]: the group's precomputed φ(B_g), or MoBE's φ(Σ_j α_ej B_j) computed on the fly."""
    if w.mix.numel() == 0:
        start = at.basis_start[group]
        return w.right[start : start + at.basis_rank[group]]
    bases = w.right.view(len(at.basis_rank), at.basis_rank[0], w.right.shape[1])
    return ACTIVATIONS[activation](torch.einsum("m,mri->ri", w.mix[e].to(bases.dtype), bases))


def materialise_mixed_right(bases: torch.Tensor, mix: torch.Tensor, activation: str) -> torch.Tensor:
    """MoBE's per-expert right factors φ(Σ_j α_ej B_j), stacked once at load by the GPU and C++ CPU paths:
    bases [m·K, in], mix [E, m] → [E·K, in] (math in float32 or float64, stored in the bases' dtype)."""
    num_bases, math = mix.shape[1], torch.promote_types(bases.dtype, torch.float32)
    stacked = bases.to(math).view(num_bases, -1, bases.shape[1])
    mixed = torch.einsum("em,mri->eri", mix.to(math), stacked)
    return ACTIVATIONS[activation](mixed).reshape(-1, bases.shape[1]).to(bases.dtype)


def project(inp: torch.Tensor, w: ProjectionWeights, at: PackedStarts, e: int, group: int, slot: int,
            activation: str, seed: int, geometry: ResidualGeometry) -> torch.Tensor:
    """W_e inp for one expert's tokens: inp [N, in] -> [N, out]."""
    if w.dense.numel():
        return inp @ w.dense[e].T
    start, rank = at.expert_start[e], at.expert_rank[e]
    out = (inp @ expert_right_factor(w, at, e, group, activation).T) @ w.coef[:, start : start + rank].T
    if w.scaled_eta.numel():
        out_dim, in_dim = w.coef.shape[0], inp.shape[1]
        offset = slot * geometry.full_out * geometry.full_in
        rows = range(geometry.row_lo, geometry.row_lo + out_dim)
        cols = range(geometry.col_lo, geometry.col_lo + in_dim)
        out = out + residual_matmul(inp, w.scaled_eta[group], seed, offset, geometry.full_in, rows, cols)
    return out


def basis_residual_moe(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate: ProjectionWeights,
    up: ProjectionWeights, down: ProjectionWeights, expert_group: torch.Tensor, expert_slot: torch.Tensor,
    activation: str, seed: int, full_intermediate: int, intermediate_lo: int,
) -> torch.Tensor:
    """Σ_k w_k · expert_{id_k}(x); x [T, H], topk_* [T, k] -> [T, H] in x's dtype."""
    hidden = x.shape[1]
    token_of, weight_of, counts = pairs_by_expert(topk_ids, topk_weights, expert_group.numel(), x.dtype)
    groups, slots = expert_group.tolist(), expert_slot.tolist()
    in_geometry = ResidualGeometry(full_intermediate, hidden, intermediate_lo, 0)
    out_geometry = ResidualGeometry(hidden, full_intermediate, 0, intermediate_lo)
    at_gate, at_up, at_down = (PackedStarts.of(w) for w in (gate, up, down))
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tokens, w = token_of[start : start + n], weight_of[start : start + n]
        start += n
        xe = x[tokens]
        args = (e, groups[e], slots[e], activation, seed)
        h = F.silu(project(xe, gate, at_gate, *args, in_geometry)) * project(xe, up, at_up, *args, in_geometry)
        out.index_add_(0, tokens, w * project(h, down, at_down, *args, out_geometry))
    return out
