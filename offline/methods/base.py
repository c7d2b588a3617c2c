"""What every compression method provides, and the per-expert low-rank step they share."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from vllm_moe_compress.format import PROJECTIONS

from ..budget import LayerShape, allocate_ranks
from ..calibration import ExpertStatistics
from ..linalg import low_rank_factors, whitening_factor
from ..schemes.base import SchemeLayer
from ..schemes.base_delta import Factors

ExpertWeights = dict[str, torch.Tensor]
"""Canonical projection -> stacked expert weights: gate/up [E, I, H], down [E, H, I] (float64)."""


def expert_weights(experts_module) -> ExpertWeights:
    """Unfuse transformers' ``gate_up_proj [E, 2I, H]`` (gate rows first) and ``down_proj [E, H, I]``."""
    gate_up = experts_module.gate_up_proj.detach().double()
    intermediate = gate_up.shape[1] // 2
    return {"gate": gate_up[:, :intermediate], "up": gate_up[:, intermediate:],
            "down": experts_module.down_proj.detach().double()}


def input_gram(stats: ExpertStatistics, proj: str) -> torch.Tensor:
    """Gram of what ``proj`` multiplies: the expert input for gate/up, the intermediate for down."""
    return stats.inter_gram if proj == "down" else stats.input_gram


def factorize_experts(
    matrices: ExpertWeights, ranks: list[int], stats: ExpertStatistics | None
) -> dict[str, list[Factors | None]]:
    """Rank-rᵢ factors of every expert matrix, whitened by the expert's own input Gram when ``stats``."""
    factors: dict[str, list[Factors | None]] = {}
    for p in PROJECTIONS:
        factors[p] = []
        for e, rank in enumerate(ranks):
            if rank == 0:
                factors[p].append(None)
                continue
            whitening = whitening_factor(input_gram(stats, p)[e]) if stats is not None else None
            factors[p].append(low_rank_factors(matrices[p][e], rank, whitening))
    return factors


class CompressionMethod(ABC):
    """A method compresses one MoE layer at a time, given its calibration statistics and a budget."""

    name: str
    needs_fisher: bool = False
    dynamic_prune_ratio: float = 0.0
    needs_next_layer: bool = False
    """When True, compress_layer also receives ``next_weights``: the next MoE layer's ExpertWeights (None for the last)."""
    moment_samples: int | None = None
    """When set, calibration also collects ActivationMoments (keeping this many routed inputs per expert)."""

    def fixed_params(self, shape: LayerShape) -> int:
        """Parameters the layer stores whatever the ranks (e.g. a shared base)."""
        return 0

    def num_trimmed(self, shape: LayerShape) -> int:
        """Experts per layer that get no factors at all."""
        return 0

    def options(self) -> dict:
        """Method options recorded in quantization_config.method_options."""
        return {}

    def layer_budget_weights(self, source, samples, shapes: dict[int, LayerShape], keep_fraction: float,
                             batch_size: int) -> dict[int, float] | None:
        """Relative per-layer budgets (kept fraction of each layer's expert parameters, averaging
        ``keep_fraction``), or None for the even split. Called once with the streamed source model
        (offline/source_model.py) and the calibration windows, before calibration."""
        return None

    def use_layer_budget_weights(self, weights: dict[int, float] | None) -> None:
        """The per-layer budget weights this run uses: just computed by :meth:`layer_budget_weights`, or read
        back from the journal of an interrupted run (offline/workdir.py). Methods that record them in
        :meth:`options` keep them here."""

    def capacity(self, shape: LayerShape) -> int:
        """The most rank-dependent parameters a layer can use (the ratio's lower bound, budget.py)."""
        return (shape.num_experts - self.num_trimmed(shape)) * shape.max_rank * shape.params_per_rank

    def unreachable_hint(self) -> str:
        """Appended to the error for a ratio out of reach (an option that would reach further)."""
        return ""

    def layer_log(self) -> dict:
        """Diagnostics of the last compressed layer for moe_compress_stats.json (e.g. loss curves)."""
        return {}

    def ranks_for(self, budget: int, shape: LayerShape, stats: ExpertStatistics) -> list[int]:
        trimmed = set(torch.argsort(stats.counts, stable=True)[: self.num_trimmed(shape)].tolist())
        return allocate_ranks(budget, shape, stats.frequencies, trimmed)

    @abstractmethod
    def compress_layer(
        self, weights: ExpertWeights, stats: ExpertStatistics, fisher: dict[str, torch.Tensor] | None,
        budget: int, shape: LayerShape,
    ) -> SchemeLayer:
        """Compress one layer using at most ``budget`` rank-dependent parameters."""
