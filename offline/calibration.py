"""Calibration: text → token windows, and a layer-by-layer pass that collects per-expert statistics.

The pass follows GPTQ / llm-compressor sequential pipelines: the calibration batch goes through the
embedding once (the arguments decoder layer 0 receives are captured, so masks and rotary embeddings are
the model's own), then through one decoder layer at a time. While an MoE layer runs, a hook on its
experts module sees the model's own routing and accumulates that layer's statistics; after the layer,
the caller compresses it and the statistics are dropped. The layers come from a streamed source
(offline/source_model.py): only the hidden states of the calibration set (in RAM; they are not spilled to
disk), one decoder layer and one layer's statistics are alive at any time. Hidden states are propagated
through the *original* layers (as lliai/D2MoE's get_scale does).

With a ``device`` (``compress --device``), the decoder layer, the hidden states going through it and the Gram
accumulation live on that device; the embedding stays on the CPU (its outputs are moved once), and what the
methods receive (counts, routing weights, moments, each Gram) is on the CPU, as the same code computes it there.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm


log = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """The calibration text cannot provide the requested samples."""


def read_calibration_text(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CalibrationError(f"calibration file {path} is not UTF-8 text: {err}") from err


def calibration_windows(tokenizer, text: str, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``num_samples`` random windows of ``seqlen`` tokens from ``text`` (GPTQ's sampling), [N, seqlen]."""
    ids = tokenizer(text, return_tensors="pt").input_ids.reshape(-1)
    if ids.numel() < seqlen + 1:
        raise CalibrationError(
            f"calibration text too short: {ids.numel()} tokens, need at least {seqlen + 1} for --calib-seqlen {seqlen}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (num_samples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds now. The CPU time is this process's, all threads together: on a shared machine it is
    the cost of a phase, and the wall time what the phase took under the machine's load."""
    return time.perf_counter(), time.process_time()


def elapsed(since: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds since ``since``, a :func:`clock` reading."""
    wall, cpu = clock()
    return wall - since[0], cpu - since[1]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _glibc(function: str) -> Callable[..., int] | None:
    """glibc's ``function``, or None off glibc (macOS, musl: nothing to trim or set)."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), function)
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _glibc("malloc_trim")
_MALLOPT = _glibc("mallopt")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
FORWARD_MMAP_THRESHOLD = 128 * 1024
"""Blocks from this size up are mapped (and unmapped when freed) while a decoder layer is built and run: glibc's
initial threshold, the one the first layer's forward runs with in a fresh process."""
COMPUTE_MMAP_THRESHOLD = 32 * 2**20
"""The mmap threshold everywhere else (the methods, the journal): DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, where
glibc's dynamic threshold ends once a block of that size has been mapped and freed (with a trim threshold of
twice that): the most it reached in the later layers before :func:`mapped_large_blocks` (not measured directly:
glibc does not report it)."""


@contextlib.contextmanager
def mapped_large_blocks():
    """Within the block, glibc maps every allocation of FORWARD_MMAP_THRESHOLD or more and returns it when freed;
    afterwards the threshold is COMPUTE_MMAP_THRESHOLD (a no-op off glibc).

    glibc raises its mmap threshold to the size of each mapped block freed (up to 32 MiB), and from then on blocks
    below it come from the heap, whose freed blocks stay resident until trimmed. A compressed layer frees such
    blocks, so the next decoder layer's forward ran with its activations (most below 32 MiB) in the heap and
    peaked higher than the first layer's, where they were mapped: at Qwen3-30B-A3B's shapes, 8 windows of 128
    tokens, 3,657 against 3,513 MiB with whitened-svd and 3,811 against 3,602 with rs, the resident set between
    layers being the same (BENCHMARKS.md §12.17). Each layer's forward runs as the first did; setting the
    threshold ends glibc's adjustment, so the rest of the run is given the values the adjustment reaches.
    It does not stop glibc from serving a block from a free chunk of the heap, which it tries before mapping one:
    where the previous layer's compression left a large heap pinned by live blocks near its top (rs and d2 at those
    shapes), the forward still takes its chunks; memory_model.FORWARD_HEAP_RETAINED counts that."""
    if _MALLOPT is not None:
        _MALLOPT(M_MMAP_THRESHOLD, FORWARD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if _MALLOPT is not None:
            _MALLOPT(M_MMAP_THRESHOLD, COMPUTE_MMAP_THRESHOLD)
            _MALLOPT(M_TRIM_THRESHOLD, 2 * COMPUTE_MMAP_THRESHOLD)


def release_freed_memory() -> None:
    """Give the heap memory freed by the last layer back to the operating system (glibc ``malloc_trim(0)``).

    glibc keeps freed blocks of its heaps (one per thread that allocated: the factorisation's worker threads
    have their own) for reuse, and a freed region below one still in use is never returned by itself. Between
    layers that retained memory is the next layer's float32 copy plus calibration forward landing on top of it:
    at Qwen3-30B-A3B shapes the lowest RSS of a layer rose from 1.6 to 3.3 GiB over 6 layers without it
    (BENCHMARKS.md §12.4). Called after each decoder layer a layer-wise pass frees (the calibration's and the
    Fisher pass's forward, the Fisher backward) and after each MoE layer is compressed; a no-op off glibc."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass
class ActivationMoments:
    """Per expert and intermediate channel j, over its routed tokens, of the routing-weighted intermediate
    A = w·h (RS-MoE Algorithm 1, line 3): Σ A², Σ A⁴ and max |A|; plus the first ``sample_limit`` routed
    inputs of each expert with their routing weights (RS-MoE's ridge fit needs the compressed experts'
    outputs on real tokens, which no Gram determines)."""

    sum_sq: torch.Tensor    # [E, I] float64
    sum_quad: torch.Tensor  # [E, I]
    peak: torch.Tensor      # [E, I]
    sample_limit: int
    inputs: list[list[torch.Tensor]]   # per expert, chunks of routed inputs [n, H] (float32)
    weights: list[list[torch.Tensor]]  # per expert, their routing weights [n] (float64)

    @classmethod
    def zeros(cls, num_experts: int, intermediate: int, sample_limit: int) -> "ActivationMoments":
        def z():
            return torch.zeros(num_experts, intermediate, dtype=torch.float64)

        return cls(z(), z(), z(), sample_limit, [[] for _ in range(num_experts)], [[] for _ in range(num_experts)])

    def add(self, expert: int, inter: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> None:
        a = (inter * weights[:, None]).abs()
        self.sum_sq[expert] += (a**2).sum(0)
        self.sum_quad[expert] += (a**4).sum(0)
        self.peak[expert] = torch.maximum(self.peak[expert], a.max(0).values)
        room = self.sample_limit - sum(len(c) for c in self.weights[expert])
        if room > 0:
            self.inputs[expert].append(x[:room].float())
            self.weights[expert].append(weights[:room])

    def samples(self, expert: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept routed inputs [n, H] (float64) of ``expert`` and their routing weights [n]."""
        if not self.weights[expert]:
            return torch.zeros(0, hidden, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        return torch.cat(self.inputs[expert]).double(), torch.cat(self.weights[expert])


@dataclass
class RoutedBatch:
    """What an MoE layer's experts module received for one calibration batch, grouped by expert: the inputs
    ``hidden`` [T, H] and, per expert e, its routed token indices ``tokens[starts[e]:starts[e] + counts[e]]``."""

    hidden: torch.Tensor
    tokens: torch.Tensor
    counts: list[int]
    starts: list[int]

    def inputs(self, expert: int) -> torch.Tensor:
        """Expert ``expert``'s routed inputs in this batch, [n, H] float32."""
        start = self.starts[expert]
        return self.hidden[self.tokens[start : start + self.counts[expert]]].float()


def intermediate(gate_up: torch.Tensor, act_fn, x: torch.Tensor) -> torch.Tensor:
    """act(x W_gateᵀ) ⊙ x W_upᵀ for one expert's fused ``gate_up`` [2I, H] (gate rows first), float64."""
    gate, up = (x @ gate_up.float().T).chunk(2, dim=-1)
    return (act_fn(gate) * up).double()


class ExpertGrams:
    """One MoE layer's per-expert Grams, computed on demand ``chunk`` experts at a time (float64).

    ``grams[e]`` is Σ over calibration batches of vₑᵀ vₑ, with vₑ expert e's routed inputs (``kind="input"``,
    [H, H]) or its intermediate act(g)·u (``kind="inter"``, [I, I], from ``gate_up(e)``, the expert's fused
    weights). Only the chunk holding the last expert asked for is kept: a pass over a layer's experts costs
    one pass over the cached routed inputs per chunk and [chunk, H, H] memory, whatever the number of experts.
    Each Gram is summed batch by batch in calibration order, so the values do not depend on ``chunk``. The sums
    run on ``device`` (where the batches' inputs and ``gate_up(e)`` are); the chunk is kept on the CPU.
    Float64 stays: the Grams are Cholesky-factorised or eigendecomposed (linalg.py) and are sums of up to
    millions of rank-one terms whose small eigenvalues decide the whitening; float32 would lose them.
    """

    def __init__(self, kind: str, num_experts: int, size: int, batches: list[RoutedBatch], chunk: int,
                 gate_up=None, act_fn=None, device: torch.device | str = "cpu"):
        self.kind, self.num_experts, self.size, self.batches, self.chunk = kind, num_experts, size, batches, chunk
        self.gate_up, self.act_fn, self.device = gate_up, act_fn, torch.device(device)
        self._first, self._cached = -1, None
        self.seconds = (0.0, 0.0)
        """(wall, CPU) seconds spent computing Grams so far (the "statistics" phase of compress.py's log)."""

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, expert: int) -> torch.Tensor:
        first = expert - expert % self.chunk
        if first != self._first:
            self._cached, self._first = None, first  # free the previous chunk before computing the next
            self._cached = self._compute(range(first, min(first + self.chunk, self.num_experts)))
        return self._cached[expert - first]

    def take(self, expert: int) -> torch.Tensor:
        """Expert ``expert``'s Gram for the caller to keep or overwrite: the cached chunk itself when it holds only
        that expert (the chunk is dropped here, so no second copy exists: at Mixtral-8x7B's width one [I, I] Gram
        is 1.5 GiB), else a copy. Asking for that expert again computes its chunk again."""
        gram = self[expert]
        if self._cached.shape[0] > 1:
            return gram.clone()
        self.drop_cached()
        return gram

    def drop_cached(self) -> None:
        """Free the chunk kept for the last expert asked for (asking again computes its chunk again)."""
        self._cached, self._first = None, -1

    @torch.no_grad()
    def _compute(self, experts: range) -> torch.Tensor:
        started = clock()
        grams = self._sum_over_batches(experts).cpu()
        self.seconds = tuple(total + part for total, part in zip(self.seconds, elapsed(started)))
        return grams

    def _sum_over_batches(self, experts: range) -> torch.Tensor:
        grams = torch.zeros(len(experts), self.size, self.size, dtype=torch.float64, device=self.device)
        weights = {e: self.gate_up(e) for e in experts} if self.kind == "inter" else {}
        for batch in self.batches:
            for i, e in enumerate(experts):
                if batch.counts[e] == 0:
                    continue
                x = batch.inputs(e)
                v = intermediate(weights[e], self.act_fn, x) if self.kind == "inter" else x.double()
                grams[i] += v.T @ v
        return grams

    def diagonal(self, dim1: int = 1, dim2: int = 2) -> torch.Tensor:
        """[E, size]: every expert's Gram diagonal (as ``Tensor.diagonal(dim1=1, dim2=2)`` of the stacked Grams)."""
        if (dim1, dim2) != (1, 2):
            raise ValueError("ExpertGrams.diagonal is over each expert's Gram (dim1=1, dim2=2)")
        # a copy of each diagonal: a view would keep its whole chunk alive until the stack is formed
        return torch.stack([self[e].diagonal().clone() for e in range(self.num_experts)])


@dataclass
class ExpertStatistics:
    """Statistics of one MoE layer over the calibration set (float64).

    counts[e]        tokens routed to expert e
    weight_sums[e]   sum of the routing weights those tokens gave e
    input_gram[e]    Xₑᵀ Xₑ over e's routed inputs           [H, H]  (ExpertGrams: computed per chunk of experts)
    inter_gram[e]    Hₑᵀ Hₑ over e's intermediate act(g)·u   [I, I]
    moments          per-channel activation moments (only for methods that ask, e.g. RS-MoE)
    """

    counts: torch.Tensor
    weight_sums: torch.Tensor
    input_gram: torch.Tensor | ExpertGrams
    inter_gram: torch.Tensor | ExpertGrams
    moments: ActivationMoments | None = None
    batches: list[RoutedBatch] | None = None
    calibration_seconds: tuple[float, float] = (0.0, 0.0)
    """(wall, CPU) seconds from the end of the previous MoE layer's step to the end of this layer's forward pass
    (reading the decoder layers in between and running the calibration set through them; run_layerwise)."""

    @property
    def gram_seconds(self) -> tuple[float, float]:
        """(wall, CPU) seconds spent so far computing this layer's Grams (ExpertGrams computes them on demand)."""
        grams = [g.seconds for g in (self.input_gram, self.inter_gram) if isinstance(g, ExpertGrams)]
        return sum(g[0] for g in grams), sum(g[1] for g in grams)

    def drop_cached_grams(self) -> None:
        """Free the chunk of Grams each :class:`ExpertGrams` keeps once the layer's method is done with them (at
        Qwen3-30B-A3B's shapes the input Grams of 16 experts, 0.5 GiB, would otherwise stay until the layer is
        written)."""
        for grams in (self.input_gram, self.inter_gram):
            if isinstance(grams, ExpertGrams):
                grams.drop_cached()

    @classmethod
    def zeros(cls, num_experts: int, hidden: int, intermediate_size: int,
              moment_samples: int | None = None) -> "ExpertStatistics":
        """Zero statistics with dense [E, H, H] / [E, I, I] Gram tensors, to be filled directly (synthetic layers)."""
        f64 = torch.float64
        return cls(
            torch.zeros(num_experts, dtype=torch.int64), torch.zeros(num_experts, dtype=f64),
            torch.zeros(num_experts, hidden, hidden, dtype=f64),
            torch.zeros(num_experts, intermediate_size, intermediate_size, dtype=f64),
            None if moment_samples is None else ActivationMoments.zeros(num_experts, intermediate_size, moment_samples),
        )

    @classmethod
    def collect(cls, num_experts: int, hidden: int, intermediate_size: int, gate_up, moment_samples: int | None = None,
                chunk: int | None = None, device: torch.device | str = "cpu") -> "ExpertStatistics":
        """Empty statistics to :meth:`accumulate` into; the Grams are computed afterwards, ``chunk`` experts at a
        time (all at once when None), from the routed inputs kept per batch and ``gate_up(e)``, expert e's fused
        gate/up weights [2I, H]. ``moment_samples``: also collect :class:`ActivationMoments`, keeping that many
        inputs per expert. ``device``: where the routed inputs arrive and the Grams are summed (``gate_up(e)`` must
        return its weights there); the statistics themselves are kept on the CPU."""
        chunk = num_experts if chunk is None else max(1, min(chunk, num_experts))
        batches: list[RoutedBatch] = []
        return cls(
            torch.zeros(num_experts, dtype=torch.int64), torch.zeros(num_experts, dtype=torch.float64),
            ExpertGrams("input", num_experts, hidden, batches, chunk, device=device),
            ExpertGrams("inter", num_experts, intermediate_size, batches, chunk, gate_up, device=device),
            None if moment_samples is None else ActivationMoments.zeros(num_experts, intermediate_size, moment_samples),
            batches,
        )

    @property
    def frequencies(self) -> list[float]:
        total = max(int(self.counts.sum()), 1)
        return (self.counts.double() / total).tolist()

    def accumulate(self, experts_module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """Hook body: ``experts_module`` is transformers' fused experts (gate_up_proj [E, 2I, H], down_proj).
        Counts, routing weights and moments are summed now; the batch's inputs are kept for the Grams."""
        num_experts = self.counts.numel()
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tokens = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(top_k_index.shape[1])[order]
        weights = top_k_weights.reshape(-1)[order].double().cpu()
        counts = torch.bincount(flat, minlength=num_experts)[:num_experts].cpu()
        self.counts += counts
        counts = counts.tolist()
        starts = [0, *torch.tensor(counts).cumsum(0).tolist()[:-1]]
        batch = RoutedBatch(hidden.detach(), tokens, counts, starts)
        self.batches.append(batch)
        self.inter_gram.act_fn = experts_module.act_fn
        for e, n in enumerate(counts):
            if n == 0:
                continue
            routing = weights[starts[e] : starts[e] + n]
            self.weight_sums[e] += routing.sum()
            if self.moments is not None:
                x = batch.inputs(e)
                inter = intermediate(experts_module.gate_up_proj[e], experts_module.act_fn, x)
                self.moments.add(e, inter.cpu(), x.double().cpu(), routing)


def capture_layer0_inputs(model, batches: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """Run the embedding and capture what decoder layer 0 is called with, per batch (the layers are never
    reached, so they may stay on the ``meta`` device)."""

    class _Stop(Exception):
        pass

    captured = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def call_layer(layer, call: tuple[tuple, dict], hidden: torch.Tensor) -> torch.Tensor:
    """``layer`` on ``hidden`` with the other arguments layer 0 received in ``call`` (mask, rotary...)."""
    args, kwargs = call
    if args:
        args = (hidden, *args[1:])
    else:
        kwargs = {**kwargs, "hidden_states": hidden}
    out = layer(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _to_device(value, device: torch.device | str):
    """``value`` (a captured call: tensors inside tuples, lists and dicts) with every tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _layer0_hidden(call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def forward_layerwise(
    source,
    samples: torch.Tensor,
    batch_size: int,
    after_layer: Callable[[int, list[torch.Tensor]], None],
    *,
    observe: Callable[[int, torch.nn.Module], Callable[[], None] | None] | None = None,
    start_layer: int = 0,
    start_hidden: list[torch.Tensor] | None = None,
    progress: bool = True,
    desc: str = "calibrating layers",
    device: torch.device | str = "cpu",
) -> None:
    """Push ``samples`` [N, L] through ``source`` (offline/source_model.py) one decoder layer at a time.

    Only one decoder layer is materialised at a time. ``observe(index, layer)``, called with each layer
    before the batches go through it, may install hooks and return a function that removes them;
    ``after_layer(index, hidden)`` receives the hidden states leaving layer ``index`` (one tensor per batch)
    after the layer is freed. To resume, pass ``start_layer`` and the hidden states entering it. The layers run on
    ``device``: layer 0's other arguments and the hidden states are moved there once (``after_layer`` receives
    them there).
    """
    calls = [_to_device(c, device) for c in capture_layer0_inputs(source.model, list(samples.split(batch_size)))]
    hidden = start_hidden if start_hidden is not None else [_layer0_hidden(c) for c in calls]
    if len(hidden) != len(calls):
        raise ValueError(f"{len(hidden)} hidden-state batches to resume from, expected {len(calls)}")
    hidden = [h.to(device) for h in hidden]
    total = source.num_layers
    for index in tqdm(range(start_layer, total), desc=desc, unit="layer", disable=not progress,
                      initial=start_layer, total=total):
        with mapped_large_blocks():  # the layer and its forward's activations mapped, as in a fresh process
            with source.layer(index, device) as layer:
                remove = observe(index, layer) if observe is not None else None
                try:
                    for b, call in enumerate(calls):
                        hidden[b] = call_layer(layer, call, hidden[b])
                finally:
                    if remove is not None:
                        remove()
            del layer  # the layer's weights are freed before the caller compresses it
        release_freed_memory()  # and their heap returned, so that the next layer's float32 copy does not land on top
        after_layer(index, hidden)


def run_layerwise(
    source,
    moe_layers: dict[int, tuple[int, int, int]],
    samples: torch.Tensor,
    batch_size: int,
    on_moe_layer: Callable[[int, ExpertStatistics, list[torch.Tensor]], None],
    progress: bool = True,
    moment_samples: int | None = None,
    *,
    start_layer: int = 0,
    start_hidden: list[torch.Tensor] | None = None,
    expert_chunk: int | None = None,
    device: torch.device | str = "cpu",
) -> None:
    """Calibrate: :func:`forward_layerwise` with a hook on every MoE layer's experts collecting its statistics.

    ``moe_layers[L] = (num_experts, hidden, intermediate)``; after MoE layer L has seen every batch (and has
    been freed), ``on_moe_layer(L, stats, hidden)`` is called (compress and write it there) with the hidden
    states leaving layer L. ``moment_samples``, ``expert_chunk``: see :meth:`ExpertStatistics.collect` (the
    experts' gate/up weights for the intermediate Grams are read back from ``source`` per chunk). ``device``: where
    the layers run and the Grams are summed (:func:`forward_layerwise`, :meth:`ExpertStatistics.collect`).
    """
    current: dict[int, ExpertStatistics] = {}
    step_started = [clock()]  # end of the previous MoE layer's step

    def observe(index: int, layer) -> Callable[[], None] | None:
        if index not in moe_layers:
            return None
        stats = current[index] = ExpertStatistics.collect(
            *moe_layers[index], lambda e: source.fused_gate_up(index, e).to(device), moment_samples, expert_chunk,
            device)
        return layer.mlp.experts.register_forward_pre_hook(lambda module, args: stats.accumulate(module, *args)).remove

    def after_layer(index: int, hidden: list[torch.Tensor]) -> None:
        if index in current:
            stats = current.pop(index)
            stats.calibration_seconds = elapsed(step_started[0])
            on_moe_layer(index, stats, hidden)
            del stats
            release_freed_memory()
            log.info("layer %d done; peak RSS %.1f MiB", index, peak_rss_bytes() / 2**20)
            step_started[0] = clock()

    forward_layerwise(source, samples, batch_size, after_layer, observe=observe, start_layer=start_layer,
                      start_hidden=start_hidden, progress=progress, device=device)
