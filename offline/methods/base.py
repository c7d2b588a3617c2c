"""What every compression method provides, and the per-expert low-rank step they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vllm_moe_compress.format import PROJECTIONS

from ..budget import LayerShape, allocate_ranks
from ..calibration import ExpertGrams, ExpertStatistics
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


def as_stored(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``tensors`` (an expert's factors, or RS-MoE's sparse units) as a layer keeps them until they are written:
    float32, contiguous, on the CPU.

    The checkpoint stores float32 at most, and torch casts float64 to bfloat16 and float16 through float32
    (float64 → float32 → bfloat16 is bit for bit the direct cast: checked in tests/test_factorize_experts.py), so
    casting each expert's factors as soon as they are formed changes no stored byte and halves what a layer
    holds (at Qwen3-30B-A3B's shapes and ratio 0.6, 1.8 GiB of float64 factors become 0.9 GiB)."""
    return tuple(t.to("cpu", torch.float32).contiguous() for t in tensors)


GROUPS = (("gate", "up"), ("down",))
"""Projections factorised in one pass over the experts: those sharing one input Gram (and whitening factor)."""


def pass_order(hidden_size: int, intermediate_size: int) -> tuple[tuple[str, ...], ...]:
    """GROUPS in the order :func:`factorize_experts` runs them: the pass with the larger Gram first (gate/up
    multiply the hidden state, down the intermediate), while few of the layer's factors are held yet. At
    Mixtral-8x7B's shapes the down pass (14336 × 14336 Grams) then runs beside 1/3 of the float32 factors instead
    of 5/6 of them (0.7 instead of 1.75 GiB at ratio 0.6). Each expert's factors do not depend on the order."""
    return GROUPS if hidden_size >= intermediate_size else GROUPS[::-1]


PARALLEL_WORKING_SET = 2**30
"""Experts are factorised in parallel threads only while one expert's working set (:func:`expert_working_set`)
stays below this: above it (Mixtral-8x7B's 14336 × 14336 intermediate Gram: 1.5 GiB, with its Cholesky factor
3 GiB) a second worker's copy would cost more memory than the time it saves is worth (BENCHMARKS.md §12.6)."""


def expert_working_set(matrix_shape: tuple[int, int], gram_size: int | None, projections: int) -> int:
    """Bytes one worker holds to factorise one expert's ``projections`` matrices of ``matrix_shape`` (out, in),
    whitened by a ``gram_size`` × ``gram_size`` Gram (None: plain SVD), all float64 (:class:`_ExpertJob`).

    Whitened: the Gram and its Cholesky factor while the factor is formed; then the factor, the projections'
    matrices (read at once when experts run in parallel), the whitened product W S with its column blocks (two
    matrices of W's size) and the smaller eigenproblem (min(out, in)² twice). Plain: the matrices and the SVD's
    two factor matrices, each at most W's size."""
    out, inp = matrix_shape
    matrices = (projections + 2) * out * inp
    if gram_size is None:
        return 8 * matrices
    gram = gram_size**2
    return 8 * (gram + max(gram, matrices + 2 * min(out, inp) ** 2))


def factorization_workers(working_set: int, device: torch.device | str = "cpu", threads: int | None = None) -> int:
    """Experts factorised at once: ``threads`` (default ``torch.get_num_threads()``) one-thread workers on the CPU
    while an expert's ``working_set`` is below PARALLEL_WORKING_SET, else one (and one on another device)."""
    if torch.device(device).type != "cpu" or working_set >= PARALLEL_WORKING_SET:
        return 1
    return torch.get_num_threads() if threads is None else threads


def factorize_experts(
    matrices: ExpertWeights, ranks: list[int], stats: ExpertStatistics | None, device: torch.device | str = "cpu",
    projections: tuple[str, ...] = PROJECTIONS,
) -> dict[str, list[Factors | None]]:
    """Rank-rᵢ factors of every expert's ``projections`` matrices, whitened by the expert's own input Gram when
    ``stats``, as float32 on the CPU (:func:`as_stored`).

    One pass over the experts per group of projections sharing an input Gram (GROUPS: gate and up share the
    expert input's Gram and its whitening factor, down has the intermediate's; the larger Gram's pass first,
    :func:`pass_order`), so each Gram chunk (calibration.ExpertGrams) is computed once and only one kind of Gram
    is alive at a time. The Cholesky factorisations and decompositions run on ``device`` (each expert's matrices
    and Gram are moved there).

    On the CPU, :func:`factorization_workers` experts are factorised at once, each on one thread. The
    factorisation is many mid-sized LAPACK calls (Cholesky, eigh) whose threads wait on each other when one
    call is split over two: on the loaded 2-core machine that cost several times the CPU time of one thread
    (BENCHMARKS.md §12.3). With several workers, the inputs of a round of experts are read here, in the calling
    thread (ExpertGrams and ExpertStack are read in order), then factorised in parallel; with one, each expert is
    factorised in this thread and reads each input only when it needs it. Each expert's result does not depend
    on the number of workers."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    factors: dict[str, list[Factors | None]] = {p: [] for p in projections}
    try:
        for group in (tuple(p for p in g if p in projections) for g in pass_order(*_layer_sizes(matrices))):
            if not group:
                continue
            grams = None if stats is None else input_gram(stats, group[0])
            shape = tuple(matrices[group[0]].shape[1:])
            working_set = expert_working_set(shape, None if grams is None else shape[1], len(group))
            workers = factorization_workers(working_set, device, threads)
            jobs = [None if rank == 0 else _ExpertJob(matrices, group, rank, grams, e, device)
                    for e, rank in enumerate(ranks)]
            for result in _run(jobs, workers, threads):
                for p in group:
                    factors[p].append(None if result is None else result[p])
    finally:
        torch.set_num_threads(threads)  # torch keeps the workers' setting for threads started later
    return factors


def _layer_sizes(matrices: ExpertWeights) -> tuple[int, int]:
    """(hidden, intermediate) from any projection's [E, out, in] shape (gate/up [E, I, H], down [E, H, I])."""
    proj, stack = next(iter(matrices.items()))
    out, inp = stack.shape[1:]
    return (out, inp) if proj == "down" else (inp, out)


def _run(jobs: list, workers: int, threads: int):
    """Each job's result in order. One worker: in this thread, its Gram read first (summed on this thread's
    ``threads``, as when the inputs are read for parallel workers), then factorised on one thread reading each
    matrix when needed. Several: ``workers`` jobs at a time in one-thread workers, each round's inputs read here
    first. A finished job is dropped, with what it still held."""
    if workers == 1:
        for e in range(len(jobs)):
            job, jobs[e] = jobs[e], None
            if job is None:
                yield None
                continue
            job.prefetch(weights=False)
            torch.set_num_threads(1)  # as the parallel workers: the factors do not depend on the machine's threads
            try:
                yield job.run()
            finally:
                torch.set_num_threads(threads)
        return

    def read(e: int) -> "_ExpertJob | None":
        job, jobs[e] = jobs[e], None
        return None if job is None else job.prefetch()

    yield from in_one_thread_workers(len(jobs), read, lambda job: None if job is None else job.run(), workers)


def in_one_thread_workers(count: int, read, work, workers: int):
    """``work(read(i))`` for i in range(``count``), in order, ``workers`` at a time on one-thread workers (one
    worker: in the calling thread, on its threads). Each round's inputs are read first, in order, in the calling
    thread (ExpertGrams and ExpertStack are read in order), so at most ``workers`` inputs are held. Many mid-sized
    LAPACK calls split over two threads wait on each other (BENCHMARKS.md §12.3), hence one thread per worker.
    The caller's thread count is restored afterwards (torch keeps the workers' setting for threads started
    later)."""
    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for first in range(0, count, workers):
                inputs = [read(i) for i in range(first, min(first + workers, count))]
                yield from (pool.map if workers > 1 else map)(work, inputs)
    finally:
        torch.set_num_threads(threads)


class _ExpertJob:
    """One expert's factorisation of a group of projections sharing an input Gram (:func:`factorize_experts`).

    Each input is dropped as soon as it is used, so a worker holds the Gram and its Cholesky factor, then the
    factor and one matrix at a time (:func:`expert_working_set` counts it). The Gram is the expert's own (taken
    from ExpertGrams, or a copy of a stacked Gram), so it is symmetrised and damped in place. ``prefetch`` reads
    every input now (the calling thread, before the job goes to a worker); otherwise :meth:`run` reads each when
    it needs it."""

    def __init__(self, matrices: ExpertWeights, projections: tuple[str, ...], rank: int, grams, expert: int,
                 device: torch.device):
        self.matrices, self.projections, self.rank, self.grams = matrices, projections, rank, grams
        self.expert, self.device = expert, device
        self.gram: torch.Tensor | None = None
        self.weights: dict[str, torch.Tensor] = {}

    def prefetch(self, weights: bool = True) -> "_ExpertJob":
        """Read the Gram now (and with ``weights`` the matrices), in the calling thread."""
        self.gram = self._read_gram()
        if weights:
            self.weights = {p: self._read(p) for p in self.projections}
        return self

    def _read_gram(self) -> torch.Tensor | None:
        if self.grams is None:
            return None
        gram = self.grams.take(self.expert) if isinstance(self.grams, ExpertGrams) else self.grams[self.expert].clone()
        return gram.to(self.device)

    def _read(self, proj: str) -> torch.Tensor:
        return self.matrices[proj][self.expert].to(self.device)

    def run(self) -> dict[str, Factors]:
        gram, self.gram = (self.gram if self.gram is not None else self._read_gram()), None
        whitening = None if gram is None else whitening_factor(gram, overwrite=True)
        del gram  # the damped Gram, once its factor is formed
        factors = {}
        for p in self.projections:
            weight = self.weights.pop(p) if p in self.weights else self._read(p)
            factors[p] = as_stored(low_rank_factors(weight, self.rank, whitening))
            del weight
        return factors


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
    def reads_grams(self) -> bool:
        """Whether the method reads the per-expert Grams (calibration.ExpertGrams, computed only when read; the
        memory model counts a chunk of them only then)."""
        return True

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
