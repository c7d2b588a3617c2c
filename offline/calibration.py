"""Calibration: text → token windows, and a layer-by-layer pass that collects per-expert statistics.

The pass follows GPTQ / llm-compressor sequential pipelines: the calibration batch goes through the
embedding once (the arguments decoder layer 0 receives are captured, so masks and rotary embeddings are
the model's own), then through one decoder layer at a time. While an MoE layer runs, a hook on its
experts module sees the model's own routing and accumulates that layer's statistics; after the layer,
the caller compresses it and the statistics are dropped. Only the hidden states of the calibration set
and one layer's statistics are alive at any time. Hidden states are propagated through the *original*
layers (as lliai/D2MoE's get_scale does).
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .architectures import moe_block

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


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
class ExpertStatistics:
    """Statistics of one MoE layer over the calibration set (float64 accumulators).

    counts[e]        tokens routed to expert e
    weight_sums[e]   sum of the routing weights those tokens gave e
    input_gram[e]    Xₑᵀ Xₑ over e's routed inputs           [E, H, H]
    inter_gram[e]    Hₑᵀ Hₑ over e's intermediate act(g)·u   [E, I, I]
    moments          per-channel activation moments (only for methods that ask, e.g. RS-MoE)
    """

    counts: torch.Tensor
    weight_sums: torch.Tensor
    input_gram: torch.Tensor
    inter_gram: torch.Tensor
    moments: ActivationMoments | None = None

    @classmethod
    def zeros(cls, num_experts: int, hidden: int, intermediate: int,
              moment_samples: int | None = None) -> "ExpertStatistics":
        """``moment_samples``: also collect :class:`ActivationMoments`, keeping that many inputs per expert."""
        f64 = torch.float64
        return cls(
            torch.zeros(num_experts, dtype=torch.int64), torch.zeros(num_experts, dtype=f64),
            torch.zeros(num_experts, hidden, hidden, dtype=f64),
            torch.zeros(num_experts, intermediate, intermediate, dtype=f64),
            None if moment_samples is None else ActivationMoments.zeros(num_experts, intermediate, moment_samples),
        )

    @property
    def frequencies(self) -> list[float]:
        total = max(int(self.counts.sum()), 1)
        return (self.counts.double() / total).tolist()

    def accumulate(self, experts_module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """Hook body: ``experts_module`` is transformers' fused experts (gate_up_proj [E, 2I, H], down_proj)."""
        num_experts = self.counts.numel()
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tokens = torch.arange(hidden.shape[0]).repeat_interleave(top_k_index.shape[1])[order]
        weights = top_k_weights.reshape(-1)[order].double()
        counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
        self.counts += counts
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            idx, routing = tokens[start : start + n], weights[start : start + n]
            self.weight_sums[e] += routing.sum()
            start += n
            x = hidden[idx].float()
            gate, up = (x @ experts_module.gate_up_proj[e].float().T).chunk(2, dim=-1)
            inter = (experts_module.act_fn(gate) * up).double()
            x = x.double()
            self.input_gram[e] += x.T @ x
            self.inter_gram[e] += inter.T @ inter
            if self.moments is not None:
                self.moments.add(e, inter, x, routing)


def _capture_layer0_inputs(model, batches: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """Run the embedding and capture what decoder layer 0 is called with, per batch."""

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


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Callable]:
    """The hidden-state argument and a function that rebuilds (args, kwargs) around a new one."""
    if args:
        return args[0], lambda h: ((h, *args[1:]), kwargs)
    return kwargs["hidden_states"], lambda h: (args, {**kwargs, "hidden_states": h})


@torch.no_grad()
def run_layerwise(
    model,
    moe_layers: dict[int, tuple[int, int, int]],
    samples: torch.Tensor,
    batch_size: int,
    on_moe_layer: Callable[[int, ExpertStatistics, list[torch.Tensor]], None],
    progress: bool = True,
    moment_samples: int | None = None,
    *,
    start_layer: int = 0,
    start_hidden: list[torch.Tensor] | None = None,
) -> None:
    """Push ``samples`` [N, L] through ``model`` one decoder layer at a time.

    ``moe_layers[L] = (num_experts, hidden, intermediate)``; after MoE layer L has seen every batch,
    ``on_moe_layer(L, stats, hidden)`` is called (compress and write it there) with the hidden states
    leaving layer L, one tensor per batch. To resume, pass ``start_layer`` and the hidden states entering it
    (``start_hidden``, as ``on_moe_layer`` received them after the layer before). ``moment_samples``: see
    :meth:`ExpertStatistics.zeros`.
    """
    batches = list(samples.split(batch_size))
    calls = _capture_layer0_inputs(model, batches)
    hidden = start_hidden if start_hidden is not None else [_split_hidden(a, k)[0] for a, k in calls]
    if len(hidden) != len(calls):
        raise ValueError(f"{len(hidden)} hidden-state batches to resume from, expected {len(calls)}")
    layers = model.model.layers
    for index in tqdm(range(start_layer, len(layers)), desc="calibrating layers", unit="layer",
                      disable=not progress, initial=start_layer, total=len(layers)):
        stats = handle = None
        if index in moe_layers:
            stats = ExpertStatistics.zeros(*moe_layers[index], moment_samples)
            experts = moe_block(model, index).experts
            handle = experts.register_forward_pre_hook(
                lambda module, args: stats.accumulate(module, *args)
            )
        try:
            for b, (args, kwargs) in enumerate(calls):
                _, rebuild = _split_hidden(args, kwargs)
                call_args, call_kwargs = rebuild(hidden[b])
                out = layers[index](*call_args, **call_kwargs)
                hidden[b] = out[0] if isinstance(out, tuple) else out
        finally:
            if handle is not None:
                handle.remove()
        if stats is not None:
            on_moe_layer(index, stats, hidden)
            log.info("layer %d done; peak RSS %.1f MiB", index, peak_rss_bytes() / 2**20)
