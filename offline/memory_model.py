"""The expected peak memory of a compression run, logged before it starts and checked against the machine.

With the source model streamed (offline/source_model.py), Grams computed a chunk of experts at a time
(calibration.ExpertGrams) and expert weights read an expert at a time (source_model.ExpertStack), the peak is
one MoE layer's worth, whatever the depth of the model. Alive for the whole run:

* the embedding and head, in float32;
* the calibration activations: the hidden states of every window (float32), kept twice while an MoE layer
  runs (the states entering it and the inputs its experts received, cached for the Gram passes);
* for methods that collect activation moments (RS-MoE, for its ridge fit), the routed inputs kept per expert
  (calibration.ActivationMoments: at most ``moment_samples`` per expert, float32; one layer's, alive from its
  calibration until it is written);
* for D²-MoE's Fisher, every decoder layer's input for ``--fisher-samples`` windows (offline/fisher.py;
  counted for the whole run, an over-estimate after the Fisher pass).

Then the largest of the phases of each MoE layer, which are never alive together (the layer is freed before
its compression starts; the method's working set, its layer once cast and the last Gram chunks before the cast
tensors are serialised, their heap given back to the OS by calibration.release_freed_memory: kept, glibc would
not reuse it for the serialisation's large buffers, BENCHMARKS.md §12.10):

* **calibration**: one decoder layer's weights in float32, the pages of the checkpoint file that reading
  it mapped (checkpoint_io.RELEASE_BYTES per file the layer is stored in, at most the layer's stored size), and
  what one batch of windows going through the layer holds (:func:`layer_forward_activations`);
* **compression**: the pages of the checkpoint files the method reads the layer's experts from (and, for RS-MoE's
  downstream influence, the next layer's; the same bound per file as above); the per-expert Grams not yet handed
  to a worker (``--expert-chunk`` experts of [H, H] and of [I, I] in float64 when a chunk holds several experts;
  with one expert per chunk the worker takes the chunk itself, counted in its working set; none for the methods
  that read no Gram, ``method.reads_grams``: they are computed only when read); the layer's factors
  as the method holds them (float32: methods.base.factorize_experts and RS-MoE cast each expert's as they are
  formed, and MoBE / RFID-MoE fit in float32); and what the method holds besides (:func:`method_working_set`).
  For svd, whitened-svd and d2 that is one expert's working set per factorisation worker
  (methods.base.expert_working_set: the Gram and its Cholesky factor, then the factor and the expert's matrices;
  one worker when that is above methods.base.PARALLEL_WORKING_SET, else ``torch.get_num_threads()`` workers), and
  for d2 its shared bases.
  RS-MoE, MoBE and RFID-MoE read the layer's experts an expert (or a group of experts) at a time: a few
  expert-sized float64 matrices, plus for RS-MoE's downstream influence one chunk of the next layer's V_in rows
  (float32, rs.NEXT_EXPERT_CHUNK experts) and its products, and for MoBE / RFID-MoE the larger of one
  projection's initialisation (its float32 parameters, and the groups' truncated SVDs in float64 on
  factorisation workers) and its fit (the Adam state: float32 parameters, gradients, two moments and the best
  state, each at most the projection's share of the compressed layer, the two temporaries of its largest
  parameter that Adam's step forms, and one group's target, prediction and error in float32:
  :func:`basis_fit_working_set`);
* **writing**: the factors and their copy in the stored dtype (``--dtype``; none when float32 factors are
  stored as float32, the copy is then the factors themselves);
* **serialisation**: the stored tensors and two copies of the file they make (workdir.commit_layer:
  ``safetensors.torch.save`` builds the file in memory, then copies it into ``bytes``);
* **Fisher backward** (D²-MoE's Fisher pass, before the first layer is compressed): one decoder layer's weights
  in float32 and its mapped pages, as in calibration, and what the layer's backward keeps for one batch of
  ``--fisher-batch-size`` windows (:func:`fisher_backward_activations`).

This is an estimate of the tensors, not of allocator slack (except the heap glibc keeps during a MoBE /
RFID-MoE fit, measured: FIT_HEAP_RETAINED) or the interpreter (a fixed allowance below). Each layer's build and
forward run with glibc's initial mmap threshold (calibration.mapped_large_blocks): before, what a compressed layer
freed raised the threshold and every later layer's forward kept its freed activations in the heap, 144–209 MiB over
the first layer's at Qwen3-30B-A3B's shapes; where the previous layer's compression leaves a large heap pinned
(RS-MoE's), its free chunks still serve the forward, and that heap is counted (FORWARD_HEAP_RETAINED, BENCHMARKS.md
§12.17).
It counts every part as host memory, as a ``--device cpu`` run holds it, and is checked against the available
RAM whatever the device: with ``--device cuda`` the decoder layer, the calibration activations going through
it and the Gram chunk being summed are on the GPU instead (the Grams and factors handed to the methods are
copied back), so the estimate is an upper bound of the host peak there and GPU memory is not checked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil

from vllm_moe_compress.format import PROJECTIONS

from .budget import LayerShape
from .checkpoint_io import RELEASE_BYTES
from .fisher import fisher_batch_size
from .methods.base import expert_working_set, factorization_workers, pass_order
from .methods.basis_method import BasisMethod
from .methods.d2 import D2MoE
from .methods.group_basis import group_working_set
from .methods.rs import NEXT_EXPERT_CHUNK, RSMoE
from .methods.svd import PlainSVD

log = logging.getLogger(__name__)

GIB = 2**30
RUNTIME_ALLOWANCE = GIB // 2
"""Python, torch and transformers themselves (measured: about 0.5 GiB RSS before any tensor is read)."""


class MemoryBudgetError(ValueError):
    """The run's expected peak memory exceeds what the machine has available."""


EXPERT_WORKING_SET = 8
"""Expert-sized float64 matrices RS-MoE, MoBE and RFID-MoE hold at once (an expert's matrix, its whitened
product, the SVD's factors...)."""

FIT_HEAP_RETAINED = 2
"""Freed heap glibc keeps during a MoBE / RFID-MoE fit, in multiples of the projection's float32 parameters.
Measured, not derived: the group-sized tensors of the fit (below glibc's mmap threshold once it has risen to
32 MiB) come from heaps whose freed blocks stay resident; fitting down_proj at Qwen3-30B-A3B's shapes (280 MiB of
parameters, 2 Adam steps) peaked 590-700 MiB higher than with ``MALLOC_MMAP_THRESHOLD_=131072``, which maps
every large block and returns it on free, at about 20 % more CPU time (BENCHMARKS.md §12.16)."""

FORWARD_HEAP_RETAINED = 0.75
"""Freed heap a decoder layer's forward keeps, in multiples of its activations (:func:`layer_forward_activations`),
when the methods' compression of the previous layer has left the heap large. Measured, not derived: each layer's
forward runs with glibc's initial mmap threshold (calibration.mapped_large_blocks), but glibc serves a block from a
free chunk of the heap before it maps one, and RS-MoE's compression of a layer leaves 1.25 GiB of trimmed heap
(0.19 GiB in use) pinned by blocks still alive at its top: at Qwen3-30B-A3B's shapes, 8 windows of 128 tokens, its
layer 1's forward peaked 244 MiB over layer 0's (3,793 against 3,548 MiB; 0.76 x the 320 MiB counted), against
209 MiB before mapped_large_blocks. whitened-svd's heap was given back whole and its layer 1's forward peaked as
layer 0's (144 MiB over it before). Counted for every method; measured at that batch only (blocks of 32 MiB and
more are always mapped, so at larger batches this probably over-counts). BENCHMARKS.md §12.17."""

STORED_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
"""Bytes per element of ``compress --dtype``."""


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int]
    """Alive for the whole run."""
    phases: dict[str, dict[str, int]]
    """Alive in turn, per MoE layer: the peak counts the largest phase."""

    @property
    def total(self) -> int:
        return RUNTIME_ALLOWANCE + sum(self.parts.values()) + max(
            (sum(p.values()) for p in self.phases.values()), default=0)

    def describe(self) -> str:
        def listed(parts: dict[str, int]) -> str:
            return ", ".join(f"{name} {size / GIB:.2f}" for name, size in parts.items())

        phases = "; ".join(f"{phase}: {listed(parts)}" for phase, parts in self.phases.items())
        return f"{listed(self.parts)}; the largest of [{phases}]"


def estimate_peak(ckpt, layout, num_layers: int, method, calibration, expert_chunk: int | None,
                  ratio: float = 0.0, dtype: str = "bfloat16") -> MemoryEstimate:
    """The expected peak (module docstring) of compressing ``layout``'s MoE layers of checkpoint ``ckpt`` at
    ``ratio`` (the compressed tensors are counted as 1 − ratio of the dense experts) into ``dtype``."""
    layer_params, layer_bytes, layer_files = {}, {}, {}
    outer = 0
    for key in ckpt.keys():
        parts = key.split(".")
        if "layers" in parts and parts[parts.index("layers") + 1].isdigit():
            index = int(parts[parts.index("layers") + 1])
            layer_params[index] = layer_params.get(index, 0) + ckpt.numel(key)
            layer_bytes[index] = layer_bytes.get(index, 0) + ckpt.numel(key) * ckpt.dtype(key).itemsize
            layer_files.setdefault(index, set()).add(ckpt.file_of(key))
        else:
            outer += ckpt.numel(key)
    shape = max(layout.shapes.values(), key=lambda s: s.dense_expert_params)
    chunk = shape.num_experts if expert_chunk is None else min(expert_chunk, shape.num_experts)
    tokens = calibration.samples * calibration.seqlen
    parts = {
        "embedding and head (float32)": outer * 4,
        "calibration activations (float32)": 2 * tokens * shape.hidden_size * 4,
    }
    if method.moment_samples is not None:
        kept_inputs = min(tokens * layout.top_k, shape.num_experts * method.moment_samples)
        parts[f"routed inputs kept for the moments, at most {method.moment_samples} per expert (float32)"] = (
            kept_inputs * shape.hidden_size * 4)
    if method.needs_fisher:
        fisher_tokens = min(calibration.fisher_samples, calibration.samples) * calibration.seqlen
        parts["Fisher layer inputs (float32)"] = (num_layers + 1) * fisher_tokens * shape.hidden_size * 4
    factor_bytes = 4  # every method holds float32 factors (module docstring)
    copy_bytes = 0 if factor_bytes == STORED_BYTES[dtype] == 4 else STORED_BYTES[dtype]
    kept = (1 - ratio) * shape.dense_expert_params
    grams = {}
    if chunk > 1 and method.reads_grams:
        grams[f"Grams of {chunk} experts (float64)"] = chunk * (shape.hidden_size**2 + shape.intermediate_size**2) * 8
    mapped = max((min(RELEASE_BYTES * len(layer_files[l]), layer_bytes[l]) for l in layer_files), default=0)
    decoder_layer = {
        "one decoder layer (float32)": max(layer_params.values(), default=0) * 4,
        "mapped checkpoint pages": mapped,
    }
    phases = {
        "calibration": {**decoder_layer, **layer_forward_activations(shape, layout.top_k, calibration)},
        "compression": {
            **grams,
            f"mapped checkpoint pages ({'this and the next layer' if method.needs_next_layer else 'the layer'})":
                mapped * (2 if method.needs_next_layer else 1),
            **({f"compressed layer (float{8 * factor_bytes} factors)": round(kept * factor_bytes),
                **method_working_set(method, shape, ratio)} if not factorizes(method) else
               {**factorization_working_set(shape, method.whitened, round(kept * factor_bytes)), **d2_bases(method, shape)}),
        },
        "writing": {
            f"compressed layer (float{8 * factor_bytes} factors + {dtype} copy)": round(kept * (factor_bytes + copy_bytes)),
        },
        "serialisation": {
            f"compressed layer ({dtype}) + 2 copies of its file": round(kept * 3 * STORED_BYTES[dtype]),
        },
    }
    if method.needs_fisher:
        phases["Fisher backward"] = {**decoder_layer, **fisher_backward_activations(shape, layout.top_k, calibration)}
    return MemoryEstimate(parts, phases)


def layer_forward_activations(shape: LayerShape, top_k: int, calibration) -> dict[str, int]:
    """What one batch of ``--calib-batch-size`` windows going through a decoder layer holds at once
    (calibration.forward_layerwise, no gradient), in float32: per routed token-expert pair (``top_k`` per token)
    the larger of the two halves of transformers' grouped experts forward (integrations/moe.py: the pair's input
    with gate and up, act(gate) and h, 1 hidden- and 4 intermediate-sized vectors; then the input, the expert's
    output, its routing-weighted copy and that copy in token order, 4 hidden-sized); per token the attention
    block's and norms' activations, 8 hidden-sized vectors as in :func:`fisher_backward_activations`. Measured at
    Qwen3-30B-A3B's shapes, 8 windows of 128 tokens: the forward raised the RSS of the loaded layer by 320 MiB
    (BENCHMARKS.md §12.16); this counts 320. Plus the heap the forward keeps after a compressed layer
    (FORWARD_HEAP_RETAINED)."""
    batch = min(calibration.batch_size, calibration.samples)
    h, i = shape.hidden_size, shape.intermediate_size
    per_token = top_k * max(4 * h, h + 4 * i) + 8 * h
    activations = batch * calibration.seqlen * per_token * 4
    return {f"layer forward, {batch} windows of {calibration.seqlen} tokens (float32)": activations,
            f"freed heap the forward keeps after a compressed layer, {FORWARD_HEAP_RETAINED} x its activations":
                round(FORWARD_HEAP_RETAINED * activations)}


def fisher_backward_activations(shape: LayerShape, top_k: int, calibration) -> dict[str, int]:
    """What the Fisher backward (offline/fisher.py) holds for one batch of windows going through a layer, in float32:
    per routed token-expert pair (``top_k`` per token) the kept input, expert output and its weighted copy, and in
    the backward the gradients of that output and of the input (5 hidden-sized vectors), the gate/up projections
    and their gradient, act(gate) and h (6 intermediate-sized); per token the attention block's and norms'
    activations, counted as 8 hidden-sized vectors (the residual stream, the two norms' inputs and outputs, the
    query and attention output: Qwen3-30B-A3B's 32 heads × 128 = 2 H each)."""
    batch = calibration.fisher_batch_size or fisher_batch_size(calibration.seqlen)
    batch = min(batch, calibration.fisher_samples, calibration.samples)
    h, i = shape.hidden_size, shape.intermediate_size
    per_token = top_k * (5 * h + 6 * i) + 8 * h
    return {f"Fisher backward, {batch} windows of {calibration.seqlen} tokens (float32)":
            batch * calibration.seqlen * per_token * 4}


def factorizes(method) -> bool:
    """Whether ``method`` compresses through methods.base.factorize_experts (svd, whitened-svd, d2)."""
    return isinstance(method, (PlainSVD, D2MoE))


def method_working_set(method, shape: LayerShape, ratio: float) -> dict[str, int]:
    """What ``method`` holds while compressing a layer of ``shape``, besides the Grams and its output (module
    docstring): named parts in bytes."""
    h, i = shape.hidden_size, shape.intermediate_size
    if factorizes(method):
        return {**factorization_working_set(shape, method.whitened), **d2_bases(method, shape)}
    parts = {f"{EXPERT_WORKING_SET} expert-sized matrices (float64)": EXPERT_WORKING_SET * h * i * 8}
    if isinstance(method, RSMoE) and method.needs_next_layer:
        parts[f"next layer's V_in for {NEXT_EXPERT_CHUNK} experts and 2 products (float32)"] = (
            NEXT_EXPERT_CHUNK * i * (h + 2 * i) * 4)
    if isinstance(method, BasisMethod):
        parts.update(basis_fit_working_set(method, shape, ratio))
    return parts


def basis_fit_working_set(method: BasisMethod, shape: LayerShape, ratio: float) -> dict[str, int]:
    """MoBE / RFID-MoE fit one projection at a time; the larger of its two steps (methods/basis_fit.py).
    Initialisation: the projection's parameters (float32) and group_basis.each_group's workers, each holding
    group_basis.group_working_set of the largest group matrix (float64; RFID-MoE's effective ranks, before, hold
    less). Fit: the parameters with their gradients, two Adam moments and the best state (float32; the best
    state is copied into one set, basis_fit._adam), the two temporaries of the largest parameter tensor that
    torch's Adam step forms on the CPU (its single-tensor step takes the parameters one at a time and forms
    sqrt(v) and its quotient before the update; :meth:`BasisMethod.largest_parameter`), one group's target,
    prediction and error (float32), and the freed heap glibc keeps meanwhile (FIT_HEAP_RETAINED)."""
    h, i = shape.hidden_size, shape.intermediate_size
    fitted = round((1 - ratio) * shape.num_experts * h * i)
    largest = max(method.largest_parameter(p, shape, fitted) for p in method.factorized)
    k = method.opts.group_size
    held, workers = max((factorization_workers(w) * w, factorization_workers(w))
                        for w in (group_working_set(k * method.dims(p, shape)[0], method.dims(p, shape)[1])
                                  for p in method.factorized))
    initialisation = {
        "one projection's parameters (float32)": fitted * 4,
        f"groups' initialisation: {workers} worker(s)' group matrix, Gram and eigendecomposition (float64)": held,
    }
    fit = {
        "one projection's fit: parameters, gradients, 2 Adam moments, best state (float32)": 5 * fitted * 4,
        "Adam step's 2 temporaries of the largest parameter (float32)": 2 * largest * 4,
        "one group's target, prediction, error (float32)": k * h * i * 3 * 4,
        f"freed heap kept by glibc, {FIT_HEAP_RETAINED} x the parameters": FIT_HEAP_RETAINED * fitted * 4,
    }
    return max(initialisation, fit, key=lambda step: sum(step.values()))


def d2_bases(method, shape: LayerShape) -> dict[str, int]:
    """D²-MoE's shared bases while its deltas are factorised: the pass's group in float64, the others float32."""
    if not isinstance(method, D2MoE):
        return {}
    return {"D²-MoE's bases (the group being factorised in float64, the others float32)":
            2 * shape.hidden_size * shape.intermediate_size * 8}


def factorization_working_set(shape: LayerShape, whitened: bool, factor_bytes: int = 0) -> dict[str, int]:
    """methods.base.factorize_experts on a layer of ``shape``: its largest pass (base.pass_order), one expert's
    working set per worker, plus (``factor_bytes``: the whole layer's factors) the factors held by the pass's end,
    those of its own and of the earlier passes' projections."""
    h, i = shape.hidden_size, shape.intermediate_size
    largest, name, done = 0, "", 0
    for group in pass_order(h, i):
        out, inp = (h, i) if group == ("down",) else (i, h)
        working_set = expert_working_set((out, inp), inp if whitened else None, len(group))
        workers = factorization_workers(working_set)
        done += len(group)
        held = workers * working_set + factor_bytes * done // len(PROJECTIONS)
        if held > largest:
            largest, name = held, f"{'/'.join(group)} pass: {workers} factorisation worker(s) (float64)"
            if factor_bytes:
                name += f" + {done} of {len(PROJECTIONS)} projections' factors (float32)"
    return {name: largest}


def check_memory(estimate: MemoryEstimate, available: int | None = None) -> None:
    """Log the estimate; refuse (one line, naming the options that lower it) when it exceeds ``available``
    (default: the memory the OS reports available now)."""
    available = psutil.virtual_memory().available if available is None else available
    log.info("expected peak memory %.2f GiB (GiB: %s, runtime %.2f); available %.2f GiB",
             estimate.total / GIB, estimate.describe(), RUNTIME_ALLOWANCE / GIB, available / GIB)
    if estimate.total > available:
        largest = max(estimate.parts, key=estimate.parts.get)
        raise MemoryBudgetError(
            f"expected peak memory {estimate.total / GIB:.1f} GiB exceeds the {available / GIB:.1f} GiB available "
            f"(largest part: {largest}, {estimate.parts[largest] / GIB:.1f} GiB); lower --calib-samples or "
            "--expert-chunk, or free memory")
