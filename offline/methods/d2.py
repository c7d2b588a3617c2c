"""D²-MoE (Gu et al., ICML 2025): shared base + truncation-aware low-rank deltas + semi-dynamic pruning.

Per MoE layer and projection p ∈ {gate, up, down}:

1. Base by Fisher-weighted merging (Eq. 5):  W_b = Σ_i F_i W_i / Σ_i F_i, with F_i from fisher.py (Eq. 4).
   ``merge="mean"`` and ``merge="frequency"`` (routing counts as weights) are the paper's Table 5 ablations.
2. Deltas ΔW_i = W_i − W_b compressed by truncation-aware SVD (Eq. 6–8): the SVD of ΔW_i S_i with S_i the
   Cholesky factor of the Gram of expert i's own inputs (routed tokens for gate/up, its intermediate
   activations for down); ΔU = U√Σ_k, ΔV = √Σ_k Vᵀ S⁻¹. All experts of a layer share one rank, plus
   at most one extra rank for the most-routed experts to spend the budget exactly (budget.py).
3. Semi-dynamic structured pruning of the base (§3.4, Eq. 9). Choice: a "column" is an intermediate
   channel j of the base MLP — row j of the gate and up bases and column j of the down base, which is
   how lliai/D2MoE prunes — scored with C_j = ‖W_b,down[:, j]‖₂ · ‖X[j, :]‖₂ where X is the experts'
   intermediate activation over every routed calibration token. The lowest half of ``base_prune`` is
   removed here (static, saves storage); the other half is stored as ``dynamic_prune_ratio`` and applied
   per batch at inference (format/schemes/base_delta.py, the plugin). Order as in the paper: merge, deltas against
   the full base, then prune the base. Default 0 (no pruning), our choice: at an equal total ratio the
   pruned channels cost more than the delta ranks their parameters buy, on the reference model (brown PPL
   −0.28 ± 0.04 % at 40 %, −0.31 ± 0.04 % at 60 % against the paper's 0.1) and on an upcycled layer
   (output error 4–6× lower; BENCHMARKS.md §9.3). ``base_prune=0.1`` is Table 12's "performance" setting.
4. Delta trimming (App. B.1), optional: the ``trim_experts`` least-routed experts of each layer keep no
   delta (they become the base). Choice: the target ratio stays fixed and the freed budget raises the
   other experts' ranks (in the paper trimming raises the ratio instead; pass a higher --ratio for that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_moe_compress.format import PROJECTIONS

from ..budget import LayerShape
from ..choices import MERGES
from ..options import MethodOptions, check_choice, check_range, option
from vllm_moe_compress.format.schemes.base_delta import BaseDeltaLayer
from .base import CompressionMethod, LayerInputs, LayerResult, factorize_experts, pass_order


def merge_base(weights, importance: torch.Tensor) -> torch.Tensor:
    """W_b = Σ_i F_i W_i / Σ_i F_i (Eq. 5). ``weights``: [E, out, in] stacked or a source_model.ExpertStack,
    summed expert by expert in float64 (one expert's matrix in memory at a time); ``importance`` is [E] or
    element-wise [E, out, in]. With one importance per expert the denominator is one number (summed in the same
    order, so the same value in every element), and the plain mean is formed only if it is zero."""
    weighted = torch.zeros(weights.shape[1:], dtype=torch.float64)
    per_expert = importance.dim() == 1
    total = torch.zeros(() if per_expert else weights.shape[1:], dtype=torch.float64)
    plain = None if per_expert else torch.zeros_like(weighted)
    for e in range(len(weights)):
        w = weights[e]
        f = importance[e].to(w.dtype)
        weighted += f * w
        total += f
        if plain is not None:
            plain += w
        del w
    merged = weighted.div_(total.clamp_min(torch.finfo(weighted.dtype).tiny))
    if per_expert and total.item() > 0:
        return merged
    if plain is None:
        plain = torch.zeros_like(merged)
        for e in range(len(weights)):
            plain += weights[e]
    # Where no expert carries importance (all-zero gradients or counts) fall back to the plain mean.
    return torch.where(total > 0, merged, plain / len(weights))


class DeltaStack:
    """The deltas W_i − W_b of one projection, formed an expert at a time when indexed (``weights`` as in
    :func:`merge_base`), so the layer's deltas are never all in memory."""

    def __init__(self, weights, base: torch.Tensor):
        self.weights, self.base = weights, base
        self.shape = weights.shape

    def __len__(self) -> int:
        return len(self.weights)

    def __getitem__(self, expert: int) -> torch.Tensor:
        return self.weights[expert] - self.base


@dataclass(frozen=True)
class D2Options(MethodOptions):
    """D²-MoE options (--method d2; docs/methods.md)"""

    merge: str = option("fisher", "how the base is merged: fisher (Eq. 5), or the Table 5 ablations mean / "
                        "frequency", choices=MERGES)
    base_prune: float = option(0.0, "base pruning ratio, half static (stored) and half dynamic (per batch at "
                               "inference); 0 is our choice, measured (BENCHMARKS.md §11.3); 0.1 = the paper's "
                               "5%+5% 'performance' setting")
    trim_experts: int = option(0, "drop the deltas of the N least-routed experts per layer")

    def __post_init__(self):
        check_choice(self.merge, MERGES, "merge")
        check_range(self.base_prune, 0.0, 1.0, "base prune ratio", high_open=True)
        if self.trim_experts < 0:
            raise ValueError(f"trim_experts must be >= 0, got {self.trim_experts}")

    def record(self) -> dict:
        return {"merge": self.merge, "base_prune": self.base_prune, "static_prune_ratio": self.base_prune / 2,
                "trim_experts": self.trim_experts}


class D2MoE(CompressionMethod):
    """D²-MoE on one layer: Fisher-merged base, whitened low-rank deltas, base pruning (module docstring)."""

    name = "d2"
    Options = D2Options
    whitened = True
    """The deltas are factorised with each expert's own Gram (as :class:`svd.WhitenedSVD`)."""

    @property
    def needs_fisher(self) -> bool:
        """Only the Fisher merge (Eq. 4–5) needs the Fisher pass."""
        return self.opts.merge == "fisher"

    @property
    def dynamic_prune_ratio(self) -> float:
        """The dynamic half of ``base_prune``, applied per batch at inference (§3.4)."""
        return self.opts.base_prune / 2

    def static_channels(self, shape: LayerShape) -> int:
        return shape.intermediate_size - round(self.opts.base_prune / 2 * shape.intermediate_size)

    def fixed_params(self, shape: LayerShape) -> int:
        return 3 * shape.hidden_size * self.static_channels(shape)

    def num_trimmed(self, shape: LayerShape) -> int:
        if self.opts.trim_experts >= shape.num_experts:
            raise ValueError(f"cannot trim {self.opts.trim_experts} of {shape.num_experts} experts")
        return self.opts.trim_experts

    def importance(self, proj: str, stats, fisher) -> torch.Tensor:
        if self.opts.merge == "fisher":
            return fisher[proj]
        if self.opts.merge == "frequency":
            return stats.counts.double()
        return torch.ones(stats.counts.numel(), dtype=torch.float64)

    def kept_channels(self, base_down: torch.Tensor, stats, shape: LayerShape) -> torch.Tensor:
        """The static_channels(shape) intermediate channels with the highest C_j = ‖W_b,down[:, j]‖₂ · ‖X[j, :]‖₂
        (Eq. 9), sorted; all of them without static pruning (no score needed: the intermediate Grams, 1.5 GiB
        each at Mixtral-8x7B's width, are not computed a second time for it)."""
        kept = self.static_channels(shape)
        if kept == shape.intermediate_size:
            return torch.arange(kept)
        activation_norm = stats.inter_gram.diagonal(dim1=1, dim2=2).sum(0).clamp_min(0).sqrt()
        score = base_down.norm(dim=0) * activation_norm  # Eq. 9, C_j
        return torch.sort(torch.topk(score, kept).indices).values

    def compress_layer(self, inputs: LayerInputs) -> LayerResult:
        """Merge, factorise the deltas and prune, one group of projections at a time (gate and up, and down, in
        the factorisation's order: base.pass_order), so only that group's base is alive in float64; each base is kept in float32 once its deltas
        are factorised (what is stored is float32 at most, and float64 → bfloat16 goes through float32 in
        torch, so no stored byte changes). The channel score (Eq. 9) uses the float64 down base."""
        weights, stats, shape = inputs.weights, inputs.stats, inputs.shape
        ranks = self.ranks_for(inputs.budget, shape, stats)
        factors, base = {}, {}
        for group in pass_order(shape.hidden_size, shape.intermediate_size):
            merged = {p: merge_base(weights[p], self.importance(p, stats, inputs.fisher)) for p in group}
            deltas = {p: DeltaStack(weights[p], merged[p]) for p in group}
            factors.update(factorize_experts(deltas, ranks, stats, inputs.device, group))
            del deltas
            if "down" in merged:
                keep = self.kept_channels(merged["down"], stats, shape)
            base.update({p: merged.pop(p).float() for p in group})
        pruned = {"gate": base.pop("gate")[keep], "up": base.pop("up")[keep], "down": base.pop("down")[:, keep]}
        return LayerResult(BaseDeltaLayer(shape.hidden_size, shape.intermediate_size,
                                          {p: factors[p] for p in PROJECTIONS}, pruned, keep))
