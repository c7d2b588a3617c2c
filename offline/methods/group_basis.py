"""Expert groups, their importance and their basis ranks (RFID-MoE §3.1–3.3; MoBE's grouped-SVD init).

A group of k experts is handled through its *group matrix*: the k expert matrices [out, in] stacked
vertically into [k·out, in] (RFID-MoE Eq. 7). Everything here is float64.

The spectra come from the group matrix's Gram W_gᵀW_g [in, in] (its eigenvalues are σ_i², its eigenvectors the
right singular vectors), cheaper than an SVD of W_g (BENCHMARKS.md §12.9). Float64 throughout, because the Gram
squares the spread of the spectrum: an eigenvalue carries an absolute error of about ε·σ_1², so σ_i keeps a
relative accuracy of about ε·(σ_1/σ_i)² (float32 would leave 1e-7·(σ_1/σ_i)², float64 1e-16·(σ_1/σ_i)²), and
an eigenvector about ε·σ_1²/(σ_i² − σ_j²) for its nearest σ_j. That is ample for the σ² shares of the
effective rank and for the top singular vectors of the initialisation, which are rounded to float32 for the
fit (tests/test_rfid.py checks both against float64 SVDs); the ``singular`` effective rank, which needs the
small σ_i themselves, takes them from ``svdvals``.
"""

from __future__ import annotations

import torch

from ..choices import EFFECTIVE_RANK_MODES
from .base import factorization_workers, in_one_thread_workers


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
    """[k·out, in] float64: the members' matrices stacked in group order (``weights`` is [E, out, in], a tensor or
    an ExpertStack: only the members are read, one at a time, into the result)."""
    out_dim = weights.shape[1]
    matrix = torch.empty(len(group) * out_dim, weights.shape[2], dtype=torch.float64)
    for j, e in enumerate(group):
        matrix[j * out_dim : (j + 1) * out_dim] = weights[e]
    return matrix


def gram(matrix: torch.Tensor) -> torch.Tensor:
    """W_gᵀW_g [in, in] of a group matrix, float64."""
    matrix = matrix.double()
    return matrix.T @ matrix


def group_working_set(rows: int, cols: int) -> int:
    """Bytes one worker holds for a group matrix of ``rows`` × ``cols`` (float64): the matrix, the left factor
    (at most the matrix's size), its Gram and the eigendecomposition's eigenvectors and workspace (LAPACK
    syevd: about two more Gram-sized arrays)."""
    return 8 * (2 * rows * cols + 4 * cols * cols)


def each_group(weights, groups: list[list[int]], work, device: torch.device | str = "cpu",
               scale: float | None = None):
    """``work(g, W_g)`` for every group g, in order, W_g its group matrix on ``device`` (divided by ``scale`` when
    given). The group matrices are read here, in order, and worked on by base.factorization_workers one-thread
    workers at a time (base.in_one_thread_workers: two on the 2-core machine at Qwen3-30B-A3B's shapes, one for
    groups whose :func:`group_working_set` is above base.PARALLEL_WORKING_SET, or off the CPU), so at most that
    many groups are held. With one thread per worker, the results do not depend on their number."""
    rows, cols = len(groups[0]) * weights.shape[1], weights.shape[2]
    workers = factorization_workers(group_working_set(rows, cols), device)

    def read(g: int) -> tuple[int, torch.Tensor]:
        matrix = group_matrix(weights, groups[g]).to(device)
        return g, matrix if scale is None else matrix.div_(scale)

    return in_one_thread_workers(len(groups), read, lambda job: work(*job), workers)


def effective_rank(matrix: torch.Tensor, mode: str = "energy") -> float:
    """exp(H(p)) of the normalised spectrum of a group matrix (RFID-MoE Eq. 8–10).

    ``energy``: p_i = σ_i²/Σσ² (the paper), the eigenvalues of the Gram W_gᵀW_g (their absolute error, about
    ε·σ_1², moves each p_i by about ε); ``singular``: p_i = σ_i/Σσ (Roy & Vetterli), from ``svdvals`` (the
    square roots of the Gram's eigenvalues would lose the small σ_i). Zero values (negative eigenvalues of the
    Gram, rounding of zero) are dropped before the logarithm."""
    if mode not in EFFECTIVE_RANK_MODES:
        raise ValueError(f"effective-rank mode must be one of {', '.join(EFFECTIVE_RANK_MODES)}, got {mode!r}")
    if mode == "energy":
        mass = torch.linalg.eigvalsh(gram(matrix))
    else:
        mass = torch.linalg.svdvals(matrix.double())
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
    """W_g ≈ (U_K Σ_K)(V_Kᵀ): returns (left [k·out, K], basis [K, in]) (RFID-MoE Alg. 1 l.17, MoBE init).

    V_K: the eigenvectors of the Gram W_gᵀW_g with the K largest eigenvalues σ_i² (largest first), and
    U_K Σ_K = W_g V_K. A singular pair is defined up to its sign, which LAPACK picks by routine and thread
    count; it is fixed here so that each basis row's entry of largest magnitude is positive (the first such
    entry), making the initialisation the same whichever routine, device or thread count computed it.

    The rule buys reproducibility, not quality. No sign choice starts RFID-MoE's fit (without the residual η, the
    default) better: with A = U_KΣ_K/φ'(0) and φ(x) = x/2 + h(x), h even (SiLU), flipping pair i changes A·φ(B) by
    ∓2·a_i h(b_i)ᵀ, orthogonal to the residual and to the other pairs' terms, so the initial error, in the weights
    or on any input distribution shared by the group's experts, is the same for every choice (tests/test_rfid.py;
    MoBE's initialisation, A = U_KΣ_K with every group's basis mixed, does depend on them). The Adam steps that
    follow do depend on the signs: on the reference model the perplexities of the fitted checkpoints range over
    sign choices by about as much as they differ from LAPACK's (BENCHMARKS.md §12.12)."""
    matrix = matrix.double()
    vectors = torch.linalg.eigh(gram(matrix)).eigenvectors[:, -rank:].flip(1)
    largest = vectors.abs().argmax(dim=0)
    vectors *= vectors[largest, torch.arange(vectors.shape[1], device=vectors.device)].sign()
    return matrix @ vectors, vectors.T.contiguous()
