"""Fisher information of routed-expert weights (D²-MoE Eq. 4), by a layer-streamed backward.

    F_i = E_{x∼D} E_{y∼p_θ(y|x)} [ (∇_{θ_i} log p_θ(y|x))² ]

estimated per calibration sequence (batch size 1, one backward each): labels are drawn from the model's
own predictive distribution (``labels="sampled"``, the equation as written) or are the true next tokens
(``"empirical"``, what lliai/D2MoE's get_fisher.py does). Only routed-expert weights get a Fisher value.

Granularity: ``"expert"`` (default) keeps one scalar per expert and projection — the mean of the squared
gradients over its elements, i.e. F_i as the paper's text describes it ("the average magnitude of the
gradient") — so memory stays O(layers × experts). ``"element"`` keeps a full diagonal Fisher per weight
(Matena & Raffel merging, as lliai/D2MoE does), which costs as much memory as the expert weights and forms
each expert's weight gradients (one expert at a time).

The whole model is never in memory (offline/source_model.py). Forward: the sequences go through the
decoder layers one layer at a time, keeping every layer's input hidden states (``fisher_samples`` × seqlen
× hidden floats per layer). Loss: final norm and head on the last hidden states, labels, cross-entropy, and
its gradient δ_L with respect to those hidden states. Backward, from the last layer down to the lowest MoE
layer (the layers below it hold no expert weight): the layer is rebuilt, recomputed on its kept input of each
sequence with autograd on and no weight requiring a gradient, and back-propagated from that sequence's output
gradient δ_{l+1}; that yields δ_l for the layer below and, through a hook, the loss's gradient with respect to
the experts' output. Each expert's squared weight gradients are then computed from it and the expert's routed
tokens (:func:`_expert_gradient_squares`): a weight gradient is G = Dᵀ X, a sum over those tokens of output
gradient times input, and for the per-expert scalar ‖G‖_F² = Σ((D Dᵀ) ⊙ (X Xᵀ)) needs only T × T products of
the T tokens routed to the expert in one sequence (:func:`gradient_square_sum`): with ``"expert"`` no weight
gradient is formed while T < out·in / (out + in) (559 at Qwen3-30B-A3B's expert shapes, where one expert's
gradients are 3 × 768 × 2048 floats and a layer's 2.25 GiB). By the chain rule these are the gradients of one
backward through the whole model (in another float32 order, the squares summed in float64); one layer's
weights are alive at a time.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .calibration import capture_layer0_inputs, call_layer, clock, elapsed, forward_layerwise

log = logging.getLogger(__name__)


def gradient_square_sum(d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """‖Dᵀ X‖_F², the sum of the squared elements of the weight gradient G = Dᵀ X = Σ_t d_t x_tᵀ of a linear map,
    without forming G when that is cheaper: D [T, out] holds the loss's gradients at the map's outputs and X [T, in]
    its inputs, over T tokens. Float64 scalar.

        ‖Dᵀ X‖_F² = Σ_{ij} (Σ_t D_ti X_tj)² = Σ_{s,t} (D Dᵀ)_st (X Xᵀ)_st = Σ((D Dᵀ) ⊙ (X Xᵀ))

    The two T × T Grams cost T²·(out + in) multiply-adds, G costs T·out·in: the Grams are used when
    T·(out + in) < out·in (at Qwen3-30B-A3B's expert shapes, T < 559 tokens routed to one expert in one
    sequence), G otherwise. Both run in float64 from the float32 D and X: the sum has cancellations when tokens'
    terms point different ways (tests/test_calibration.py measures float32 against float64)."""
    tokens, out, inp = d.shape[0], d.shape[1], x.shape[1]
    d, x = d.double(), x.double()
    if tokens * (out + inp) < out * inp:
        return ((d @ d.T) * (x @ x.T)).sum()
    return (d.T @ x).square().sum()


def _expert_gradient_squares(experts, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                             out_grad: torch.Tensor, granularity: str) -> dict[str, torch.Tensor]:
    """The squared gradients of the loss with respect to every expert's gate, up and down matrices, i.e. one
    sequence's term (∇_{θ_i} log p_θ(y|x))² of D²-MoE's Eq. 4, from one call of the layer's experts: their input ``hidden`` [T, H], the
    routing (``top_k_index``, ``top_k_weights`` [T, k]) and ``out_grad`` [T, H], the loss's gradient with respect to
    the experts' output.

    Expert e's output on its routed tokens t is w_t · W_down h_t with h_t = act(g_t) ⊙ u_t, g_t = W_gate x_t and
    u_t = W_up x_t, so each of its weight gradients is a sum over those tokens only, G = Σ_t d_t x_tᵀ = Dᵀ X, with

        down:  D rows d_t = w_t δ_t (δ_t: ``out_grad`` row t),  X rows h_t
        gate:  D rows ∂L/∂g_t,  up: D rows ∂L/∂u_t  (through act(g) ⊙ u from ∂L/∂h_t = W_downᵀ w_t δ_t),  X rows x_t

    The expert's small forward is recomputed here (no weight requires a gradient; ∂L/∂g and ∂L/∂u are taken by
    autograd through ``experts.act_fn`` alone). ``expert`` granularity: F_i = ‖G‖_F² / (out·in), the mean squared
    element, from :func:`gradient_square_sum` (no gradient matrix formed at these token counts); ``element``: G
    itself is formed (float32, as a weight's autograd gradient would be) and squared. Returns per projection [E]
    or [E, out, in], float64."""
    squares: dict[str, list[torch.Tensor]] = {"gate": [], "up": [], "down": []}
    for e in range(experts.down_proj.shape[0]):
        tokens, slots = (top_k_index == e).nonzero(as_tuple=True)
        x = hidden[tokens]
        gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        d_down = out_grad[tokens] * top_k_weights[tokens, slots, None]
        with torch.enable_grad():
            gate, up = gate.requires_grad_(True), up.requires_grad_(True)
            h = experts.act_fn(gate) * up
            d_gate, d_up = torch.autograd.grad(h, (gate, up), d_down @ experts.down_proj[e])
        for k, d, inputs in (("gate", d_gate, x), ("up", d_up, x), ("down", d_down, h.detach())):
            if granularity == "expert":
                squares[k].append(gradient_square_sum(d, inputs) / (d.shape[1] * inputs.shape[1]))
            else:
                squares[k].append((d.T @ inputs).square().double())
    return {k: torch.stack(v) for k, v in squares.items()}


def _keep_call(calls: list[list[torch.Tensor]]):
    """A forward hook on the experts module appending [input, top-k index, top-k weights, output gradient] of each
    call to ``calls`` (the gradient is filled in by the backward pass, through a hook on the output)."""

    def hook(_module, args, output):
        hidden, top_k_index, top_k_weights = args
        call = [hidden.detach(), top_k_index, top_k_weights.detach()]
        calls.append(call)
        output.register_hook(lambda grad: call.append(grad))

    return hook


def expert_fisher(
    source, moe_layers: list[int], samples: torch.Tensor, labels: str = "sampled",
    granularity: str = "expert", seed: int = 0, progress: bool = True,
) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {"gate"|"up"|"down": F}} with F of shape [E] (expert) or the weights' shape (element);
    ``source`` is a streamed model (offline/source_model.py)."""
    started = clock()
    sequences = list(samples.split(1))
    with torch.no_grad():
        calls = capture_layer0_inputs(source.model, sequences)
    inputs: list[list[torch.Tensor]] = [[c[0][0] if c[0] else c[1]["hidden_states"] for c in calls]]
    forward_layerwise(source, samples, 1, lambda _index, hidden: inputs.append(list(hidden)),
                      progress=progress, desc="fisher forward")

    generator = torch.Generator().manual_seed(seed)
    grads = []
    for ids, last in zip(sequences, inputs.pop()):
        last = last.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = source.logits(last)[:, :-1].float()
            if labels == "sampled":
                with torch.no_grad():
                    probs = logits.softmax(-1).reshape(-1, logits.shape[-1])
                    target = torch.multinomial(probs, 1, generator=generator).reshape(ids.shape[0], -1)
            else:
                target = ids[:, 1:]
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).backward()
        grads.append(last.grad)

    forward, backward_started = elapsed(started), clock()
    sums: dict[int, dict[str, torch.Tensor]] = {}
    moe = set(moe_layers)
    lowest = min(moe, default=source.num_layers)  # the layers below it hold no expert: nothing to back-propagate
    for index in tqdm(reversed(range(lowest, source.num_layers)), desc="fisher backward", unit="layer",
                      disable=not progress, total=source.num_layers - lowest):
        with source.layer(index) as layer, torch.enable_grad():
            for p in layer.parameters():  # no weight takes a gradient: the experts' come from their calls below
                p.requires_grad_(False)
            experts = layer.mlp.experts if index in moe else None
            for s, call in enumerate(calls):
                x = inputs[index][s].detach().requires_grad_(True)
                routed: list[list[torch.Tensor]] = []
                handle = experts.register_forward_hook(_keep_call(routed)) if experts is not None else None
                try:
                    call_layer(layer, call, x).backward(grads[s])
                finally:
                    if handle is not None:
                        handle.remove()
                grads[s] = x.grad
                if experts is not None:
                    if len(routed) != 1:
                        raise RuntimeError(f"layer {index}: the experts were called {len(routed)} times in one "
                                           "forward; the Fisher pass expects one call")
                    squares = _expert_gradient_squares(experts, *routed[0], granularity)
                    acc = sums.setdefault(index, {k: torch.zeros_like(v) for k, v in squares.items()})
                    for k, v in squares.items():
                        acc[k] += v
        del layer, experts  # free this layer before the next one is built
        inputs[index] = []
    log.info("Fisher pass, %d sequences of %d tokens, seconds wall (CPU): forward and loss %.1f (%.1f), "
             "backward %.1f (%.1f)", len(sequences), samples.shape[1], *forward, *elapsed(backward_started))
    count = samples.shape[0]
    return {layer: {k: v / count for k, v in sums[layer].items()} for layer in moe_layers}
