"""RS-MoE steps on constructed inputs where the answer is known."""

import json
from unittest.mock import ANY

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vllm_moe_compress.format import STATS_FILE
from vllm_moe_compress.offline.budget import LayerShape, plan_budget
from vllm_moe_compress.offline.calibration import ActivationMoments, ExpertStatistics
from vllm_moe_compress.offline.compress import CalibrationOptions, build_method, compress_checkpoint
from vllm_moe_compress.offline.layer_allocation import MIOptions, mine_estimate, redundancy_scores, solve_save_ratios
from vllm_moe_compress.offline.linalg import eigen_whitened_factors, gram_eigen
from vllm_moe_compress.offline.methods.base import LayerInputs
from vllm_moe_compress.offline.loading import load_compressed_model
from vllm_moe_compress.offline.methods.rs import ACIWeights, RSMoE, RSOptions, aci_scores, downstream_influence, ridge_down_base
from vllm_moe_compress.format.schemes.sparse_lowrank import ExpertUnits, SparseLowRankLayer

from conftest import CALIBRATION_FILE, FAMILIES

E, H, I = 4, 20, 12


def gen(seed):
    return torch.Generator().manual_seed(seed)


def statistics(weights, tokens: int, seed: int, planted=()):
    """Calibration statistics from running ``weights`` on random routed tokens; ``planted`` (expert, channel)
    units get one token with a 50x larger activation."""
    g = gen(seed)
    stats = ExpertStatistics.zeros(E, H, I, moment_samples=tokens)
    for e in range(E):
        x = torch.randn(tokens, H, generator=g, dtype=torch.float64)
        w = torch.rand(tokens, generator=g, dtype=torch.float64) * 0.5 + 0.5
        inter = F.silu(x @ weights["gate"][e].T) * (x @ weights["up"][e].T)
        for pe, pj in planted:
            if pe == e:
                inter[0, pj] = 50 * inter[:, pj].abs().max()
        stats.counts[e] = tokens
        stats.input_gram[e] = x.T @ x
        stats.inter_gram[e] = inter.T @ inter
        stats.moments.add(e, inter, x, w)
    return stats


def test_eigen_whitened_svd_recovers_rank_k_exactly_and_beats_plain_svd_on_output_error():
    g = gen(0)
    exact = torch.randn(9, 3, generator=g, dtype=torch.float64) @ torch.randn(3, H, generator=g, dtype=torch.float64)
    x = torch.randn(200, H, generator=g, dtype=torch.float64) * torch.linspace(0.1, 5, H, dtype=torch.float64)
    com, rec = eigen_whitened_factors(exact, gram_eigen(x.T @ x), 3)
    torch.testing.assert_close(com @ rec, exact, rtol=1e-9, atol=1e-9)
    full = torch.randn(9, H, generator=g, dtype=torch.float64)
    com, rec = eigen_whitened_factors(full, gram_eigen(x.T @ x), 3)
    u, s, vh = torch.linalg.svd(full, full_matrices=False)
    plain = (u[:, :3] * s[:3]) @ vh[:3]
    assert ((full - com @ rec) @ x.T).norm() < ((full - plain) @ x.T).norm()


def test_eigen_whitened_factors_follow_the_papers_formula_in_float64():
    """W_com = U_k S_k, W_rec = V_kᵀ E^{-1/2} Vᵀ from SVD(W V E^{1/2}), E, V = EVD(G) (§3.4), on a rank-deficient
    Gram (fewer tokens than channels: the floored eigenvalues) and on a full one."""
    g = gen(4)
    weight = torch.randn(7, H, generator=g, dtype=torch.float64)
    for tokens in (6, 200):
        x = torch.randn(tokens, H, generator=g, dtype=torch.float64)
        gram = x.T @ x
        evals, evecs = np.linalg.eigh(gram.numpy())
        root = np.sqrt(np.maximum(evals, 1e-10 * evals.max()))
        u, s, vh = np.linalg.svd(weight.numpy() @ (evecs * root), full_matrices=False)
        expected = (u[:, :4] * s[:4]) @ ((vh[:4] / root) @ evecs.T)
        com, rec = eigen_whitened_factors(weight, gram_eigen(gram), 4)
        np.testing.assert_allclose((com @ rec).numpy(), expected, rtol=1e-9, atol=1e-9)


def test_rs_layer_decomposes_each_gram_once(monkeypatch):
    """gate and up of an expert share one EVD of its input Gram; down gets one of its intermediate Gram."""
    import vllm_moe_compress.offline.methods.rs as rs

    weights, _ = sparse_plus_low_rank_layer(2, 2, seed=13)
    stats = statistics(weights, 64, seed=14)
    sizes = []
    monkeypatch.setattr(rs, "gram_eigen", lambda gram: sizes.append(gram.shape[0]) or gram_eigen(gram))
    result = RSMoE(RSOptions(base="none")).compress_layer(
        LayerInputs(weights, stats, None, E * 3 * (H + I) * 3, LayerShape(E, H, I), None))
    with_rank = sum(1 for unit in result.layer.experts if unit.lowrank["gate"] is not None)
    assert with_rank > 0
    assert sizes.count(H) == with_rank and len(sizes) == 2 * with_rank


def test_aci_ranks_a_planted_peak_channel_first():
    g = gen(1)
    down = torch.linalg.qr(torch.randn(H, I, generator=g, dtype=torch.float64)).Q  # unit columns: E_proj = 1
    weights = {"gate": torch.randn(E, I, H, generator=g, dtype=torch.float64),
               "up": torch.randn(E, I, H, generator=g, dtype=torch.float64), "down": down.expand(E, H, I).clone()}
    stats = statistics(weights, 300, seed=2, planted=[(2, 7)])
    scores = aci_scores(weights, stats.moments, stats.counts, weights, ACIWeights())
    assert int(scores.flatten().argmax()) == 2 * I + 7


class OneExpertAtATime:
    """A projection's experts that can only be read one at a time, as source_model.ExpertStack."""

    def __init__(self, stacked: torch.Tensor):
        self.stacked_tensor, self.shape, self.reads = stacked, stacked.shape, 0

    def __len__(self):
        return len(self.stacked_tensor)

    def __getitem__(self, e):
        assert isinstance(e, int), "a method indexed more than one expert"
        self.reads += 1
        return self.stacked_tensor[e].clone()


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_downstream_influence_in_chunks_equals_the_whole_next_layer_formula(chunk):
    """Algorithm 1 l.7–9 in float64 with V_in stacked from all next-layer experts, against the chunked float32
    computation reading experts one at a time (a chunk that does not divide the 5 next experts included)."""
    g = gen(7)
    down = torch.randn(E, H, I, generator=g, dtype=torch.float64)
    next_layer = {p: torch.randn(5, 9, H, generator=g, dtype=torch.float64) for p in ("gate", "up")}
    v_in = ((next_layer["gate"] + next_layer["up"]) / 2).reshape(-1, H)
    want = torch.stack([(down[e].T @ v_in.T).abs() @ v_in.norm(dim=1) for e in range(E)])
    one_at_a_time = {p: OneExpertAtATime(t) for p, t in next_layer.items()}
    got = downstream_influence(OneExpertAtATime(down), one_at_a_time, chunk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert one_at_a_time["gate"].reads == 5  # each next-layer expert read once


def test_rs_layer_reads_experts_one_at_a_time():
    """compress_layer on experts readable one at a time gives the layer it gives on stacked tensors."""
    weights, _ = sparse_plus_low_rank_layer(2, 2, seed=11)
    stats = statistics(weights, 64, seed=12)
    next_weights = {p: w.flip(0).clone() for p, w in weights.items()}
    shape = LayerShape(E, H, I)
    method = RSMoE(RSOptions(base="mean"))
    budget = E * 3 * (H + I) * 3

    def layer(wrap):
        inputs = LayerInputs({p: wrap(w) for p, w in weights.items()}, stats, None, budget, shape,
                             {p: wrap(w) for p, w in next_weights.items()})
        return method.compress_layer(inputs).layer.to_tensors("x.", {"gate": "g", "up": "u", "down": "d"},
                                                             torch.float64)

    stacked, one_at_a_time = layer(lambda w: w), layer(OneExpertAtATime)
    assert stacked.keys() == one_at_a_time.keys()
    assert all(torch.equal(stacked[k], one_at_a_time[k]) for k in stacked)


@pytest.mark.parametrize("workers", [2, 3])
def test_rs_layer_decomposed_in_parallel_threads_equals_one_thread(workers):
    """Experts decomposed ``workers`` at a time (one thread each) give the one-thread layer, bit for bit, and the
    caller's thread setting is restored."""
    weights, _ = sparse_plus_low_rank_layer(2, 2, seed=15)
    stats = statistics(weights, 64, seed=16)
    inputs = LayerInputs(weights, stats, None, E * 3 * (H + I) * 3, LayerShape(E, H, I), None)
    names = {"gate": "g", "up": "u", "down": "d"}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = RSMoE().compress_layer(inputs).layer.to_tensors("x.", names, torch.float64)
        torch.set_num_threads(workers)
        got = RSMoE().compress_layer(inputs).layer.to_tensors("x.", names, torch.float64)
        assert torch.get_num_threads() == workers
    finally:
        torch.set_num_threads(threads)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert any(k.endswith("lowrank_u") for k in expected)  # some experts have low-rank units


def sparse_plus_low_rank_layer(sparse_channels: int, rank: int, seed: int):
    """Experts whose non-sparse units have rank-``rank`` gate, up and down; the sparse units are full-rank."""
    g = gen(seed)
    weights = {p: torch.zeros(E, *((H, I) if p == "down" else (I, H)), dtype=torch.float64) for p in ("gate", "up", "down")}
    planted = []
    for e in range(E):
        perm = torch.randperm(I, generator=g)
        sparse, rest = perm[:sparse_channels], perm[sparse_channels:]
        planted += [(e, int(j)) for j in sparse]
        for p in ("gate", "up"):
            weights[p][e][sparse] = torch.randn(sparse_channels, H, generator=g, dtype=torch.float64)
            weights[p][e][rest] = torch.randn(len(rest), rank, generator=g, dtype=torch.float64) @ torch.randn(
                rank, H, generator=g, dtype=torch.float64)
        weights["down"][e][:, sparse] = torch.randn(H, sparse_channels, generator=g, dtype=torch.float64)
        weights["down"][e][:, rest] = torch.randn(H, rank, generator=g, dtype=torch.float64) @ torch.randn(
            rank, len(rest), generator=g, dtype=torch.float64)
    return weights, planted


@pytest.mark.parametrize("lowrank_svd", ["activation", "plain"])
def test_exactly_sparse_plus_rank_k_layer_is_recovered(lowrank_svd):
    s, k = 3, 2
    weights, planted = sparse_plus_low_rank_layer(s, k, seed=3)
    for e, j in planted:  # the sparse units hold float32 values, as a checkpoint's weights do
        for p in ("gate", "up"):
            weights[p][e][j] = weights[p][e][j].float().double()
        weights["down"][e][:, j] = weights["down"][e][:, j].float().double()
    stats = statistics(weights, 400, seed=4, planted=planted)
    shape = LayerShape(E, H, I)
    sparse_cost = 3 * H * s * E
    budget = sparse_cost + E * 3 * k * (H + I - s)
    method = RSMoE(RSOptions(score="peak", base="none", sparse_share=(sparse_cost + 0.5) / budget, lowrank_share=1.0,
                             lowrank_svd=lowrank_svd))
    layer = method.compress_layer(LayerInputs(weights, stats, None, budget, shape)).layer
    assert layer.num_params() == budget
    assert sorted((e, int(j)) for e, ex in enumerate(layer.experts) for j in ex.sparse_channels) == sorted(planted)
    # The layer holds float32 (what is stored is float32 at most): the sparse units exactly, the rank-k units to
    # the float32 rounding of their factors, at most 2ε·Σ|U||V| per entry to first order.
    eps = torch.finfo(torch.float32).eps
    for e, ex in enumerate(layer.experts):
        for p in ("gate", "up", "down"):
            dense, want = layer.dense_weight(e, p), weights[p][e]
            if p == "down":
                dense, want = dense.T, want.T  # channels as rows
            sparse, medium = ex.sparse_channels, ex.lowrank_channels
            assert ex.sparse[p].dtype == ex.lowrank[p][0].dtype == ex.lowrank[p][1].dtype == torch.float32
            assert torch.equal(dense[sparse], want[sparse])
            u, v = (f.double().abs() for f in ex.lowrank[p])
            bound = 2.5 * eps * ((v.T @ u.T) if p == "down" else (u @ v))
            assert ((dense[medium] - want[medium]).abs() <= bound + 1e-12).all()


def test_layer_spends_its_budget_exactly_and_prunes_the_least_important():
    weights, planted = sparse_plus_low_rank_layer(2, 4, seed=5)
    stats = statistics(weights, 200, seed=6, planted=planted)
    shape = LayerShape(E, H, I)
    budget = shape.dense_expert_params // 3
    layer = RSMoE(RSOptions(base="ridge", lowrank_share=0.5)).compress_layer(
        LayerInputs(weights, stats, None, budget, shape, weights)).layer
    params = layer.num_params() - H * I  # the ridge base is the fixed part
    assert budget - 3 * (H + I) < params <= budget
    counts = layer.counts()
    assert sum(counts["sparse_channels"]) + sum(counts["lowrank_channels"]) < E * I  # some units pruned


def test_ridge_fit_recovers_a_planted_down_base():
    g = gen(7)
    weights = {"gate": torch.randn(E, I, H, generator=g, dtype=torch.float64),
               "up": torch.randn(E, I, H, generator=g, dtype=torch.float64),
               "down": torch.randn(E, H, I, generator=g, dtype=torch.float64)}
    planted = torch.randn(H, I, generator=g, dtype=torch.float64)
    every = torch.arange(I)
    none = {"gate": None, "up": None, "down": None}
    experts = [ExpertUnits(every, {"gate": weights["gate"][e], "up": weights["up"][e],
                                   "down": weights["down"][e] - planted}, every[:0], none) for e in range(E)]
    layer = SparseLowRankLayer(H, I, experts)
    stats = statistics(weights, 100, seed=8)
    torch.testing.assert_close(ridge_down_base(layer, weights, stats.moments, 1e-12), planted, rtol=1e-6, atol=1e-6)


def test_moments_keep_at_most_the_sample_limit():
    moments = ActivationMoments.zeros(2, 3, sample_limit=5)
    for _ in range(3):
        moments.add(1, torch.ones(4, 3), torch.ones(4, 6), torch.full((4,), 0.5))
    x, w = moments.samples(1, 6)
    assert x.shape == (5, 6) and w.shape == (5,)
    assert moments.samples(0, 6)[0].shape == (0, 6)
    torch.testing.assert_close(moments.sum_sq[1], torch.full((3,), 12 * 0.25, dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qp_respects_bounds_and_average_and_orders_by_redundancy(seed):
    rng = np.random.default_rng(seed)
    redundancy = rng.random(8).tolist()
    sizes = [1000] * 8
    options = MIOptions(bound=0.1, smooth=0.0, reg=0.0)
    keep = np.array(solve_save_ratios(redundancy, sizes, 0.55, options))
    assert keep.mean() == pytest.approx(0.55, abs=1e-9)
    assert keep.min() >= 0.45 - 1e-9 and keep.max() <= 0.65 + 1e-9
    order = np.argsort(redundancy)
    assert np.all(np.diff(keep[order]) <= 1e-7)  # more redundant, less kept
    smooth = np.array(solve_save_ratios(redundancy, sizes, 0.55, MIOptions(bound=0.1, smooth=5.0)))
    assert np.abs(np.diff(smooth)).sum() < np.abs(np.diff(keep)).sum()
    assert smooth.mean() == pytest.approx(0.55, abs=1e-9)


def test_qp_weighted_average_with_unequal_layers():
    keep = solve_save_ratios([0.1, 0.9, 0.5], [1, 3, 2], 0.4, MIOptions(bound=0.2))
    assert np.dot(keep, [1, 3, 2]) / 6 == pytest.approx(0.4, abs=1e-9)


def test_redundancy_averages_neighbours():
    assert redundancy_scores([1.0, 3.0]) == [1.0, 2.0, 3.0]


def test_mine_sees_more_information_in_dependent_features():
    g = gen(9)
    a = torch.randn(256, 4, generator=g)
    dependent = mine_estimate(a, a[:, :2] + 0.1 * torch.randn(256, 2, generator=g), MIOptions(steps=200))
    independent = mine_estimate(a, torch.randn(256, 2, generator=g), MIOptions(steps=200))
    assert dependent > 1.0 > independent + 0.5


def test_plan_with_layer_weights_keeps_the_total():
    shape = LayerShape(8, 32, 16)
    shapes = {l: shape for l in range(3)}
    total = 5_000 + 3 * shape.dense_expert_params
    fixed = {l: 512 for l in shapes}
    capacity = {l: 8 * shape.max_rank * shape.params_per_rank for l in shapes}  # 8 experts at full rank
    uniform = plan_budget(total, shapes, 0.4, fixed, capacity, "rs")
    weighted = plan_budget(total, shapes, 0.4, fixed, capacity, "rs",
                           layer_weights={0: 0.6, 1: 0.5, 2: 0.4})
    assert abs(sum(weighted.layer_budgets.values()) - sum(uniform.layer_budgets.values())) <= 3
    assert weighted.layer_budgets[0] > uniform.layer_budgets[1] > weighted.layer_budgets[2]
    ratio = (weighted.layer_budgets[0] + 512) / (weighted.layer_budgets[2] + 512)
    assert ratio == pytest.approx(0.6 / 0.4, rel=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_compresses_to_the_ratio_and_runs(family, tiny_moe, tmp_path):
    calibration = CalibrationOptions(file=CALIBRATION_FILE, samples=4, seqlen=32, batch_size=4)
    method = build_method("rs", mi=MIOptions(steps=50))
    info = compress_checkpoint(tiny_moe(family), tmp_path / "rs", method, 0.05, calibration, dtype="float32",
                               progress=False)
    assert abs(info.achieved_ratio - 0.05) <= 0.005
    assert all(spec.scheme == "sparse_lowrank" for spec in info.layers)
    assert info.method_options == {**RSOptions(mi=MIOptions(steps=50)).record(), "gate_up_ratio": ANY}
    layers = json.loads((tmp_path / "rs" / STATS_FILE).read_text())["layers"]
    keep = [stats["keep_fraction"] for stats in layers.values() if "keep_fraction" in stats]  # MI allocation (§3.5)
    assert (len(keep) == len(layers) and all(0 < k <= 1 for k in keep)) or (keep == [] and len(layers) == 1)
    logits = load_compressed_model(tmp_path / "rs")(torch.tensor([[5, 17, 300, 42]])).logits
    assert torch.isfinite(logits).all()
