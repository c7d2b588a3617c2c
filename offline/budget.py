"""Exact parameter accounting: turn a target ratio of *total model parameters* removed into ranks.

The ratio is the papers' (D²-MoE: Mixtral 46.7B at 60% → 18.68B): 1 − compressed/original over every
tensor in the checkpoint (embeddings, attention, routers, norms, shared experts included; a tied
lm_head counted once). Only routed experts change, so the expert budget per MoE layer is

    budget = (1 − ratio)·N_total − N_non_expert,    split evenly over MoE layers,

minus each layer's rank-independent cost (a D² base). Within a layer every active expert gets the same
rank (D²-MoE's uniform truncation), and the leftover, smaller than one rank per expert, goes one rank at
a time to the most frequently routed experts, so the achieved total lands within one rank step of the
target (about 0.01 points on the reference model).
"""

from __future__ import annotations

from dataclasses import dataclass


class UnreachableRatioError(ValueError):
    """The method cannot reach the requested ratio on this model."""


@dataclass(frozen=True)
class LayerShape:
    num_experts: int
    hidden_size: int
    intermediate_size: int

    @property
    def dense_expert_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size * self.num_experts

    @property
    def params_per_rank(self) -> int:
        """One rank of one expert across gate, up and down: 3·(H + I)."""
        return 3 * (self.hidden_size + self.intermediate_size)

    @property
    def max_rank(self) -> int:
        return min(self.hidden_size, self.intermediate_size)


@dataclass(frozen=True)
class BudgetPlan:
    total_params: int
    non_expert_params: int
    layer_budgets: dict[int, int]  # MoE layer -> parameters available to its rank-dependent factors
    kept_fraction: float = 1.0  # expert parameters kept over all MoE layers (fixed costs included)

    def achieved_ratio(self, compressed_expert_params: int) -> float:
        return 1.0 - (self.non_expert_params + compressed_expert_params) / self.total_params


def plan_budget(
    total_params: int,
    shapes: dict[int, LayerShape],
    target_ratio: float,
    fixed_params: dict[int, int],
    capacity: dict[int, int],
    method: str,
    hint: str = "",
    layer_weights: dict[int, float] | None = None,
) -> BudgetPlan:
    """Per-layer factor budgets for ``target_ratio``; raises with the reachable range if impossible.

    ``fixed_params[L]`` is what layer L stores regardless of ranks (a base); ``capacity[L]`` the most
    rank-dependent parameters it can use (every active expert at full rank, for per-expert factors).
    ``hint`` is appended to the error (how the method could reach further). ``layer_weights[L]`` (RS-MoE's
    mutual-information allocation) makes layer L's whole share, fixed part included, proportional to
    ``layer_weights[L]`` times its dense expert parameters instead of an even split; the total is unchanged.
    """
    if not 0.0 < target_ratio < 1.0:
        raise UnreachableRatioError(f"ratio must be in (0, 1), got {target_ratio}")
    expert_params = sum(s.dense_expert_params for s in shapes.values())
    non_expert = total_params - expert_params
    floor = non_expert + sum(fixed_params.values())
    ceiling = floor + sum(capacity.values())
    lo = max(0.0, 1.0 - ceiling / total_params)
    hi = 1.0 - floor / total_params
    if not lo - 1e-12 <= target_ratio <= hi:
        raise UnreachableRatioError(
            f"method {method} cannot reach ratio {target_ratio:.4f} on this model: reachable ratios are "
            f"[{lo:.4f}, {hi:.4f}] of total parameters ({non_expert:,} of {total_params:,} are not routed-expert weights)"
            + (f"; {hint}" if hint else "")
        )
    available = (1.0 - target_ratio) * total_params - floor
    kept = (available + sum(fixed_params.values())) / expert_params
    if not layer_weights:
        per_layer = available / len(shapes)
        return BudgetPlan(total_params, non_expert, {l: int(per_layer) for l in shapes}, kept)
    share = {l: layer_weights[l] * s.dense_expert_params for l, s in shapes.items()}
    scale = (available + sum(fixed_params.values())) / sum(share.values())
    budgets = {l: int(share[l] * scale - fixed_params[l]) for l in shapes}
    short = [l for l, b in budgets.items() if b < 0]
    if short:
        raise UnreachableRatioError(
            f"method {method}: the layer allocation leaves MoE layer {short[0]} less than its fixed "
            f"{fixed_params[short[0]]:,} parameters at ratio {target_ratio:.4f}; use a lower ratio or a uniform allocation"
        )
    return BudgetPlan(total_params, non_expert, budgets, kept)


def allocate_ranks(budget: int, shape: LayerShape, frequencies: list[float], trimmed: set[int]) -> list[int]:
    """Uniform rank for active experts, leftover ranks to the most routed ones; trimmed experts get 0."""
    active = [e for e in range(shape.num_experts) if e not in trimmed]
    if not active:
        return [0] * shape.num_experts
    cost = shape.params_per_rank
    uniform = min(shape.max_rank, budget // (cost * len(active)))
    ranks = [0] * shape.num_experts
    for e in active:
        ranks[e] = uniform
    leftover = budget - uniform * cost * len(active)
    for e in sorted(active, key=lambda e: (-frequencies[e], e)):
        if leftover < cost or ranks[e] >= shape.max_rank:
            break
        ranks[e] += 1
        leftover -= cost
    return ranks


@dataclass(frozen=True)
class BudgetPlanner:
    """One run's arguments to :func:`plan_budget`, fixed when the run starts; :meth:`plan` plans with them,
    with a method's per-layer weights (RS-MoE's MI allocation) once those are known."""

    total_params: int
    shapes: dict[int, LayerShape]
    ratio: float
    fixed_params: dict[int, int]
    capacity: dict[int, int]
    method: str
    hint: str = ""

    @classmethod
    def for_method(cls, total_params: int, shapes: dict[int, LayerShape], ratio: float, method) -> "BudgetPlanner":
        """The planner of a compression method (offline/methods/base.py: fixed_params, capacity, hint)."""
        return cls(total_params, shapes, ratio, {l: method.fixed_params(s) for l, s in shapes.items()},
                   {l: method.capacity(s) for l, s in shapes.items()}, method.name, method.unreachable_hint())

    def plan(self, layer_weights: dict[int, float] | None = None) -> BudgetPlan:
        return plan_budget(self.total_params, self.shapes, self.ratio, self.fixed_params, self.capacity,
                           self.method, self.hint, layer_weights)
