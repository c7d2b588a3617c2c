"""What MoBE and RFID-MoE share: which projections are factorised, the budget per projection, the layer they build.

Both factorise gate and up only (down_proj stays dense, as both papers do). On a model whose gate+up are a
small share of all parameters a high total ratio is then out of reach (the reference model: gate+up are 54 %
of the parameters, so at most 0.52 can be removed); ``factorize_down`` also factorises down_proj with the
same model (the "gate/up/down all factorised" MoBE variant of olokevin/moe-compression), which makes
``--ratio 0.6`` reachable there.

A layer's budget (budget.py) is split evenly between the factorised projections (``extra_ranks``). What a projection stores
whatever the budget (its rank-1 floor, MoBE's mixing weights, RFID's residual vectors) is reported as fixed.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch

from vllm_moe_compress.format import PROJECTIONS, matrix_shape

from ..budget import LayerShape
from ..choices import ACTIVATION_NAMES
from ..options import MethodOptions, check_choice, check_positive, option
from ..source_model import stack_experts
from vllm_moe_compress.format.schemes.basis_residual import BasisProjection, BasisResidualLayer
from .base import CompressionMethod, LayerResult
from .basis_fit import FitOptions, FittedProjection
from .group_basis import check_group_size


@dataclass(frozen=True)
class BasisOptions(MethodOptions):
    """MoBE and RFID-MoE options (--method mobe, --method rfid)"""

    group_size: int = option(4, "experts per group k; MoBE uses E/k bases, RFID-MoE E/k groups")
    activation: str = option("silu", "φ applied to the bases (identity = plain grouped SVD, an ablation)",
                             choices=ACTIVATION_NAMES)
    fit_steps: int = option(200, "full-batch Adam steps per projection")
    fit_lr: float = option(0.07, "Adam learning rate on the scaled loss")
    fit_patience: int = option(50, "stop after this many steps without a new best loss; the best state is kept")
    factorize_down: bool = option(False, "factorise down_proj too (default: dense, as the papers); needed for high "
                                  "total ratios")

    def __post_init__(self):
        check_positive(self.group_size, "group size")
        check_choice(self.activation, ACTIVATION_NAMES, "activation")
        if self.fit_steps < 0 or self.fit_patience < 1 or not self.fit_lr > 0:
            raise ValueError(f"need fit_steps >= 0, fit_patience >= 1 and fit_lr > 0, got {self.fit_steps}, "
                             f"{self.fit_patience}, {self.fit_lr}")

    @property
    def factorized(self) -> tuple[str, ...]:
        """The projections replaced by bases; the others stay dense."""
        return ("gate", "up", "down") if self.factorize_down else ("gate", "up")

    def record(self) -> dict:
        return {"group_size": self.group_size, "activation": self.activation, "fit_steps": self.fit_steps,
                "fit_lr": self.fit_lr, "fit_patience": self.fit_patience, "factorized": list(self.factorized)}


class BasisMethod(CompressionMethod):
    """Common options (BasisOptions); subclasses define the per-projection cost model and the fit."""

    Options = BasisOptions

    @property
    def reads_grams(self) -> bool:
        return False  # the fits read the weights (and per-expert routing counts), no Gram

    @property
    def fit(self) -> FitOptions:
        return FitOptions(self.opts.activation, self.opts.fit_steps, self.opts.fit_lr, self.opts.fit_patience)

    @property
    def factorized(self) -> tuple[str, ...]:
        return self.opts.factorized

    def unreachable_hint(self) -> str:
        if "down" in self.factorized:
            return ""
        return "down_proj stays dense; --factorize-down factorises it too and reaches higher ratios"

    def dims(self, proj: str, shape: LayerShape) -> tuple[int, int]:
        return matrix_shape(proj, shape.hidden_size, shape.intermediate_size)

    def max_rank(self, proj: str, shape: LayerShape) -> int:
        """A basis cannot exceed the rank of its group matrix [k·out, in]."""
        out_dim, in_dim = self.dims(proj, shape)
        return min(self.opts.group_size * out_dim, in_dim)

    def num_groups(self, shape: LayerShape) -> int:
        check_group_size(shape.num_experts, self.opts.group_size)
        return shape.num_experts // self.opts.group_size

    @abstractmethod
    def rank_cost(self, proj: str, shape: LayerShape) -> int:
        """Parameters one more unit of rank costs (all groups or bases together)."""

    @abstractmethod
    def floor_params(self, proj: str, shape: LayerShape) -> int:
        """Parameters a factorised projection stores at the smallest rank (1)."""

    @abstractmethod
    def largest_parameter(self, proj: str, shape: LayerShape, params: int) -> int:
        """Elements of the largest tensor the fit of ``proj`` trains when the projection has ``params`` parameters
        (for memory_model: Adam's step forms temporaries of that size)."""

    def fixed_params(self, shape: LayerShape) -> int:
        dense = sum(shape.hidden_size * shape.intermediate_size * shape.num_experts
                    for p in PROJECTIONS if p not in self.factorized)
        return dense + sum(self.floor_params(p, shape) for p in self.factorized)

    def rank_units(self, shape: LayerShape) -> int:
        """Independent ranks per projection: one for MoBE's shared rank, one per group for RFID-MoE."""
        return 1

    def capacity(self, shape: LayerShape) -> int:
        """The most rank-dependent parameters a layer can use (every basis at its maximum rank)."""
        return sum((self.max_rank(p, shape) - 1) * self.rank_units(shape) * self.rank_cost(p, shape)
                   for p in self.factorized)

    def extra_ranks(self, budget: int, shape: LayerShape) -> dict[str, int]:
        """Rank units above the floor per factorised projection: ``budget`` split evenly, a projection that
        cannot use its share (at its maximum rank) passing the rest to the others, then what is left spent
        one unit at a time (cheapest first) while it pays for one; the unspent rest is below one unit."""
        cost = {p: self.rank_cost(p, shape) for p in self.factorized}
        room = {p: (self.max_rank(p, shape) - 1) * self.rank_units(shape) for p in self.factorized}
        units, remaining = {}, budget
        by_capacity = sorted(self.factorized, key=lambda p: room[p] * cost[p])
        for i, p in enumerate(by_capacity):
            units[p] = min(room[p], remaining // (len(by_capacity) - i) // cost[p])
            remaining -= units[p] * cost[p]
        for p in sorted(self.factorized, key=cost.__getitem__):
            extra = min(room[p] - units[p], remaining // cost[p])
            units[p] += extra
            remaining -= extra * cost[p]
        return units

    def build_layer(self, weights, fitted: dict[str, FittedProjection], shape: LayerShape, groups,
                    residual_size: int = 0, seed: int = 0) -> LayerResult:
        """The layer, and its log: per fitted projection the loss curve and the best step."""
        log = {"fit": {p: {"loss_curve": [round(v, 8) for v in f.loss_curve], "best_step": f.best_step}
                       for p, f in fitted.items()}}
        factorized = {p: BasisProjection(f.bases, f.coefs, f.mix, f.etas) for p, f in fitted.items()}
        dense = {p: stack_experts(weights[p], torch.float32) for p in PROJECTIONS if p not in self.factorized}
        layer = BasisResidualLayer(shape.hidden_size, shape.intermediate_size, groups, self.opts.activation,
                                   factorized, dense, residual_size, seed)
        return LayerResult(layer, log)

