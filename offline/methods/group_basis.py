"""Expert groups, their importance and their basis ranks (RFID-MoE §3.1–3.3; MoBE's grouped-SVD init).

A group of k experts is handled through its *group matrix*: the k expert matrices [out, in] stacked
vertically into [k·out, in] (RFID-MoE Eq. 7). Everything here is float64.
"""

from __future__ import annotations

import torch
from ..choices import EFFECTIVE_RANK_MODES


def frequency_groups(counts: torch.Tensor, group_size: int) -> list[list[int]]:
    """Experts sorted by routing count, most routed first, cut sequentially into groups of ``group_size``
    (RFID-MoE Eq. 6, Alg. 1 l.1–4); ties keep the lower expert index first."""
    order = sorted(range(counts.numel()), key=lambda e: (-float(counts[e]), e))
    return [order[s : s + group_size] for s in range(0, len(order), group_size)]


def index_groups(num_experts: int, group_size: int) -> list[list[int]]:
    """Consecutive experts by index (MoBE's initialisation groups)."""
    return [list(range(s, min(s + group_size, num_experts))) for s in range(0, num_experts, group_size)]


def check_group_size(num_experts: int, group_size: int) -> None:
    if group_size < 1 or num_experts % group_size:
        raise ValueError(f"group size {group_size} must divide the {num_experts} experts of a layer")


def group_matrix(weights, group: list[int]) -> torch.Tensor:
    """[k·out, in]: the members' matrices stacked in group order (``weights`` is [E, out, in], a tensor or an
    ExpertStack: only the members are read)."""
    return torch.cat([weights[e] for e in group])


def effective_rank(matrix: torch.Tensor, mode: str = "energy") -> float:
    """exp(H(p)) of the normalised spectrum (RFID-MoE Eq. 8–10).

    ``energy``: p_i = σ_i²/Σσ² (the paper); ``singular``: p_i = σ_i/Σσ (Roy & Vetterli). Zero singular
    values are dropped before the logarithm."""
    if mode not in EFFECTIVE_RANK_MODES:
        raise ValueError(f"effective-rank mode must be one of {', '.join(EFFECTIVE_RANK_MODES)}, got {mode!r}")
    sigma = torch.linalg.svdvals(matrix.double())
    mass = sigma**2 if mode == "energy" else sigma
    mass = mass[mass > 0]
    if mass.numel() == 0:
        return 0.0
    p = mass / mass.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def fused_importance(effective_ranks: list[float], frequencies: list[float], xi: float) -> list[float]:
    """C_g = ξ·E_g + (1 − ξ)·F_g with E and F each normalised to sum 1 (RFID-MoE Eq. 11–12)."""
    if not 0.0 <= xi <= 1.0:
        raise ValueError(f"xi must be in [0, 1], got {xi}")

    def normalised(values: list[float]) -> list[float]:
        total = sum(values)
        return [v / total for v in values] if total > 0 else [1.0 / len(values)] * len(values)

    e, f = normalised(effective_ranks), normalised(frequencies)
    return [xi * eg + (1.0 - xi) * fg for eg, fg in zip(e, f)]


def allocate_group_ranks(total_rank: int, importance: list[float], max_rank: int) -> list[int]:
    """K_g = max(1, ⌊K_total·C_g/ΣC⌋) capped at ``max_rank`` (Eq. 13), then the difference to K_total is
    settled greedily so that Σ K_g == K_total whenever 1·m ≤ K_total ≤ max_rank·m:

    - leftover ranks go one at a time to the uncapped group with the largest shortfall K_total·C_g/ΣC − K_g
      (largest remainder first; the paper leaves floors unspent);
    - an overshoot caused by the max(1, ·) floor is taken back one at a time from the group with the largest
      excess K_g − K_total·C_g/ΣC among those above 1.
    """
    m = len(importance)
    if not m <= total_rank <= m * max_rank:
        raise ValueError(f"total rank {total_rank} outside [{m}, {m * max_rank}] for {m} groups of rank <= {max_rank}")
    total_c = sum(importance)
    share = [total_rank * c / total_c if total_c > 0 else total_rank / m for c in importance]
    ranks = [min(max_rank, max(1, int(s))) for s in share]
    while sum(ranks) < total_rank:
        g = max((g for g in range(m) if ranks[g] < max_rank), key=lambda g: (share[g] - ranks[g], -g))
        ranks[g] += 1
    while sum(ranks) > total_rank:
        g = max((g for g in range(m) if ranks[g] > 1), key=lambda g: (ranks[g] - share[g], g))
        ranks[g] -= 1
    return ranks


def truncated_group_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W_g ≈ (U_K Σ_K)(V_Kᵀ): returns (left [k·out, K], basis [K, in]) (RFID-MoE Alg. 1 l.17, MoBE init)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]
