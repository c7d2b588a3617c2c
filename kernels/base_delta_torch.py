"""Torch path of the ``base_delta`` MoE (the reference forward; the plugin serves CPU layers with
``kernels/base_delta_cpu.py`` and GPU layers with ``kernels/base_delta_triton.py``).

Packed layout (one MoE layer; ranks may differ per expert and projection, and no byte is padding):

    ranks         int64 [3, E]          rank of gate, up, down per expert (0 = no factors)
    gate_up_u     [I, Rg + Ru]          columns: every expert's gate U, then every expert's up U
    gate_up_v     [Rg + Ru, H]          rows in the same order
    down_u        [H, Rd]               every expert's down U
    down_v        [Rd, I]
    base_gate_up  [2C, H]               gate base rows then up base rows for the C kept channels
    base_down     [H, C]
    base_channels int64 [C]             which of the I intermediate channels the base covers

with Rg = Σ_e ranks[0, e] etc., and I the (per tensor-parallel rank) intermediate size. The forward
(D²-MoE §3.5) runs the base gate/up GEMMs once per token, the per-expert low-rank parts over each
expert's routed tokens (grouped by expert, no loop over tokens), and the base down projection once per
token on the routing-weighted sum of intermediate activations; ``num_dynamic_drop`` > 0 skips that many
base-down columns, the lowest by C_j = ‖B_down[:, j]‖₂·‖H[:, j]‖₂ over the batch (D²-MoE Eq. 9, dynamic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grouped import offsets, pairs_by_expert


def rank_offsets(ranks: torch.Tensor) -> list[list[int]]:
    """Start column of every (projection, expert) block in the packed factors; up follows gate."""
    gate, up, down = ranks.tolist()
    gate_up = offsets(gate + up)  # gate and up factors share one tensor; down factors have their own
    return [gate_up[: len(gate)], gate_up[len(gate):], offsets(down)]


MASKED_PATH_MAX_MACS = 2**29
"""Above this many multiply-adds of wasted work, loop over experts instead of masking (see below). Measured
crossover on the reference model's layers (1 CPU core, bf16): between 4e8 and 1e9 (benchmarks/torch_path.py)."""


def _own_columns(z, column_expert, experts):
    """Zero every packed column that belongs to another expert than the pair's own: then Σ_c z[p, c]·U[:, c]
    keeps only U_e (V_e x) for pair p's expert e — one GEMM instead of a loop over experts."""
    return z * (column_expert[None, :] == experts[:, None]).to(z.dtype)


def base_delta_moe(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, ranks: torch.Tensor,
    gate_up_u: torch.Tensor, gate_up_v: torch.Tensor, down_u: torch.Tensor, down_v: torch.Tensor,
    base_gate_up: torch.Tensor | None = None, base_down: torch.Tensor | None = None,
    base_channels: torch.Tensor | None = None, num_dynamic_drop: int = 0
) -> torch.Tensor:
    """Σ_k w_k · expert_{id_k}(x) for every token; x [T, H], topk_* [T, k] → [T, H] in x's dtype.

    Two strategies with identical results: few routed pairs (decode) take the masked path, where every pair
    is multiplied by all experts' packed factors and foreign columns are zeroed — a handful of GEMMs, no
    per-expert Python, at the cost of E× the low-rank multiply-adds; many pairs (prefill) loop over experts
    on their grouped tokens, doing only the work needed.
    """
    total_rank = int(ranks.sum())
    wasted_macs = topk_ids.numel() * total_rank * (x.shape[1] + gate_up_u.shape[0])
    strategy = _base_delta_masked if wasted_macs <= MASKED_PATH_MAX_MACS else _base_delta_grouped
    return strategy(x, topk_ids, topk_weights, ranks, gate_up_u, gate_up_v, down_u, down_v,
                    base_gate_up, base_down, base_channels, num_dynamic_drop)


def _base_delta_grouped(x, topk_ids, topk_weights, ranks, gate_up_u, gate_up_v, down_u, down_v,
                        base_gate_up, base_down, base_channels, num_dynamic_drop):
    """Routed pairs sorted by expert; each expert's low-rank products run on its own tokens only."""
    num_experts = ranks.shape[1]
    intermediate = gate_up_u.shape[0]
    num_tokens = topk_ids.shape[0]
    token_of, weight_of, counts = pairs_by_expert(topk_ids, topk_weights, num_experts, x.dtype)
    rank_list, starts = ranks.tolist(), rank_offsets(ranks)
    has_base = base_gate_up is not None and base_gate_up.numel() > 0

    out = torch.zeros_like(x)
    if has_base:
        base_gu = x @ base_gate_up.T
        channels = base_channels.shape[0]
        base_gate, base_up = base_gu[:, :channels], base_gu[:, channels:]
        weighted_h = x.new_zeros(num_tokens, channels)

    def low_rank(inp, u, v, proj, e):
        r, s = rank_list[proj][e], starts[proj][e]
        return (inp @ v[s : s + r].T) @ u[:, s : s + r].T

    start = 0
    for e, n in enumerate(counts[:num_experts]):
        if n == 0:
            continue
        tokens, w = token_of[start : start + n], weight_of[start : start + n]
        start += n
        xe = x[tokens]
        gate = low_rank(xe, gate_up_u, gate_up_v, 0, e) if rank_list[0][e] else xe.new_zeros(n, intermediate)
        up = low_rank(xe, gate_up_u, gate_up_v, 1, e) if rank_list[1][e] else xe.new_zeros(n, intermediate)
        if has_base:
            gate[:, base_channels] += base_gate[tokens]
            up[:, base_channels] += base_up[tokens]
        h = F.silu(gate) * up
        if has_base:
            weighted_h.index_add_(0, tokens, w * h[:, base_channels])
        if rank_list[2][e]:
            out.index_add_(0, tokens, w * low_rank(h, down_u, down_v, 2, e))
    if has_base:
        out += _base_down(weighted_h, base_down, num_dynamic_drop)
    return out


def _base_down(weighted_h: torch.Tensor, base_down: torch.Tensor, num_dynamic_drop: int) -> torch.Tensor:
    """B_down · Σ_i w_i h_i, skipping the ``num_dynamic_drop`` lowest-C_j columns of this batch (Eq. 9)."""
    if num_dynamic_drop:
        score = base_down.float().norm(dim=0) * weighted_h.float().norm(dim=0)
        keep = score.topk(base_down.shape[1] - num_dynamic_drop).indices
        base_down, weighted_h = base_down[:, keep], weighted_h[:, keep]
    return weighted_h @ base_down.T


def _base_delta_masked(x, topk_ids, topk_weights, ranks, gate_up_u, gate_up_v, down_u, down_v,
                       base_gate_up, base_down, base_channels, num_dynamic_drop):
    """Every routed pair against all experts' packed factors, foreign columns zeroed (see _own_columns)."""
    num_experts = ranks.shape[1]
    num_tokens, top_k = topk_ids.shape
    experts = topk_ids.reshape(-1).long()
    tokens = torch.arange(num_tokens, device=x.device).repeat_interleave(top_k)
    weights = topk_weights.reshape(-1).to(x.dtype)[:, None]
    column_expert = torch.arange(num_experts, device=x.device).repeat(3).repeat_interleave(ranks.flatten().to(x.device))
    rg_ru = int(ranks[0].sum()) + int(ranks[1].sum())
    z = _own_columns((x @ gate_up_v.T)[tokens], column_expert[:rg_ru], experts)  # V stage once per token
    rg = int(ranks[0].sum())
    gate = z[:, :rg] @ gate_up_u[:, :rg].T
    up = z[:, rg:] @ gate_up_u[:, rg:].T
    has_base = base_gate_up is not None and base_gate_up.numel() > 0
    out = torch.zeros_like(x)
    if has_base:
        channels = base_channels.shape[0]
        base_gu = (x @ base_gate_up.T)[tokens]
        gate[:, base_channels] += base_gu[:, :channels]
        up[:, base_channels] += base_gu[:, channels:]
    h = F.silu(gate) * up
    if down_v.shape[0]:
        down = _own_columns(h @ down_v.T, column_expert[rg_ru:], experts) @ down_u.T
        out.index_add_(0, tokens, weights * down)
    if has_base:
        weighted_h = x.new_zeros(num_tokens, base_channels.shape[0]).index_add_(0, tokens, weights * h[:, base_channels])
        out += _base_down(weighted_h, base_down, num_dynamic_drop)
    return out
