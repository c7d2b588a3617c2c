"""Exact total-parameter accounting and rank allocation."""

import pytest

from vllm_moe_compress.offline.budget import LayerShape, UnreachableRatioError, allocate_ranks, plan_budget


def achieved(total, shapes, target, fixed, frequencies, trimmed=0):
    capacity = {l: (s.num_experts - trimmed) * s.max_rank * s.params_per_rank for l, s in shapes.items()}
    plan = plan_budget(total, shapes, target, fixed, capacity, "m")
    params = 0
    for layer, shape in shapes.items():
        trim = set(range(trimmed))
        ranks = allocate_ranks(plan.layer_budgets[layer], shape, frequencies, trim)
        assert all(r == 0 for e, r in enumerate(ranks) if e in trim)
        params += fixed[layer] + sum(ranks) * shape.params_per_rank
    return plan.achieved_ratio(params)


@pytest.mark.parametrize("target", [0.2, 0.4, 0.6, 0.75])
@pytest.mark.parametrize("with_base", [False, True])
def test_achieved_ratio_within_half_a_point(target, with_base):
    shape = LayerShape(num_experts=32, hidden_size=256, intermediate_size=128)
    shapes = {l: shape for l in range(4)}
    non_expert = 2_900_000
    total = non_expert + 4 * shape.dense_expert_params
    fixed = {l: (3 * 256 * 122 if with_base else 0) for l in shapes}
    freqs = [1.0 / (e + 1) for e in range(32)]
    got = achieved(total, shapes, target, fixed, freqs)
    assert abs(got - target) <= 0.005
    assert got >= target - 1e-12  # never over budget


def test_leftover_ranks_go_to_most_routed_experts():
    shape = LayerShape(num_experts=4, hidden_size=10, intermediate_size=6)
    budget = shape.params_per_rank * (4 * 2 + 2)  # uniform 2, two leftover ranks
    ranks = allocate_ranks(budget, shape, frequencies=[0.1, 0.4, 0.2, 0.3], trimmed=set())
    assert ranks == [2, 3, 2, 3]


def test_ranks_capped_at_full_rank():
    shape = LayerShape(num_experts=2, hidden_size=10, intermediate_size=6)
    assert allocate_ranks(10**9, shape, [0.5, 0.5], set()) == [6, 6]


def test_unreachable_ratio_names_the_range():
    shape = LayerShape(num_experts=8, hidden_size=64, intermediate_size=32)
    total = 100_000 + shape.dense_expert_params
    with pytest.raises(UnreachableRatioError, match=r"reachable ratios are \[0\.\d+, 0\.\d+\]"):
        plan_budget(total, {0: shape}, 0.9, {0: 0}, {0: 8 * shape.max_rank * shape.params_per_rank}, "svd")
    with pytest.raises(UnreachableRatioError, match="in \\(0, 1\\)"):
        plan_budget(total, {0: shape}, 1.0, {0: 0}, {0: 8 * shape.max_rank * shape.params_per_rank}, "svd")
