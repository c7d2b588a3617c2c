"""Fisher information of routed-expert weights (D²-MoE Eq. 4), by a layer-streamed backward.

    F_i = E_{x∼D} E_{y∼p_θ(y|x)} [ (∇_{θ_i} log p_θ(y|x))² ]

estimated per calibration sequence (batch size 1: each sequence's own gradient is squared, never a batch's):
labels are drawn from the model's own predictive distribution (``labels="sampled"``, the equation as written)
or are the true next tokens (``"empirical"``, what lliai/D2MoE's get_fisher.py does). Only routed-expert weights
get a Fisher value.

Granularity: ``"expert"`` (default) keeps one scalar per expert and projection — the mean of the squared
gradients over its elements, i.e. F_i as the paper's text describes it ("the average magnitude of the
gradient") — so memory stays O(layers × experts). ``"element"`` keeps a full diagonal Fisher per weight
(Matena & Raffel merging, as lliai/D2MoE does), which costs as much memory as the expert weights and forms
each expert's weight gradients (one expert at a time).

The whole model is never in memory (offline/source_model.py). Forward: the sequences go through the decoder layers
one layer at a time, in batches of b sequences (:func:`fisher_batch_size`, ``--fisher-batch-size``), keeping every
layer's input hidden states (``fisher_samples`` × seqlen × hidden floats per layer). Loss, per sequence: final norm
and head on its last hidden states, labels, its own cross-entropy (mean over its positions), and its gradient δ_L
with respect to those hidden states. Backward, from the last layer down to the lowest MoE layer (the layers below
it hold no expert weight): the layer is rebuilt, recomputed on its kept input of each batch with autograd on and no
weight requiring a gradient, and back-propagated from the batch's output gradients δ_{l+1}; that yields δ_l for the
layer below. A batch's backward is the backward of the sum of its sequences' losses, and inside a layer no sequence
meets another (attention is per sequence, the experts per token), so every token's gradients are those of its own
sequence's backward: a batch reads the layer's weights once for b sequences (one sequence alone routes about 8
tokens to each expert at Qwen3-30B-A3B's shapes and 128 tokens, memory-bound products), with the same per-token
values (the captured layer-0 call, mask and positions, is each batch's own). The rebuilt layer's experts run
:func:`_experts_forward` (transformers' grouped products, keeping each routed token's input, projections and their
gradients), so the same backward also yields, per expert, the loss's gradients D at its three projections' outputs
over its routed tokens, and their inputs X. A weight gradient is G = Dᵀ X; for the per-expert scalar,
‖G‖_F² = Σ((D Dᵀ) ⊙ (X Xᵀ)) needs only T × T products of the T tokens routed to the expert in one sequence
(:func:`gradient_square_sum`; in a batch each sequence's block of the expert's rows separately, Σ_s ‖D_sᵀ X_s‖²,
not ‖Dᵀ X‖² of the batch), so with ``"expert"`` no weight gradient is formed while T < out·in / (out + in) (559 at
Qwen3-30B-A3B's expert shapes, where one expert's gradients are 3 × 768 × 2048 floats and a layer's 2.25 GiB), and
nothing of the experts' forward is recomputed. By the chain rule these are the gradients of one backward through
the whole model (in another float32 order, the squares summed in float64); one layer's weights are alive at a time.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .calibration import (capture_layer0_inputs, call_layer, clock, elapsed, forward_layerwise, mapped_large_blocks,
                          release_freed_memory)
from .choices import FISHER_BATCH_TOKENS

log = logging.getLogger(__name__)


def gradient_square_sum(d: torch.Tensor, x: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
    """Σ_s ‖D_sᵀ X_s‖_F², over the contiguous row blocks of ``counts`` (default: one block of every row), of the sum
    of the squared elements of the weight gradient G_s = D_sᵀ X_s = Σ_t d_t x_tᵀ of a linear map, without forming G_s
    when that is cheaper: D [T, out] holds the loss's gradients at the map's outputs and X [T, in] its inputs, over
    T tokens; a block is one sequence's tokens (the Fisher squares each sequence's gradient, D²-MoE Eq. 4, so the
    blocks never mix). Float64 scalar.

        ‖Dᵀ X‖_F² = Σ_{ij} (Σ_t D_ti X_tj)² = Σ_{s,t} (D Dᵀ)_st (X Xᵀ)_st = Σ((D Dᵀ) ⊙ (X Xᵀ))

    The two T × T Grams cost T²·(out + in) multiply-adds, G costs T·out·in: per block the Grams are used when
    T·(out + in) < out·in (at Qwen3-30B-A3B's expert shapes, T < 559 tokens routed to one expert in one
    sequence), G otherwise. Both run in float64 from the float32 D and X: the sum has cancellations when tokens'
    terms point different ways, where float32 Grams lost 5-18 % of it (BENCHMARKS.md §12.8)."""
    out, inp = d.shape[1], x.shape[1]
    total = torch.zeros((), dtype=torch.float64)
    for d_s, x_s in _sequence_blocks(d.double(), x.double(), counts):
        if d_s.shape[0] * (out + inp) < out * inp:
            total += ((d_s @ d_s.T) * (x_s @ x_s.T)).sum()
        else:
            total += (d_s.T @ x_s).square().sum()
    return total


def _sequence_blocks(d: torch.Tensor, x: torch.Tensor, counts: list[int] | None):
    """(D_s, X_s) for each contiguous row block of ``counts`` (one sequence's tokens each; default: all rows)."""
    counts = counts or [d.shape[0]]
    return zip(d.split(counts), x.split(counts))


def fisher_batch_size(seqlen: int, batch_tokens: int = FISHER_BATCH_TOKENS) -> int:
    """The Fisher pass's default sequences per batch at ``seqlen`` tokens each: as many as hold
    ``batch_tokens`` tokens, at least one. A batch reads the layer's expert weights once for all its sequences
    (one sequence alone routes about seqlen · top_k / E tokens to an expert: 8 at Qwen3-30B-A3B's shapes and 128
    tokens, memory-bound products); what the backward keeps grows with the batch's tokens
    (offline/memory_model.py), so the default bounds the tokens, not the sequences."""
    return max(1, batch_tokens // seqlen)


@dataclass
class _RoutedCall:
    """One call of a layer's experts in the Fisher backward, grouped by expert (expert e's routed token-expert
    pairs are the rows ``starts[e]:starts[e] + counts[e]``; S pairs in all), kept by :func:`_experts_forward`:
    ``token`` [S] the token of each pair (its index among the call's ``num_tokens`` tokens, the b sequences of the
    batch flattened, sequence-major; within an expert's rows ascending), ``x`` [S, H] the routed inputs,
    ``gate_up`` [S, 2I] their gate and up projections, ``h`` [S, I] = act(gate) ⊙ up and ``y`` [S, H] each pair's
    expert output before its routing weight. After the layer's backward, ``gate_up.grad`` and ``y.grad`` hold the
    loss's gradients at those outputs (autograd keeps them)."""

    counts: list[int]
    num_tokens: int
    token: torch.Tensor
    x: torch.Tensor
    gate_up: torch.Tensor
    h: torch.Tensor
    y: torch.Tensor

    @property
    def starts(self) -> list[int]:
        return [0, *itertools.accumulate(self.counts)][:-1]

    def sequence_counts(self, sequences: int) -> list[list[int]]:
        """Per expert, the number of its rows from each of the call's ``sequences`` sequences (of equal length),
        omitting the sequences that routed no token to it: its rows are contiguous blocks of one sequence each, in
        this order (the experts' sort is stable and the tokens are sequence-major)."""
        seqlen = self.num_tokens // sequences
        if seqlen * sequences != self.num_tokens:
            raise ValueError(f"{self.num_tokens} tokens are not {sequences} sequences of equal length")
        experts = len(self.counts)
        expert_of_row = torch.repeat_interleave(torch.arange(experts), torch.tensor(self.counts))
        table = torch.bincount(expert_of_row * sequences + self.token // seqlen, minlength=experts * sequences)
        return [[c for c in row if c] for row in table.view(experts, sequences).tolist()]


def _experts_forward(experts, calls: list[_RoutedCall]):
    """A forward for a rebuilt layer's ``experts`` (transformers' fused experts: ``gate_up_proj`` [E, 2I, H], gate
    rows first, ``down_proj`` [E, H, I]) computing what transformers' ``grouped_mm`` experts forward computes, the
    same grouped products and gating, and appending its intermediates to ``calls`` (:class:`_RoutedCall`), so that
    the layer's own backward yields the gradients at each expert's projections and nothing is recomputed. The
    returned function is stored on ``experts`` and refers to its weights, not to ``experts`` itself: a reference
    cycle would keep the whole layer alive after it is dropped, until Python's cycle collector happens to run."""
    if experts.has_bias or experts.is_transposed or not experts.has_gate or not experts.is_concatenated:
        raise NotImplementedError(f"{type(experts).__name__}: the Fisher pass handles fused [gate; up] experts "
                                  "without bias")
    gate_up_proj, down_proj, act_fn = experts.gate_up_proj, experts.down_proj, experts.act_fn

    def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens, top_k = top_k_index.shape
        expert_of_pair, order = torch.sort(top_k_index.reshape(-1), stable=True)
        counts = torch.bincount(expert_of_pair, minlength=gate_up_proj.shape[0])
        offsets = counts.cumsum(0, dtype=torch.int32)
        token = order // top_k
        x = hidden[token]
        gate_up = F.grouped_mm(x, gate_up_proj.transpose(-2, -1), offs=offsets)
        gate, up = gate_up.chunk(2, dim=-1)  # transformers' default gating (_apply_gate): act(gate) ⊙ up
        h = act_fn(gate) * up
        y = F.grouped_mm(h, down_proj.transpose(-2, -1), offs=offsets)
        for kept in (gate_up, y):
            kept.retain_grad()
        calls.append(_RoutedCall(counts.tolist(), tokens, token, x.detach(), gate_up, h.detach(), y))
        weighted = torch.empty_like(y).index_copy_(0, order, y * top_k_weights.reshape(-1)[order, None])
        return weighted.view(tokens, top_k, -1).sum(dim=1)

    return forward


def _expert_gradient_squares(call: _RoutedCall, granularity: str, sequences: int = 1) -> dict[str, torch.Tensor]:
    """The squared gradients of the loss with respect to every expert's gate, up and down matrices summed over
    the call's ``sequences`` sequences, i.e. Σ_s of sequence s's term (∇_{θ_i} log p_θ(y_s|x_s))² of D²-MoE's Eq. 4
    (each sequence's own gradient squared, never the batch's gradient), from one call of the layer's experts on a
    batch of sequences after the layer's backward (``call``, :class:`_RoutedCall`; the batch's loss is the sum of
    the sequences' losses, and a sequence's tokens do not meet another's inside a layer, so the gradients at a
    token's projections are its own sequence's).

    Expert e's output on its routed tokens t is w_t · W_down h_t with h_t = act(g_t) ⊙ u_t, g_t = W_gate x_t and
    u_t = W_up x_t, so each of its weight gradients in sequence s is a sum over the tokens of s routed to it
    only, G_s = Σ_t d_t x_tᵀ = D_sᵀ X_s (the expert's rows are one contiguous block per sequence), with

        down:  D rows ∂L/∂(W_down h_t) = w_t δ_t (``call.y.grad``),  X rows h_t
        gate:  D rows ∂L/∂g_t,  up: D rows ∂L/∂u_t (``call.gate_up.grad``),  X rows x_t

    ``expert`` granularity: F_i = Σ_s ‖G_s‖_F² / (out·in), the mean squared element, from
    :func:`gradient_square_sum` (no gradient matrix formed at these token counts); ``element``: each G_s is formed
    (float32, as a weight's autograd gradient would be), squared and summed in float64. Returns per projection
    [E] or [E, out, in], float64."""
    d_gate_up, d_down = call.gate_up.grad, call.y.grad
    inter = d_gate_up.shape[1] // 2
    squares: dict[str, list[torch.Tensor]] = {"gate": [], "up": [], "down": []}
    for start, count, blocks in zip(call.starts, call.counts, call.sequence_counts(sequences)):
        rows = slice(start, start + count)
        x, h = call.x[rows], call.h[rows]
        for k, d, inputs in (("gate", d_gate_up[rows, :inter], x), ("up", d_gate_up[rows, inter:], x),
                             ("down", d_down[rows], h)):
            if granularity == "expert":
                squares[k].append(gradient_square_sum(d, inputs, blocks) / (d.shape[1] * inputs.shape[1]))
            else:
                square = torch.zeros(d.shape[1], inputs.shape[1], dtype=torch.float64)
                for d_s, x_s in _sequence_blocks(d, inputs, blocks):
                    square += (d_s.T @ x_s).square()
                squares[k].append(square)
    return {k: torch.stack(v) for k, v in squares.items()}


def expert_fisher(
    source, moe_layers: list[int], samples: torch.Tensor, labels: str = "sampled",
    granularity: str = "expert", seed: int = 0, progress: bool = True, batch_size: int | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {"gate"|"up"|"down": F}} with F of shape [E] (expert) or the weights' shape (element);
    ``source`` is a streamed model (offline/source_model.py). The sequences go through each layer ``batch_size``
    at a time (default :func:`fisher_batch_size`); the result does not depend on it beyond float rounding."""
    started = clock()
    batch_size = batch_size or fisher_batch_size(samples.shape[1])
    batches = list(samples.split(batch_size))
    with torch.no_grad():
        calls = capture_layer0_inputs(source.model, batches)
    inputs: list[list[torch.Tensor]] = [[c[0][0] if c[0] else c[1]["hidden_states"] for c in calls]]
    forward_layerwise(source, samples, batch_size, lambda _index, hidden: inputs.append(list(hidden)),
                      progress=progress, desc="fisher forward")

    generator = torch.Generator().manual_seed(seed)
    grads = []
    for ids, last in zip(batches, inputs.pop()):
        last = last.detach().requires_grad_(True)
        for s in range(ids.shape[0]):  # each sequence's own loss, labels drawn in sequence order; summed in last.grad
            with torch.enable_grad():
                logits = source.logits(last[s:s + 1])[:, :-1].float()
                if labels == "sampled":
                    with torch.no_grad():
                        probs = logits.softmax(-1).reshape(-1, logits.shape[-1])
                        target = torch.multinomial(probs, 1, generator=generator).reshape(1, -1)
                else:
                    target = ids[s:s + 1, 1:]
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).backward()
        grads.append(last.grad)

    forward, backward_started = elapsed(started), clock()
    sums: dict[int, dict[str, torch.Tensor]] = {}
    moe = set(moe_layers)
    lowest = min(moe, default=source.num_layers)  # the layers below it hold no expert: nothing to back-propagate
    for index in tqdm(reversed(range(lowest, source.num_layers)), desc="fisher backward", unit="layer",
                      disable=not progress, total=source.num_layers - lowest):
        with mapped_large_blocks(), source.layer(index) as layer, torch.enable_grad():  # as in calibration
            for p in layer.parameters():  # no weight takes a gradient: the experts' come from their calls below
                p.requires_grad_(False)
            experts = layer.mlp.experts if index in moe else None
            routed: list[_RoutedCall] = []
            if experts is not None:  # an attribute of this rebuilt layer only, dropped with it
                experts.forward = _experts_forward(experts, routed)
            for b, call in enumerate(calls):
                x = inputs[index][b].detach().requires_grad_(True)
                call_layer(layer, call, x).backward(grads[b])
                grads[b] = x.grad
                if experts is not None:
                    if len(routed) != 1:
                        raise RuntimeError(f"layer {index}: the experts were called {len(routed)} times in one "
                                           "forward; the Fisher pass expects one call")
                    squares = _expert_gradient_squares(routed.pop(), granularity, len(x))
                    acc = sums.setdefault(index, {k: torch.zeros_like(v) for k, v in squares.items()})
                    for k, v in squares.items():
                        acc[k] += v
        del layer, experts  # free this layer before the next one is built
        inputs[index] = []
        release_freed_memory()
    log.info("Fisher pass, %d sequences of %d tokens, %d per batch, seconds wall (CPU): forward and loss %.1f "
             "(%.1f), backward %.1f (%.1f)", samples.shape[0], samples.shape[1], len(batches[0]), *forward,
             *elapsed(backward_started))
    count = samples.shape[0]
    return {layer: {k: v / count for k, v in sums[layer].items()} for layer in moe_layers}
