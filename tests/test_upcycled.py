"""An "upcycled" Mixtral-layout MoE layer (one dense FFN copied into 8 experts, each perturbed), where shared
structure is planted and the answer of every method is predictable from singular-value energies.

The layer error of a method is the calibrated output error of every expert matrix summed over experts and
projections, relative to the outputs themselves: Σ‖(Ŵ_i − W_i) S_i‖²_F / Σ‖W_i S_i‖²_F, S_i the Cholesky
factor of the Gram of what the matrix multiplies (expert i's routed inputs for gate/up, its intermediate for
down). For whitened SVD (SVD-LLM) and for D²-MoE's whitened deltas (Eq. 6–8) with an unpruned base, this
error is exactly the energy of the discarded singular values of W_i S_i, resp. ΔW_i S_i. On an upcycled layer
the deltas carry ε² of the energy, so D²-MoE must beat whitened SVD at equal total parameters by a margin
that these energies predict; on a natively trained model (experts nearly orthogonal) it cannot
(BENCHMARKS.md §11).
"""

import pytest
import torch

from vllm_moe_compress.offline.budget import LayerShape
from vllm_moe_compress.offline.calibration import ExpertStatistics
from vllm_moe_compress.offline.methods.base import LayerInputs, input_gram
from vllm_moe_compress.offline.methods.basis_method import BasisOptions
from vllm_moe_compress.offline.methods.d2 import D2MoE, D2Options
from vllm_moe_compress.offline.methods.mobe import MoBE
from vllm_moe_compress.offline.methods.rfid import RFIDMoE, RFIDOptions
from vllm_moe_compress.offline.methods.svd import WhitenedSVD

E, H, I, TOKENS = 8, 48, 24, 400  # Mixtral layout: 8 experts (top-2 routing only shapes the token counts)
PROJ = ("gate", "up", "down")
EPS = 0.1  # relative size of each expert's perturbation of the shared dense FFN


def upcycled_layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dense = {"gate": torch.randn(I, H, generator=g, dtype=torch.float64),
             "up": torch.randn(I, H, generator=g, dtype=torch.float64),
             "down": torch.randn(H, I, generator=g, dtype=torch.float64)}
    weights = {p: torch.stack([w + EPS * torch.randn(w.shape, generator=g, dtype=torch.float64) for _ in range(E)])
               for p, w in dense.items()}
    stats = ExpertStatistics.zeros(E, H, I)
    mixing = torch.randn(H, H, generator=g, dtype=torch.float64) / H**0.5 + torch.eye(H, dtype=torch.float64)
    for e in range(E):
        n = TOKENS // (e + 1)  # uneven routing, as top-2 routers produce
        x = torch.randn(n, H, generator=g, dtype=torch.float64) @ mixing
        h = torch.nn.functional.silu(x @ weights["gate"][e].T) * (x @ weights["up"][e].T)
        stats.counts[e] = n
        stats.input_gram[e] = x.T @ x
        stats.inter_gram[e] = h.T @ h
    return weights, stats


def whitened_energy(matrices: dict[str, torch.Tensor], stats) -> dict[str, torch.Tensor]:
    """σ² of M_i S_i per projection and expert, descending ([E, min(out, in)])."""
    out = {}
    for p in PROJ:
        grams = input_gram(stats, p)
        out[p] = torch.stack([torch.linalg.svdvals(matrices[p][e] @ torch.linalg.cholesky(grams[e])) ** 2
                              for e in range(E)])
    return out


def layer_error(layer, weights, stats) -> float:
    num = den = 0.0
    for p in PROJ:
        grams = input_gram(stats, p)
        for e in range(E):
            diff = layer.dense_weight(e, p) - weights[p][e]
            num += float(torch.einsum("oi,ij,oj->", diff, grams[e], diff))
            den += float(torch.einsum("oi,ij,oj->", weights[p][e], grams[e], weights[p][e]))
    return num / den


def predicted_error(energy: dict[str, torch.Tensor], ranks: dict[str, list[int]], total: float) -> float:
    return sum(float(energy[p][e, ranks[p][e]:].sum()) for p in PROJ for e in range(E)) / total


@pytest.mark.parametrize("keep", [0.3, 0.5])
def test_d2_beats_whitened_svd_by_the_predicted_margin(keep):
    weights, stats = upcycled_layer()
    shape = LayerShape(E, H, I)
    total = int(keep * shape.dense_expert_params)  # equal total parameters for both methods
    d2 = D2MoE(D2Options(merge="mean", base_prune=0.0))
    d2_layer = d2.compress_layer(LayerInputs(weights, stats, None, total - d2.fixed_params(shape), shape)).layer
    svd_layer = WhitenedSVD().compress_layer(LayerInputs(weights, stats, None, total, shape)).layer
    assert d2_layer.num_params() <= total and svd_layer.num_params() <= total

    full = whitened_energy(weights, stats)
    norm = sum(float(full[p].sum()) for p in PROJ)
    deltas = {p: weights[p] - weights[p].mean(0) for p in PROJ}
    delta_energy = whitened_energy(deltas, stats)
    # Both errors are exactly the discarded whitened energy at the ranks each method stored (Eq. 6–8).
    svd_pred = predicted_error(full, svd_layer.ranks(), norm)
    d2_pred = predicted_error(delta_energy, d2_layer.ranks(), norm)
    svd_err, d2_err = layer_error(svd_layer, weights, stats), layer_error(d2_layer, weights, stats)
    # The layers hold float32 factors (what is stored is float32 at most): rounding each entry by ε moves the
    # normalised error by at most 2·sqrt(error)·ε to first order.
    for err, pred in ((svd_err, svd_pred), (d2_err, d2_pred)):
        assert err == pytest.approx(pred, rel=1e-12, abs=4 * pred**0.5 * torch.finfo(torch.float32).eps)
    # The margin from the energies alone: D² loses at most the deltas' whole energy (≈ ε² of the layer),
    # whitened SVD at least the tail of the experts' spectrum beyond its rank.
    delta_share = sum(float(delta_energy[p].sum()) for p in PROJ) / norm
    assert delta_share < 2 * EPS**2
    assert d2_err <= delta_share
    assert svd_err > 10 * delta_share
    assert d2_err < svd_err / 10


def test_base_pruning_costs_the_pruned_channels_energy_on_an_upcycled_layer():
    """The paper's --base-prune (0.1; our default is 0) drops whole base channels (Eq. 9) after the deltas
    were fitted against the full base; on an upcycled layer the base carries ≈ (1 − ε²) of the energy, so each
    pruned channel costs a share of order 1/I of it (less: Eq. 9 picks the weakest channels) — far more than
    the deltas' truncation."""
    weights, stats = upcycled_layer()
    shape = LayerShape(E, H, I)
    total = int(0.5 * shape.dense_expert_params)
    unpruned, pruned = D2MoE(D2Options(merge="mean", base_prune=0.0)), D2MoE(D2Options(merge="mean", base_prune=0.2))
    err0 = layer_error(unpruned.compress_layer(LayerInputs(weights, stats, None, total - unpruned.fixed_params(shape), shape)).layer,
                       weights, stats)
    err1 = layer_error(pruned.compress_layer(LayerInputs(weights, stats, None, total - pruned.fixed_params(shape), shape)).layer,
                       weights, stats)
    removed = I - pruned.static_channels(shape)
    assert removed == 2
    assert err1 - err0 > 0.25 * removed / I
    assert err1 > 5 * err0


def test_few_experts_two_groups_share_the_planted_structure():
    """8 experts, group size 4 → 2 groups per layer (RFID-MoE's grouping on a Mixtral layout). With φ =
    identity and no fit the group bases are the truncated SVDs of the group matrices, so the gate/up error is
    exactly their discarded energy; because the four members of a group share the dense FFN's row space, a
    basis of rank K_g per group keeps far more than per-expert SVD of the same parameter count."""
    weights, stats = upcycled_layer()
    shape = LayerShape(E, H, I)
    method = RFIDMoE(RFIDOptions(residual_fraction=0.0, fit_steps=0, activation="identity"))
    total = int(0.6 * 2 * E * H * I) + E * H * I  # gate/up 40 % removed, down dense
    layer = method.compress_layer(LayerInputs(weights, stats, None, total - method.fixed_params(shape), shape)).layer
    assert layer.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]  # routing counts fall with the index here
    assert 0 <= total - layer.num_params() < method.rank_cost("gate", shape)
    basis_ranks = layer.spec(0, "x").basis_ranks
    assert set(basis_ranks) == {"gate", "up"}
    svd_rank = (int(0.6 * 2 * E * H * I) // 2) // (E * (H + I))  # per-expert SVD at the same gate/up parameters
    for p in ("gate", "up"):
        ranks = basis_ranks[p]
        assert len(ranks) == 2 and sum(ranks) * (4 * I + H) <= 0.6 * E * I * H and min(ranks) >= 1
        norm = float((weights[p] ** 2).sum())
        got = sum(float(((layer.dense_weight(e, p) - weights[p][e]) ** 2).sum()) for e in range(E)) / norm
        group_tail = sum(float((torch.linalg.svdvals(weights[p][g].reshape(-1, H)) ** 2)[k:].sum())
                         for g, k in zip(layer.groups, ranks)) / norm
        expert_tail = sum(float((torch.linalg.svdvals(weights[p][e]) ** 2)[svd_rank:].sum()) for e in range(E)) / norm
        assert got == pytest.approx(group_tail, rel=1e-8)
        assert got < expert_tail / 2


def test_mobe_runs_on_two_groups():
    weights, stats = upcycled_layer()
    shape = LayerShape(E, H, I)
    method = MoBE(BasisOptions(fit_steps=5))
    total = int(0.6 * 2 * E * H * I) + E * H * I
    layer = method.compress_layer(LayerInputs(weights, stats, None, total - method.fixed_params(shape), shape)).layer
    assert len(layer.spec(0, "x").basis_ranks["gate"]) == 2
    assert 0 <= total - layer.num_params() < method.rank_cost("gate", shape)
