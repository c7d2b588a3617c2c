"""Fisher information of routed-expert weights (D²-MoE Eq. 4).

    F_i = E_{x∼D} E_{y∼p_θ(y|x)} [ (∇_{θ_i} log p_θ(y|x))² ]

estimated per calibration sequence (batch size 1, one backward each): labels are drawn from the model's
own predictive distribution (``labels="sampled"``, the equation as written) or are the true next tokens
(``"empirical"``, what lliai/D2MoE's get_fisher.py does). Only expert weights take gradients.

Granularity: ``"expert"`` (default) keeps one scalar per expert and projection — the mean of the squared
gradients over its elements, i.e. F_i as the paper's text describes it ("the average magnitude of the
gradient") — so memory stays O(layers × experts). ``"element"`` keeps a full diagonal Fisher per weight
(Matena & Raffel merging, as lliai/D2MoE does), which costs as much memory as the expert weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .architectures import moe_block


def expert_fisher(
    model, moe_layers: list[int], samples: torch.Tensor, labels: str = "sampled",
    granularity: str = "expert", seed: int = 0, progress: bool = True,
) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {"gate"|"up"|"down": F}} with F of shape [E] (expert) or the weights' shape (element)."""
    experts = {layer: moe_block(model, layer).experts for layer in moe_layers}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    for module in experts.values():
        module.gate_up_proj.requires_grad_(True)
        module.down_proj.requires_grad_(True)
    sums: dict[int, dict[str, torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(seed)
    try:
        for ids in tqdm(samples.split(1), desc="fisher", unit="seq", disable=not progress):
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            if labels == "sampled":
                with torch.no_grad():
                    probs = logits.softmax(-1).reshape(-1, logits.shape[-1])
                    target = torch.multinomial(probs, 1, generator=generator).reshape(ids.shape[0], -1)
            else:
                target = ids[:, 1:]
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).backward()
            for layer, module in experts.items():
                intermediate = module.down_proj.shape[-1]
                squares = {
                    "gate": module.gate_up_proj.grad[:, :intermediate] ** 2,
                    "up": module.gate_up_proj.grad[:, intermediate:] ** 2,
                    "down": module.down_proj.grad ** 2,
                }
                if granularity == "expert":
                    squares = {k: v.flatten(1).mean(1) for k, v in squares.items()}
                acc = sums.setdefault(layer, {k: torch.zeros_like(v, dtype=torch.float64) for k, v in squares.items()})
                for k, v in squares.items():
                    acc[k] += v.double()
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in saved:
            p.requires_grad_(flag)
    count = samples.shape[0]
    return {layer: {k: v / count for k, v in acc.items()} for layer, acc in sums.items()}
