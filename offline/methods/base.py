"""What every compression method provides, and the per-expert low-rank step they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vllm_moe_compress.format import PROJECTIONS

from ..budget import LayerShape, allocate_ranks
from ..calibration import ExpertStatistics
from ..linalg import low_rank_factors, whitening_factor
from ..options import MethodOptions
from vllm_moe_compress.format.schemes.base import SchemeLayer
from vllm_moe_compress.format.schemes.base_delta import Factors

ExpertWeights = dict[str, torch.Tensor]
"""Canonical projection -> expert weights gate/up [E, I, H], down [E, H, I] (float64): a stacked tensor, or a
source_model.ExpertStack read an expert at a time (``weights[p][e]``, ``len`` and ``shape`` work on both; every
method reads them an expert, or a group of experts, at a time)."""


def expert_weights(experts_module) -> ExpertWeights:
    """Unfuse transformers' ``gate_up_proj [E, 2I, H]`` (gate rows first) and ``down_proj [E, H, I]``."""
    gate_up = experts_module.gate_up_proj.detach().double()
    intermediate = gate_up.shape[1] // 2
    return {"gate": gate_up[:, :intermediate], "up": gate_up[:, intermediate:],
            "down": experts_module.down_proj.detach().double()}


def input_gram(stats: ExpertStatistics, proj: str) -> torch.Tensor:
    """Gram of what ``proj`` multiplies: the expert input for gate/up, the intermediate for down."""
    return stats.inter_gram if proj == "down" else stats.input_gram


def on_cpu(factors: Factors) -> Factors:
    """``factors`` moved to the CPU (the same tensors when they are there already)."""
    return factors[0].cpu(), factors[1].cpu()


def factorize_experts(
    matrices: ExpertWeights, ranks: list[int], stats: ExpertStatistics | None, device: torch.device | str = "cpu"
) -> dict[str, list[Factors | None]]:
    """Rank-rᵢ factors of every expert matrix, whitened by the expert's own input Gram when ``stats``.

    Expert by expert, so each Gram chunk (calibration.ExpertGrams) is computed once, and gate and up share one
    whitening factor of the input Gram. The Cholesky factorisations and decompositions run on ``device`` (each
    expert's matrix and Grams are moved there); the factors are returned on the CPU.

    On the CPU, ``torch.get_num_threads()`` experts are factorised at once, each on one thread. The
    factorisation is many mid-sized LAPACK calls (Cholesky, eigh) whose threads wait on each other when one
    call is split over two: on the loaded 2-core machine that cost several times the CPU time of one thread
    (BENCHMARKS.md §12.3). The inputs of a round of experts are read here, in the calling thread (ExpertGrams and ExpertStack are read
    in order), then factorised in parallel; each expert's result does not depend on the number of threads.
    On another device the experts are factorised one after the other."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    workers = threads if device.type == "cpu" else 1
    factors: dict[str, list[Factors | None]] = {p: [] for p in PROJECTIONS}
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for first in range(0, len(ranks), workers):
                experts = range(first, min(first + workers, len(ranks)))
                # The inputs list is not kept: each expert's inputs are freed once it is factorised.
                inputs = (_expert_inputs(matrices, ranks[e], stats, e, device) for e in experts)
                for result in (pool.map if workers > 1 else map)(_factorize_expert, list(inputs)):
                    for p in PROJECTIONS:
                        factors[p].append(None if result is None else result[p])
    finally:
        torch.set_num_threads(threads)  # torch keeps the workers' setting for threads started later
    return factors


def _expert_inputs(matrices: ExpertWeights, rank: int, stats: ExpertStatistics | None, expert: int,
                   device: torch.device) -> tuple | None:
    """(rank, {projection: matrix}, input Gram, intermediate Gram) of one expert on ``device`` (Grams None without
    ``stats``), or None for rank 0. The Grams are copies, so the chunk they come from is not kept alive."""
    if rank == 0:
        return None
    weights = {p: matrices[p][expert].to(device) for p in PROJECTIONS}
    if stats is None:
        return rank, weights, None, None
    grams = (input_gram(stats, p)[expert].to(device, copy=True) for p in ("gate", "down"))
    return rank, weights, *grams


def _factorize_expert(inputs: tuple | None) -> dict[str, Factors] | None:
    """One expert's factors per projection (CPU) from :func:`_expert_inputs`."""
    if inputs is None:
        return None
    rank, weights, input_gram_, inter_gram = inputs
    whitening = {}
    if input_gram_ is not None:
        whitening["gate"] = whitening["up"] = whitening_factor(input_gram_)
        whitening["down"] = whitening_factor(inter_gram)
    return {p: on_cpu(low_rank_factors(weights[p], rank, whitening.get(p))) for p in PROJECTIONS}


@dataclass
class LayerInputs:
    """Everything a method compresses one MoE layer from."""

    weights: ExpertWeights
    stats: ExpertStatistics
    fisher: dict[str, torch.Tensor] | None
    """Per projection the Fisher importance (fisher.py), when the method ``needs_fisher``; else None."""
    budget: int
    """Rank-dependent parameters the layer may use (budget.py)."""
    shape: LayerShape
    next_weights: ExpertWeights | None = None
    """The next MoE layer's experts when the method ``needs_next_layer`` (None for the last MoE layer)."""
    device: torch.device = torch.device("cpu")
    """Where the method may run its decompositions (``compress --device``); every input above is on the CPU,
    and the layer it returns must be too."""


@dataclass
class LayerResult:
    """A compressed layer and its diagnostics for moe_compress_stats.json (e.g. loss curves)."""

    layer: SchemeLayer
    log: dict = field(default_factory=dict)


class CompressionMethod(ABC):
    """A method compresses one MoE layer at a time, given its calibration statistics and a budget.

    Its settings are one frozen ``Options`` dataclass, defined in the method's module as offline/options.py
    describes (the command line is built from it); everything else a method reports is derived from them, and
    ``compress_layer`` returns its log with the layer, so a method holds no state between layers."""

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(self, options: MethodOptions | None = None):
        if options is not None and type(options) is not self.Options:
            raise TypeError(f"method {self.name} takes {self.Options.__name__}, got {type(options).__name__}")
        self.opts = self.Options() if options is None else options

    @property
    def needs_fisher(self) -> bool:
        """Whether ``LayerInputs.fisher`` is needed (computed before calibration, fisher.py)."""
        return False

    @property
    def needs_next_layer(self) -> bool:
        """Whether ``LayerInputs.next_weights`` is needed."""
        return False

    @property
    def moment_samples(self) -> int | None:
        """When set, calibration also collects ActivationMoments (keeping this many routed inputs per expert)."""
        return None

    @property
    def dynamic_prune_ratio(self) -> float:
        """Fraction of base channels pruned per batch at inference (quantization_config.dynamic_prune_ratio)."""
        return 0.0

    def fixed_params(self, shape: LayerShape) -> int:
        """Parameters the layer stores whatever the ranks (e.g. a shared base)."""
        return 0

    def num_trimmed(self, shape: LayerShape) -> int:
        """Experts per layer that get no factors at all."""
        return 0

    def options(self) -> dict:
        """Method options recorded in quantization_config.method_options."""
        return self.opts.record()

    def layer_budget_weights(self, source, samples, shapes: dict[int, LayerShape], keep_fraction: float,
                             batch_size: int) -> dict[int, float] | None:
        """Relative per-layer budgets (kept fraction of each layer's expert parameters, averaging
        ``keep_fraction``), or None for the even split. Called once with the streamed source model
        (offline/source_model.py) and the calibration windows, before calibration."""
        return None

    def capacity(self, shape: LayerShape) -> int:
        """The most rank-dependent parameters a layer can use (the ratio's lower bound, budget.py)."""
        return (shape.num_experts - self.num_trimmed(shape)) * shape.max_rank * shape.params_per_rank

    def unreachable_hint(self) -> str:
        """Appended to the error for a ratio out of reach (an option that would reach further)."""
        return ""

    def ranks_for(self, budget: int, shape: LayerShape, stats: ExpertStatistics) -> list[int]:
        trimmed = set(torch.argsort(stats.counts, stable=True)[: self.num_trimmed(shape)].tolist())
        return allocate_ranks(budget, shape, stats.frequencies, trimmed)

    @abstractmethod
    def compress_layer(self, inputs: LayerInputs) -> LayerResult:
        """Compress one layer using at most ``inputs.budget`` rank-dependent parameters."""
