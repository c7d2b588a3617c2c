"""Torch path of the ``sparse_lowrank`` MoE (RS-MoE; the reference forward; the plugin serves CPU layers with
``kernels/sparse_lowrank_cpu.py``).

Expert e keeps three kinds of intermediate channels (collaborative units: row j of gate and up, column j of
down): ``s_e`` sparse channels stored dense, ``m_e`` low-rank channels whose gate/up rows and down columns
are rank-``k`` factors, and pruned channels (nothing stored). A shared down base ``B`` [H, I] (optional)
acts on the expert's intermediate scattered onto all I channels. Packed layout (one layer, one
tensor-parallel slice of the I channels; ragged sizes concatenated in expert order, no padding):

    sparse_counts      int64 [E]             s_e: sparse channels of expert e in this slice
    lowrank_counts     int64 [E]             m_e: low-rank channels of expert e in this slice
    ranks              int64 [3, E]          rank of the gate, up, down factors of expert e
    sparse_gate_up     [2S, H]               gate rows of every expert's sparse channels, then up rows
    sparse_down        [H, S]                down columns of the sparse channels
    lowrank_gate_up_u  [Σ m_e·kg_e + Σ m_e·ku_e]   flat: gate U_e [m_e, kg_e] (row-major) per expert, then up
    lowrank_gate_up_v  [Kg + Ku, H]          gate V_e rows per expert, then up
    lowrank_down_u     [H, Kd]               down U_e columns per expert
    lowrank_down_v     [Σ kd_e·m_e]          flat: down V_e [kd_e, m_e] (row-major) per expert
    base_down          [H, I] or [H, 0]      shared down base over this slice's channels (absent: width 0)
    sparse_channels    int64 [S]             channel (within the slice) of every sparse unit
    lowrank_channels   int64 [M]             channel of every low-rank unit

with S = Σ s_e, M = Σ m_e, Kg = Σ kg_e. Expert e on input x (its routed tokens):

    h_S = act(G_S x) ⊙ (U_S x)                   sparse units, exact
    h_M = act(Ug (Vg x)) ⊙ (Uu (Vu x))           low-rank units
    y_e = D_S h_S + Ud (Vd h_M)
    out = Σ_e w_e y_e + B · Σ_e w_e scatter(h_S, h_M)       (the base once per token, on the weighted sum)

Every product is linear in one TP slice's channels, so slices' outputs sum to the full output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grouped import offsets, pairs_by_expert


class PackedOffsets:
    """Where each expert's blocks start in the packed tensors (from the counts and ranks alone)."""

    def __init__(self, sparse_counts: list[int], lowrank_counts: list[int], ranks: list[list[int]]):
        self.s, self.m = sparse_counts, lowrank_counts
        self.kg, self.ku, self.kd = ranks
        self.sparse = offsets(self.s)
        self.lowrank = offsets(self.m)
        self.gate_v = offsets(self.kg)
        self.up_v = [sum(self.kg) + o for o in offsets(self.ku)]
        self.down_u = offsets(self.kd)
        gate_u_sizes = [m * k for m, k in zip(self.m, self.kg)]
        self.gate_u = offsets(gate_u_sizes)
        self.up_u = [sum(gate_u_sizes) + o for o in offsets([m * k for m, k in zip(self.m, self.ku)])]
        self.down_v = offsets([k * m for k, m in zip(self.kd, self.m)])

    @property
    def totals(self) -> dict[str, int]:
        """Sizes of the packed tensors' variable dimensions."""
        return {"S": sum(self.s), "M": sum(self.m), "Kgu": sum(self.kg) + sum(self.ku), "Kd": sum(self.kd),
                "gate_up_u": sum(m * (g + u) for m, g, u in zip(self.m, self.kg, self.ku)),
                "down_v": sum(k * m for k, m in zip(self.kd, self.m))}


def _low_rank_rows(x, flat_u, u_start, v, v_start, rows: int, rank: int):
    """U (V x) for U [rows, rank] stored flat at ``u_start`` and V the rows [v_start, v_start + rank) of ``v``."""
    if rank == 0:
        return x.new_zeros(x.shape[0], rows)
    u = flat_u[u_start : u_start + rows * rank].view(rows, rank)
    return (x @ v[v_start : v_start + rank].T) @ u.T


def sparse_lowrank_moe(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, sparse_counts: torch.Tensor,
    lowrank_counts: torch.Tensor, ranks: torch.Tensor, sparse_gate_up: torch.Tensor, sparse_down: torch.Tensor,
    lowrank_gate_up_u: torch.Tensor, lowrank_gate_up_v: torch.Tensor, lowrank_down_u: torch.Tensor,
    lowrank_down_v: torch.Tensor, base_down: torch.Tensor, sparse_channels: torch.Tensor,
    lowrank_channels: torch.Tensor
) -> torch.Tensor:
    """Σ_k w_k · expert_{id_k}(x) for every token (module docstring); x [T, H], topk_* [T, k] → [T, H]."""
    num_experts = ranks.shape[1]
    at = PackedOffsets(sparse_counts.tolist(), lowrank_counts.tolist(), ranks.tolist())
    total_sparse = at.totals["S"]
    has_base = base_down.shape[1] > 0
    num_tokens = topk_ids.shape[0]
    token_of, weight_of, counts = pairs_by_expert(topk_ids, topk_weights, num_experts, x.dtype)
    out = torch.zeros_like(x)
    weighted_h = x.new_zeros(num_tokens, base_down.shape[1]) if has_base else None
    end = 0
    for e in range(num_experts):
        begin, end = end, end + counts[e]
        s, m = at.s[e], at.m[e]
        if begin == end or s + m == 0:
            continue
        tokens, w, xe = token_of[begin:end], weight_of[begin:end], x[token_of[begin:end]]
        y = xe.new_zeros(end - begin, x.shape[1])
        if s:
            rows = slice(at.sparse[e], at.sparse[e] + s)
            gate = xe @ sparse_gate_up[rows].T
            up = xe @ sparse_gate_up[total_sparse + at.sparse[e] : total_sparse + at.sparse[e] + s].T
            h_sparse = F.silu(gate) * up
            y += h_sparse @ sparse_down[:, rows].T
        if m:
            gate = _low_rank_rows(xe, lowrank_gate_up_u, at.gate_u[e], lowrank_gate_up_v, at.gate_v[e], m, at.kg[e])
            up = _low_rank_rows(xe, lowrank_gate_up_u, at.up_u[e], lowrank_gate_up_v, at.up_v[e], m, at.ku[e])
            h_lowrank = F.silu(gate) * up
            if at.kd[e]:
                v = lowrank_down_v[at.down_v[e] : at.down_v[e] + at.kd[e] * m].view(at.kd[e], m)
                y += (h_lowrank @ v.T) @ lowrank_down_u[:, at.down_u[e] : at.down_u[e] + at.kd[e]].T
        out.index_add_(0, tokens, w * y)
        if has_base:
            h = xe.new_zeros(end - begin, base_down.shape[1])
            if s:
                h[:, sparse_channels[at.sparse[e] : at.sparse[e] + s]] = h_sparse
            if m:
                h[:, lowrank_channels[at.lowrank[e] : at.lowrank[e] + m]] = h_lowrank
            weighted_h.index_add_(0, tokens, w * h)
    if has_base:
        out += weighted_h @ base_down.T
    return out
