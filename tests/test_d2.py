"""D²-MoE layer compression on constructed inputs where the answer is known."""

import torch

from vllm_moe_compress.offline.budget import LayerShape
from vllm_moe_compress.offline.calibration import ExpertStatistics
from vllm_moe_compress.offline.methods.base import LayerInputs
from vllm_moe_compress.offline.methods.d2 import D2MoE, D2Options, merge_base

E, H, I = 6, 20, 12


def synthetic_layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weights = {
        "gate": torch.randn(E, I, H, generator=g, dtype=torch.float64),
        "up": torch.randn(E, I, H, generator=g, dtype=torch.float64),
        "down": torch.randn(E, H, I, generator=g, dtype=torch.float64),
    }
    stats = ExpertStatistics.zeros(E, H, I)
    for e in range(E):
        x = torch.randn(50 + 10 * e, H, generator=g, dtype=torch.float64)
        h = torch.randn(50 + 10 * e, I, generator=g, dtype=torch.float64)
        stats.counts[e] = x.shape[0]
        stats.input_gram[e] = x.T @ x
        stats.inter_gram[e] = h.T @ h
    return weights, stats


def test_fisher_merge_equals_mean_under_uniform_fisher():
    weights, _ = synthetic_layer()
    mean = weights["gate"].mean(0)
    torch.testing.assert_close(merge_base(weights["gate"], torch.full((E,), 3.5, dtype=torch.float64)), mean)
    torch.testing.assert_close(merge_base(weights["gate"], torch.full_like(weights["gate"], 0.2)), mean)


def test_fisher_merge_weights_experts():
    weights, _ = synthetic_layer()
    importance = torch.zeros(E, dtype=torch.float64)
    importance[2] = 1.0
    torch.testing.assert_close(merge_base(weights["down"], importance), weights["down"][2])
    # all-zero importance falls back to the mean instead of dividing by zero
    torch.testing.assert_close(merge_base(weights["down"], torch.zeros(E, dtype=torch.float64)), weights["down"].mean(0))


def test_full_rank_without_pruning_reconstructs_every_expert():
    weights, stats = synthetic_layer()
    shape = LayerShape(E, H, I)
    method = D2MoE(D2Options(merge="frequency", base_prune=0.0))
    layer = method.compress_layer(LayerInputs(weights, stats, None, budget=10**9, shape=shape)).layer
    assert layer.base_channels.tolist() == list(range(I))
    # the layer holds float32 bases and factors (what is stored is float32 at most): exact to float32 rounding
    assert all(b.dtype == torch.float32 for b in layer.base.values())
    assert all(f.dtype == torch.float32 for p in layer.factors for uv in layer.factors[p] for f in uv)
    for e in range(E):
        for p in ("gate", "up", "down"):
            scale = weights[p][e].abs().max().item()
            torch.testing.assert_close(layer.dense_weight(e, p), weights[p][e], rtol=0, atol=1e-6 * scale)


def test_static_pruning_drops_the_lowest_eq9_channels():
    weights, stats = synthetic_layer()
    stats.inter_gram[:, 3, :] = 0.0  # channel 3 never active: C_3 = 0
    stats.inter_gram[:, :, 3] = 0.0
    shape = LayerShape(E, H, I)
    method = D2MoE(D2Options(merge="mean", base_prune=2 / I * 2))  # static half removes 2 channels
    layer = method.compress_layer(LayerInputs(weights, stats, None, budget=10**9, shape=shape)).layer
    kept = layer.base_channels.tolist()
    assert len(kept) == I - 2 and 3 not in kept
    base_down = weights["down"].mean(0)
    act = stats.inter_gram.diagonal(dim1=1, dim2=2).sum(0).sqrt()
    expected_drop = set(torch.argsort(base_down.norm(dim=0) * act)[:2].tolist())
    assert set(range(I)) - set(kept) == expected_drop
    assert method.fixed_params(shape) == 3 * H * (I - 2)
    assert layer.num_params() == method.fixed_params(shape) + sum(layer.ranks()["gate"]) * 3 * (H + I)


def test_trimming_removes_deltas_of_least_routed_experts():
    weights, stats = synthetic_layer()  # expert 0 is the least routed, then 1
    method = D2MoE(D2Options(merge="mean", base_prune=0.0, trim_experts=2))
    layer = method.compress_layer(LayerInputs(weights, stats, None, budget=10**9, shape=LayerShape(E, H, I))).layer
    ranks = layer.ranks()["down"]
    assert ranks[:2] == [0, 0] and all(r == min(H, I) for r in ranks[2:])
    torch.testing.assert_close(layer.dense_weight(0, "down"), weights["down"].mean(0))


def test_merge_base_per_expert_importance_is_the_elementwise_formula_bit_for_bit():
    """The one-number denominator for [E] importance gives exactly Eq. 5 with the denominator summed per element."""
    weights, _ = synthetic_layer()
    g = torch.Generator().manual_seed(15)
    for importance in (torch.rand(E, generator=g, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)):
        elementwise = importance[:, None, None].expand(weights["up"].shape).contiguous()
        assert torch.equal(merge_base(weights["up"], importance), merge_base(weights["up"], elementwise))
