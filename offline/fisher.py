"""Fisher information of routed-expert weights (D²-MoE Eq. 4), by a layer-streamed backward.

    F_i = E_{x∼D} E_{y∼p_θ(y|x)} [ (∇_{θ_i} log p_θ(y|x))² ]

estimated per calibration sequence (batch size 1, one backward each): labels are drawn from the model's
own predictive distribution (``labels="sampled"``, the equation as written) or are the true next tokens
(``"empirical"``, what lliai/D2MoE's get_fisher.py does). Only expert weights' gradients are formed.

Granularity: ``"expert"`` (default) keeps one scalar per expert and projection — the mean of the squared
gradients over its elements, i.e. F_i as the paper's text describes it ("the average magnitude of the
gradient") — so memory stays O(layers × experts). ``"element"`` keeps a full diagonal Fisher per weight
(Matena & Raffel merging, as lliai/D2MoE does), which costs as much memory as the expert weights.

The whole model is never in memory (offline/source_model.py). Forward: the sequences go through the
decoder layers one layer at a time, keeping every layer's input hidden states (``fisher_samples`` × seqlen
× hidden floats per layer). Loss: final norm and head on the last hidden states, labels, cross-entropy, and
its gradient δ_L with respect to those hidden states. Backward, from the last layer down: the layer is
rebuilt, recomputed on its kept input of each sequence with autograd on and no weight requiring a gradient,
and back-propagated from that sequence's output gradient δ_{l+1}; that yields δ_l for the layer below and,
through a hook, the loss's gradient with respect to the experts' output. Each expert's weight gradients are
then formed on their own from its routed tokens (:func:`_expert_gradient_squares`), squared, accumulated and
dropped, so the gradient of a whole layer's experts (2.25 GiB in float32 at Qwen3-30B-A3B's shapes) is never
allocated. By the chain rule these are the gradients of one backward through the whole model (summed in
another float32 order); one layer's weights and one expert's gradients are alive at a time.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .calibration import capture_layer0_inputs, call_layer, clock, elapsed, forward_layerwise

log = logging.getLogger(__name__)


def _expert_gradient_squares(experts, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                             out_grad: torch.Tensor, granularity: str) -> dict[str, torch.Tensor]:
    """The squared gradients of the loss with respect to every expert's gate, up and down matrices, one expert at
    a time, from one call of the layer's experts: their input ``hidden`` [T, H], the routing (``top_k_index``,
    ``top_k_weights`` [T, k]) and ``out_grad`` [T, H], the loss's gradient with respect to the experts' output.

    Expert e's output on its routed tokens t is w_t · W_down (act(W_gate x_t) ⊙ W_up x_t), so its weight gradients
    are sums over those tokens only; they are taken by autograd on that expert's forward alone, recomputed with
    its three matrices as leaves and back-propagated from w_t-weighted ``out_grad`` rows (the terms of
    Σ_t δ_t x_tᵀ the fused [E, ...] parameters' gradient would hold). Only one expert's gradients are alive at a
    time. Returns per projection [E] (``expert``: mean over the matrix's elements) or [E, out, in] (``element``)."""
    intermediate = experts.down_proj.shape[-1]
    squares: dict[str, list[torch.Tensor]] = {"gate": [], "up": [], "down": []}
    for e in range(experts.down_proj.shape[0]):
        tokens, slots = (top_k_index == e).nonzero(as_tuple=True)
        gate_up = experts.gate_up_proj[e].detach().requires_grad_(True)  # views: no copy of the weights
        down = experts.down_proj[e].detach().requires_grad_(True)
        x = hidden[tokens]
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        out = F.linear(experts.act_fn(gate) * up, down) * top_k_weights[tokens, slots, None]
        grad_gate_up, grad_down = torch.autograd.grad(out, (gate_up, down), out_grad[tokens])
        for k, grad in (("gate", grad_gate_up[:intermediate]), ("up", grad_gate_up[intermediate:]),
                        ("down", grad_down)):
            square = grad**2
            squares[k].append(square.mean() if granularity == "expert" else square)
    return {k: torch.stack(v).double() for k, v in squares.items()}


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
    for index in tqdm(reversed(range(source.num_layers)), desc="fisher backward", unit="layer",
                      disable=not progress, total=source.num_layers):
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
