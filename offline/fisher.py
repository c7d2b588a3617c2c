"""Fisher information of routed-expert weights (D²-MoE Eq. 4), by a layer-streamed backward.

    F_i = E_{x∼D} E_{y∼p_θ(y|x)} [ (∇_{θ_i} log p_θ(y|x))² ]

estimated per calibration sequence (batch size 1, one backward each): labels are drawn from the model's
own predictive distribution (``labels="sampled"``, the equation as written) or are the true next tokens
(``"empirical"``, what lliai/D2MoE's get_fisher.py does). Only expert weights take gradients.

Granularity: ``"expert"`` (default) keeps one scalar per expert and projection — the mean of the squared
gradients over its elements, i.e. F_i as the paper's text describes it ("the average magnitude of the
gradient") — so memory stays O(layers × experts). ``"element"`` keeps a full diagonal Fisher per weight
(Matena & Raffel merging, as lliai/D2MoE does), which costs as much memory as the expert weights.

The whole model is never in memory (offline/source_model.py). Forward: the sequences go through the
decoder layers one layer at a time, keeping every layer's input hidden states (``fisher_samples`` × seqlen
× hidden floats per layer). Loss: final norm and head on the last hidden states, labels, cross-entropy, and
its gradient δ_L with respect to those hidden states. Backward, from the last layer down: the layer is
rebuilt, recomputed on its kept input of each sequence with autograd on, and back-propagated from that
sequence's output gradient δ_{l+1}; that yields the sequence's expert weight gradients of this layer (their
squares are accumulated, then dropped) and δ_l for the layer below. By the chain rule these are exactly
the gradients of one backward through the whole model; only one layer's weights and weight gradients are
alive at a time.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .calibration import capture_layer0_inputs, call_layer, clock, elapsed, forward_layerwise

log = logging.getLogger(__name__)


def _squared_gradients(experts, granularity: str) -> dict[str, torch.Tensor]:
    intermediate = experts.down_proj.shape[-1]
    squares = {
        "gate": experts.gate_up_proj.grad[:, :intermediate] ** 2,
        "up": experts.gate_up_proj.grad[:, intermediate:] ** 2,
        "down": experts.down_proj.grad ** 2,
    }
    if granularity == "expert":
        squares = {k: v.flatten(1).mean(1) for k, v in squares.items()}
    return {k: v.double() for k, v in squares.items()}


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
            for p in layer.parameters():
                p.requires_grad_(False)
            experts = layer.mlp.experts if index in moe else None
            if experts is not None:
                experts.gate_up_proj.requires_grad_(True)
                experts.down_proj.requires_grad_(True)
            for s, call in enumerate(calls):
                x = inputs[index][s].detach().requires_grad_(True)
                layer.zero_grad(set_to_none=True)
                call_layer(layer, call, x).backward(grads[s])
                grads[s] = x.grad
                if experts is not None:
                    squares = _squared_gradients(experts, granularity)
                    acc = sums.setdefault(index, {k: torch.zeros_like(v) for k, v in squares.items()})
                    for k, v in squares.items():
                        acc[k] += v
        del layer, experts  # free this layer before the next one is built
        inputs[index] = []
    log.info("Fisher pass, %d sequences of %d tokens, seconds wall (CPU): forward and loss %.1f (%.1f), "
             "backward %.1f (%.1f)", len(sequences), samples.shape[1], *forward, *elapsed(backward_started))
    count = samples.shape[0]
    return {layer: {k: v / count for k, v in sums[layer].items()} for layer in moe_layers}
