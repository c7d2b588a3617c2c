"""MoBE and RFID-MoE on constructed inputs: budget, rank recovery, the projection P, closed-form η, the fit,
the ``basis_residual`` reference forward against float64 dense math, and the checkpoint round trip."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from vllm_moe_compress.format import CompressionInfo, FormatError, LayerSpec
from vllm_moe_compress.format.names import counts_name
from vllm_moe_compress.kernels.residual_hash import bucket_counts, bucket_of, bucket_scales, project_onto_buckets
from vllm_moe_compress.offline.budget import LayerShape
from vllm_moe_compress.offline.calibration import ExpertStatistics
from vllm_moe_compress.offline.compress import CalibrationOptions, build_method, compress_checkpoint
from vllm_moe_compress.offline.loading import load_compressed_model
from vllm_moe_compress.offline.methods.base import LayerInputs, in_one_thread_workers
from vllm_moe_compress.offline.methods.basis_fit import FitOptions, fit_grouped, fit_mixed
from vllm_moe_compress.offline.methods.group_basis import (
    allocate_group_ranks, effective_rank, frequency_groups, index_groups, truncated_group_svd)
import vllm_moe_compress.offline.methods.basis_fit as basis_fit
import vllm_moe_compress.offline.methods.group_basis as group_basis
from vllm_moe_compress.format.schemes.basis_residual import BasisProjection, BasisResidualExperts, BasisResidualLayer
import vllm_moe_compress.kernels.residual_hash as residual_hash

from conftest import CALIBRATION_FILE

H, I = 16, 8


def dense_p(num_positions: int, seed: int, size: int) -> torch.Tensor:
    """P as a dense [D, a] matrix (tests only)."""
    t = torch.arange(num_positions)
    scales = bucket_scales(bucket_counts(num_positions, seed, size))
    p = torch.zeros(num_positions, size, dtype=torch.float64)
    p[t, bucket_of(t, seed, size)] = scales[bucket_of(t, seed, size)]
    return p


# ------------------------------------------------------------------------------------------ the projection P


@pytest.mark.parametrize("num_positions,size,seed", [(600, 18, 0), (2048, 61, 7), (999, 30, 123)])
def test_projection_is_an_isometry(num_positions, size, seed):
    assert (bucket_counts(num_positions, seed, size) > 0).all()  # every column of P is hit at these sizes
    p = dense_p(num_positions, seed, size)
    torch.testing.assert_close(p.T @ p, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-12)
    assert ((p != 0).sum(dim=1) == 1).all()  # one-hot rows


def test_hash_spreads_and_depends_on_seed():
    counts = bucket_counts(100_000, 0, 100)
    assert counts.sum() == 100_000 and counts.min() > 800 and counts.max() < 1200  # mean 1000
    t = torch.arange(1000)
    assert (bucket_of(t, 0, 97) != bucket_of(t, 1, 97)).float().mean() > 0.9


def test_closed_form_eta_minimises_the_residual_error():
    d, a, seed = 900, 27, 3
    r = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = dense_p(d, seed, a)
    eta = project_onto_buckets(r, seed, a, bucket_counts(d, seed, a))
    torch.testing.assert_close(eta, torch.linalg.lstsq(p, r[:, None]).solution[:, 0], rtol=0, atol=1e-10)
    best = (r - p @ eta).norm()
    for _ in range(5):
        assert (r - p @ (eta + 1e-3 * torch.randn(a, dtype=torch.float64))).norm() > best


# ------------------------------------------------------------------------------------------ groups and ranks


def test_frequency_groups_sort_most_routed_first():
    counts = torch.tensor([5, 50, 0, 7, 50, 1, 9, 30])
    assert frequency_groups(counts, 4) == [[1, 4, 7, 6], [3, 0, 5, 2]]
    assert index_groups(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_effective_rank_of_a_flat_spectrum_is_its_rank():
    g = torch.Generator().manual_seed(1)
    for r in (1, 3, 7):
        u = torch.linalg.qr(torch.randn(32, r, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(H, r, generator=g, dtype=torch.float64)).Q
        matrix = 2.5 * u @ v.T
        assert effective_rank(matrix) == pytest.approx(r, rel=1e-9)
        assert effective_rank(matrix, "singular") == pytest.approx(r, rel=1e-9)
    decaying = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    assert 1 < effective_rank(decaying) < effective_rank(decaying, "singular") < 4


def decaying_group_matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A random [rows, cols] matrix with singular values 1 down to 1e-6 (geometric; random singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64)).Q
    return (u * torch.logspace(0, -6, cols, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("seed", range(3))
def test_effective_rank_equals_the_svd_formula(seed):
    """The energy effective rank from the Gram's eigenvalues equals exp(H(σ²/Σσ²)) of the float64 singular
    values, on a spectrum spanning 12 decades of σ² and on an unstructured random matrix."""
    g = torch.Generator().manual_seed(100 + seed)
    for matrix in (decaying_group_matrix(96, 64, seed), torch.randn(80, 48, generator=g, dtype=torch.float64)):
        for mode, mass in (("energy", torch.linalg.svdvals(matrix) ** 2), ("singular", torch.linalg.svdvals(matrix))):
            p = mass / mass.sum()
            assert effective_rank(matrix, mode) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_truncated_group_svd_is_the_float64_svd_with_fixed_signs(seed):
    """(left, basis) from the Gram's eigenvectors equal U_KΣ_K and V_Kᵀ of torch's float64 SVD, each pair's sign
    fixed so that the basis row's largest entry is positive, down to σ_K = 1e-3 σ_1 (the Gram's eigenvectors
    lose about σ_1/σ_K of the SVD's accuracy: still far below the float32 rounding of the fit)."""
    matrix = decaying_group_matrix(96, 64, seed)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    for rank in (1, 7, 32):
        signs = vh[torch.arange(rank), vh[:rank].abs().argmax(dim=1)].sign()
        left, basis = truncated_group_svd(matrix, rank)
        torch.testing.assert_close(basis, vh[:rank] * signs[:, None], rtol=0, atol=1e-10)
        torch.testing.assert_close(left, u[:, :rank] * s[:rank] * signs, rtol=0, atol=1e-12)
        assert (basis[torch.arange(rank), basis.abs().argmax(dim=1)] > 0).all()


def test_rfid_initial_loss_does_not_depend_on_the_signs(monkeypatch):
    """RFID-MoE's initialisation A = U_KΣ_K/φ'(0), B = V_Kᵀ has the same loss whatever the signs of the singular
    pairs (why group_basis.truncated_group_svd may fix them by any rule): flipping pair i changes A·φ(B) by
    ∓2·a_i h(b_i)ᵀ (φ(x) = x/2 + h(x), h even), orthogonal to the residual and to the other pairs' terms.
    The first-order match matters: with A = U_KΣ_K (slope 1) the cross terms do not vanish."""
    g = torch.Generator().manual_seed(12)
    weights = torch.randn(8, I, H, generator=g, dtype=torch.float64)
    groups, ranks = index_groups(8, 4), [5, 3]
    flips = [torch.ones(5, dtype=torch.float64)] + [torch.randint(0, 2, (5,), generator=g).double() * 2 - 1
                                                    for _ in range(4)]

    def initial_losses(slope: float) -> list[float]:
        monkeypatch.setitem(basis_fit.SLOPE_AT_ZERO, "silu", slope)
        losses = []
        for flip in flips:
            def flipped(matrix, rank, flip=flip):
                left, basis = truncated_group_svd(matrix, rank)
                return left * flip[:rank], basis * flip[:rank, None]
            monkeypatch.setattr(basis_fit, "truncated_group_svd", flipped)
            losses.append(fit_grouped(weights, groups, ranks, FitOptions(steps=0)).loss_curve[0])
        return losses

    matched, unmatched = initial_losses(0.5), initial_losses(1.0)
    assert max(matched) - min(matched) < 1e-6 * min(matched)
    assert max(unmatched) - min(unmatched) > 1e-3 * min(unmatched)


@pytest.mark.parametrize("method", ["rfid", "mobe"])
@pytest.mark.parametrize("workers", [2, 3])
def test_groups_on_parallel_workers_equal_one_thread(method, workers, monkeypatch):
    """The effective ranks and initial SVDs of the groups, ``workers`` groups at a time on one-thread workers,
    give the layer of one thread bit for bit, and the caller's thread setting is restored."""
    used = []

    def recorded(count, read, work, workers):
        used.append(workers)
        return in_one_thread_workers(count, read, work, workers)

    monkeypatch.setattr(group_basis, "in_one_thread_workers", recorded)
    shape = LayerShape(12, H, I)
    m = build_method(method, group_size=2, fit_steps=3, factorize_down=True)
    weights, stats = random_layer_inputs(12, seed=21)
    inputs = LayerInputs(weights, stats, None, int(0.4 * m.capacity(shape)), shape)
    names = {"gate": "g", "up": "u", "down": "d"}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = m.compress_layer(inputs).layer.to_tensors("x.", names, torch.float64)
        assert set(used) == {1}
        torch.set_num_threads(workers)
        got = m.compress_layer(inputs).layer.to_tensors("x.", names, torch.float64)
        assert torch.get_num_threads() == workers
    finally:
        torch.set_num_threads(threads)
    assert set(used) == {1, workers}
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("seed", range(20))
def test_group_ranks_spend_the_total_exactly(seed):
    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(1, 40, (1,), generator=g))
    cap = int(torch.randint(1, 30, (1,), generator=g))
    importance = (torch.rand(m, generator=g) ** 4).tolist()  # skewed: floors and caps both bind
    if seed % 5 == 0:
        importance = [0.0] * (m - 1) + [1.0]
    for total in {m, m * cap, int(torch.randint(m, m * cap + 1, (1,), generator=g))}:
        ranks = allocate_group_ranks(total, importance, cap)
        assert sum(ranks) == total and all(1 <= r <= cap for r in ranks)


def test_group_ranks_follow_importance():
    ranks = allocate_group_ranks(100, [0.5, 0.3, 0.15, 0.05], 60)
    assert ranks == [50, 30, 15, 5]
    # group 0 is capped at 5; the other 3 ranks go to the largest shortfall first, alternating
    assert allocate_group_ranks(10, [1.0, 0.0, 0.0], 5) == [5, 3, 2]


def random_layer_inputs(num_experts: int, seed: int, intermediate: int = I):
    g = torch.Generator().manual_seed(seed)
    weights = {p: torch.randn(num_experts, *((H, intermediate) if p == "down" else (intermediate, H)), generator=g,
                              dtype=torch.float64) for p in ("gate", "up", "down")}
    stats = ExpertStatistics.zeros(num_experts, H, intermediate)
    stats.counts = torch.randint(0, 100, (num_experts,), generator=g)
    return weights, stats


@pytest.mark.parametrize("method,n,k,ratio_of_capacity,down", [
    (m, n, k, r, down) for m, (n, k), r, down in itertools.product(
        ("rfid", "mobe"), ((8, 2), (12, 3), (6, 6)), (0.0, 0.37, 0.97), (False, True))
])
def test_layer_uses_its_budget_exactly(method, n, k, ratio_of_capacity, down):
    """num_params == fixed + used with 0 <= budget − used < one rank unit."""
    shape = LayerShape(n, H, I)
    m = build_method(method, group_size=k, fit_steps=0, factorize_down=down)
    budget = int(ratio_of_capacity * m.capacity(shape))
    weights, stats = random_layer_inputs(n, seed=n + k)
    layer = m.compress_layer(LayerInputs(weights, stats, None, budget, shape)).layer
    used = layer.num_params() - m.fixed_params(shape)
    slack = max(m.rank_cost(p, shape) for p in m.factorized)
    assert 0 <= budget - used < slack
    assert sum(layer.params_by_projection().values()) == layer.num_params()


def test_unreachable_ratio_names_the_factorize_down_option(tiny_moe, tmp_path):
    calibration = CalibrationOptions(file=CALIBRATION_FILE, samples=2, seqlen=32, batch_size=2)
    with pytest.raises(ValueError, match=r"reachable ratios are \[.*--factorize-down"):
        compress_checkpoint(tiny_moe("qwen3_moe"), tmp_path / "out", build_method("rfid", residual_fraction=0.03), 0.5,
                            calibration)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ the fit


def test_exactly_low_rank_group_is_recovered():
    """A group whose stacked matrices have rank r gets rank r back exactly (identity φ: plain grouped SVD),
    and with SiLU the fit starts from the first-order match and ends below where it started."""
    g = torch.Generator().manual_seed(2)
    r, k = 3, 4
    weights = torch.cat([(torch.randn(k * I, r, generator=g, dtype=torch.float64)
                          @ torch.randn(r, H, generator=g, dtype=torch.float64)).view(k, I, H) for _ in range(2)])
    groups = index_groups(8, k)
    assert all(effective_rank(weights[grp].reshape(-1, H)) <= r + 1e-9 for grp in groups)
    exact = fit_grouped(weights, groups, [r, r], FitOptions(activation="identity", steps=0))
    for e in range(8):
        torch.testing.assert_close(exact.coefs[e].double() @ exact.bases[e // k].double(), weights[e],
                                   rtol=1e-5, atol=1e-5)  # the fitted factors are float32
    assert exact.loss_curve[0] < 1e-10  # the fit runs in float32
    silu = fit_grouped(weights, groups, [r, r], FitOptions(steps=40, lr=0.01))
    assert min(silu.loss_curve) < silu.loss_curve[0] < 0.1  # scaled MSE: 1 would be no fit at all


def test_mobe_fit_by_groups_follows_the_whole_loss_adam():
    """fit_mixed backpropagates group by group (its target read a group at a time); Adam on the whole loss at
    once (MoBE train.py's loop, written out here from fit_mixed's initialisation, the truncated SVD with its
    signs fixed) follows the same loss curve within float32 rounding."""
    g = torch.Generator().manual_seed(9)
    weights = torch.randn(8, I, 6, generator=g, dtype=torch.float64) @ torch.randn(6, H, generator=g, dtype=torch.float64)
    groups, rank, options = index_groups(8, 4), 4, FitOptions(steps=30, lr=0.01, patience=100)
    scale, target = float(weights.std()), (weights / float(weights.std())).float()
    bases, coefs, logits = torch.zeros(2, rank, H), torch.zeros(8, I, rank), torch.zeros(8, 2)
    for j, group in enumerate(groups):
        left, basis = truncated_group_svd(weights[group].reshape(-1, H), rank)
        bases[j], coefs[group], logits[group, j] = basis.float(), left.view(4, I, rank).float(), 1
    params = [bases.requires_grad_(), coefs.requires_grad_(), logits.requires_grad_()]
    optimizer, want = torch.optim.Adam(params, lr=options.lr), []
    for step in range(options.steps + 1):
        optimizer.zero_grad()
        loss = ((coefs @ F.silu(torch.einsum("em,mri->eri", logits.softmax(dim=1), bases)) - target) ** 2).mean()
        want.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
    got = fit_mixed(weights, groups, rank, options).loss_curve
    assert scale > 0 and want[-1] < 0.5 * want[0]  # a fit that moves
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=0)


def test_mobe_fit_reduces_the_loss_on_average():
    g = torch.Generator().manual_seed(4)
    weights = torch.randn(8, I, 6, generator=g, dtype=torch.float64) @ torch.randn(6, H, generator=g, dtype=torch.float64)
    fit = fit_mixed(weights, index_groups(8, 4), 4, FitOptions(steps=120, lr=0.01, patience=120))
    curve = torch.tensor(fit.loss_curve)
    windows = curve[: len(curve) // 4 * 4].view(4, -1).mean(dim=1)
    assert (windows[1:] < windows[:-1]).all(), windows
    assert curve[fit.best_step] == curve.min() and curve.min() < 0.5 * curve[0]
    assert torch.allclose(fit.mix.sum(dim=1), torch.ones(8, dtype=torch.float64))


def test_residual_lowers_the_loss_and_is_trained_jointly():
    weights, _ = random_layer_inputs(8, seed=5)
    groups, options = index_groups(8, 4), FitOptions(steps=10, lr=0.01, patience=10)
    without = fit_grouped(weights["gate"], groups, [2, 2], options)
    with_residual = fit_grouped(weights["gate"], groups, [2, 2], options, residual_size=64, seed=1)
    assert with_residual.loss_curve[0] < without.loss_curve[0]  # closed-form η at step 0
    assert min(with_residual.loss_curve) < with_residual.loss_curve[0]


# ------------------------------------------------------------------------------------------ reference forward


def random_basis_layer(seed: int, mixed: bool, down_factorized: bool, residual: int) -> BasisResidualLayer:
    g = torch.Generator().manual_seed(seed)
    groups = [[3, 0], [1, 5], [4, 2]]

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) / 2

    factorized = {}
    for p in ("gate", "up", "down") if down_factorized else ("gate", "up"):
        out_dim, in_dim = (H, I) if p == "down" else (I, H)
        basis_ranks = [4, 4, 4] if mixed else [2, 5, 3]
        expert_rank = [basis_ranks[next(j for j, m in enumerate(groups) if e in m)] for e in range(6)]
        factorized[p] = BasisProjection(
            bases=[rnd(r, in_dim) for r in basis_ranks], coefs=[rnd(out_dim, r) for r in expert_rank],
            mix=rnd(6, 3).softmax(dim=1) if mixed else None,
            etas=[rnd(residual) for _ in groups] if residual else None,
        )
    dense = {} if down_factorized else {"down": rnd(6, H, I)}
    return BasisResidualLayer(H, I, groups, "tanh" if mixed else "silu", factorized, dense, residual, seed)


def dense_moe(layer, x, idx, w):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            h = F.silu(layer.dense_weight(e, "gate") @ x[t]) * (layer.dense_weight(e, "up") @ x[t])
            out[t] += w[t, j] * (layer.dense_weight(e, "down") @ h)
    return out


LAYER_KINDS = [(False, False, 0), (False, True, 0), (False, False, 20), (False, True, 20), (True, False, 0),
               (True, True, 0)]


@pytest.mark.parametrize("cached_indices", [True, False], ids=["index-table", "hash-per-call"])
@pytest.mark.parametrize("mixed,down_factorized,residual", LAYER_KINDS)
def test_reference_forward_matches_dense_float64(mixed, down_factorized, residual, cached_indices, monkeypatch):
    monkeypatch.setattr(residual_hash, "CHUNK_ELEMENTS", 40)  # several chunks per expert matrix
    if not cached_indices:
        monkeypatch.setattr(residual_hash, "TABLE_MAX_ENTRIES", 0)
    layer = random_basis_layer(7, mixed, down_factorized, residual)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(30, H, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(5, generator=g)[:2] + 1 for _ in range(30)])  # expert 0 gets no token
    w = torch.rand(30, 2, generator=g, dtype=torch.float64)
    got = BasisResidualExperts(layer)(x, idx, w)
    torch.testing.assert_close(got, dense_moe(layer, x, idx, w), rtol=1e-10, atol=1e-10)
    assert got.abs().max() > 1e-2


def test_residual_term_is_the_hashed_eta():
    layer = random_basis_layer(9, False, False, 20)
    scales = bucket_scales(bucket_counts(2 * I * H, 9, 20))
    e, (group, slot) = 5, layer.group_of[5]
    flat = layer.residual_weight(e, "up").reshape(-1)
    t = slot * I * H + torch.arange(I * H)
    torch.testing.assert_close(flat, layer.factorized["up"].etas[group][bucket_of(t, 9, 20)] * scales[bucket_of(t, 9, 20)])


# ------------------------------------------------------------------------------------------ format


@pytest.mark.parametrize("mixed,down_factorized,residual", LAYER_KINDS)
def test_tensors_round_trip(mixed, down_factorized, residual):
    layer = random_basis_layer(10, mixed, down_factorized, residual)
    names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    tensors = layer.to_tensors("m.experts", names, torch.float64)
    spec = layer.spec(3, "m.experts")
    spec.validate()
    back = BasisResidualLayer.from_tensors(spec, names, tensors.__getitem__)
    for e, p in itertools.product(range(6), ("gate", "up", "down")):
        torch.testing.assert_close(back.dense_weight(e, p), layer.dense_weight(e, p), rtol=0, atol=0)
    assert back.num_params() == layer.num_params() == spec.num_params()
    if residual:
        bad = dict(tensors, **{counts_name("m.experts"): tensors[counts_name("m.experts")].flip(0)})
        with pytest.raises(FormatError, match="residual.counts"):
            BasisResidualLayer.from_tensors(spec, names, bad.__getitem__)


def test_bad_details_are_rejected():
    spec = random_basis_layer(11, False, False, 20).spec(0, "m.experts")
    for key, value in [("groups", [[0, 1], [2, 3], [4, 4]]), ("activation", "relu"), ("mixed", True),
                       ("basis_ranks", {"gate": [2, 5], "up": [4, 4, 4]})]:
        bad = json.loads(json.dumps(spec.to_json()))
        bad["details"][key] = value
        with pytest.raises(FormatError):
            LayerSpec.from_json(bad).validate()


@pytest.mark.parametrize("method,options", [("rfid", {"factorize_down": True, "residual_fraction": 0.03}), ("mobe", {})])
def test_compressed_checkpoint_loads_and_matches_its_stats(tiny_moe, tmp_path, method, options):
    out = tmp_path / method
    calibration = CalibrationOptions(file=CALIBRATION_FILE, samples=4, seqlen=64, batch_size=4)
    info = compress_checkpoint(tiny_moe("qwen3_moe"), out, build_method(method, fit_steps=5, **options), 0.06,
                               calibration, dtype="float32", progress=False)
    assert abs(info.achieved_ratio - 0.06) < 0.005
    stats = json.loads((out / "moe_compress_stats.json").read_text())
    assert info.method_options["gate_up_ratio"] == stats["projection_ratios"]["gate_up"] > 0
    assert all(len(f["loss_curve"]) >= 1 for layer in stats["layers"].values() for f in layer["fit"].values())
    assert CompressionInfo.from_config(json.loads((out / "config.json").read_text())["quantization_config"])
    model = load_compressed_model(out)
    logits = model(torch.tensor([[5, 17, 300, 2]])).logits
    assert torch.isfinite(logits).all()
