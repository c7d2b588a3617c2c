"""The expected peak memory of a compression run, logged before it starts and checked against the machine.

With the source model streamed (offline/source_model.py) and Grams computed a chunk of experts at a time
(calibration.ExpertGrams), the peak is one MoE layer's worth, whatever the depth of the model:

* the embedding and head, in float32, alive for the whole run;
* one decoder layer's weights in float32 (during its calibration pass);
* the method's copy of one layer's routed experts in float64 (``source.expert_weights``; RS-MoE also holds
  the next MoE layer's), plus as much again for what a method derives from them (bases, deltas, factors);
* one chunk of per-expert Grams in float64 (``--expert-chunk`` experts of [H, H] and of [I, I]);
* the calibration activations: the hidden states of every window (float32), kept twice while an MoE layer
  runs (the states entering it and the inputs its experts received, cached for the Gram passes);
* for D²-MoE's Fisher, every decoder layer's input for ``--fisher-samples`` windows (offline/fisher.py).

This is an estimate of the tensors, not of allocator slack or the interpreter (a fixed allowance below).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)

GIB = 2**30
RUNTIME_ALLOWANCE = GIB // 2
"""Python, torch and transformers themselves (measured: about 0.5 GiB RSS before any tensor is read)."""


class MemoryBudgetError(ValueError):
    """The run's expected peak memory exceeds what the machine has available."""


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return RUNTIME_ALLOWANCE + sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {size / GIB:.2f}" for name, size in self.parts.items())


def estimate_peak(ckpt, layout, num_layers: int, method, calibration, expert_chunk: int | None) -> MemoryEstimate:
    """The expected peak (module docstring) of compressing ``layout``'s MoE layers of checkpoint ``ckpt``."""
    layer_params = {}
    outer = 0
    for key in ckpt.keys():
        parts = key.split(".")
        if "layers" in parts and parts[parts.index("layers") + 1].isdigit():
            index = int(parts[parts.index("layers") + 1])
            layer_params[index] = layer_params.get(index, 0) + ckpt.numel(key)
        else:
            outer += ckpt.numel(key)
    shape = max(layout.shapes.values(), key=lambda s: s.dense_expert_params)
    experts = shape.dense_expert_params * 8 * (2 if method.needs_next_layer else 1)
    chunk = shape.num_experts if expert_chunk is None else min(expert_chunk, shape.num_experts)
    tokens = calibration.samples * calibration.seqlen
    parts = {
        "embedding and head (float32)": outer * 4,
        "one decoder layer (float32)": max(layer_params.values(), default=0) * 4,
        "routed experts for the method (float64, x2 for derived tensors)": 2 * experts,
        f"Grams of {chunk} experts (float64)": chunk * (shape.hidden_size**2 + shape.intermediate_size**2) * 8,
        "calibration activations (float32)": 2 * tokens * shape.hidden_size * 4,
    }
    if method.needs_fisher:
        fisher_tokens = min(calibration.fisher_samples, calibration.samples) * calibration.seqlen
        parts["Fisher layer inputs (float32)"] = (num_layers + 1) * fisher_tokens * shape.hidden_size * 4
    return MemoryEstimate(parts)


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
