"""RS-MoE (ICLR 2026 submission, shared/papers/rs-moe.txt): sparse + low-rank collaborative decomposition.

Per MoE layer (§3.2–3.4):

1. **Collaborative units.** Channel j of expert e is row j of W_gate and W_up plus column j of W_down; a
   unit is always kept, approximated or pruned as a whole.
2. **Importance (ACI, Algorithm 1).** On the routing-weighted intermediate A = w·h of the expert's routed
   tokens: S_hyb = w_mean·mean(|A|²) + w_var·var(|A|²) + w_peak·max|A|, each term normalised by its maximum
   over the layer (App. A.2 "normalized"); I_inner = S_hyb ⊙ ‖W_down[:, j]‖²; downstream influence
   I_down = |W_downᵀ V_inᵀ| ‖rows of V_in‖ with V_in the next MoE layer's (W_gate + W_up)/2 of all its
   experts stacked; I = I_inner + γ·norm(I_down). Choices: ``norm`` divides by the expert's maximum (it sits
   inside Algorithm 1's per-expert loop), and I_inner is divided by its layer maximum so that γ weighs two
   terms of the same scale (the paper leaves I_inner's scale to the weights' norms, which would let γ
   dominate or vanish by accident); the last MoE layer has no downstream term. ``score`` selects the
   Figure 3 ablations instead: ``weight`` (‖gate row‖² + ‖up row‖² + ‖down col‖²), ``activation``
   (Wanda-style ‖A_j‖₂·‖W_down[:, j]‖₂), ``peak`` (max|A_j|).
3. **Global grouping.** All units of the layer are ranked together. Budget split (the paper's Table 5
   "80 % high" setting, our default): ``sparse_share`` of the layer's budget buys the top units kept dense
   (3H parameters each). Of the remaining units the top ``lowrank_share`` are medium-importance and the rest
   are pruned. Choice: medium units are approximated in gate, up *and* down (one rank k_e per expert for
   all three, cost 3·k_e·(H + m_e)); k is uniform over the layer's experts, leftover ranks go to the most
   routed experts (as budget.py does for D²), and no expert's low-rank part may cost more than storing its
   m_e units dense (then the surplus buys more sparse units instead). An expert left with rank 0 has its
   medium units pruned.
4. **Activation-aware SVD (§3.4)** of each expert's medium rows of W_gate and W_up with the eigendecomposition
   of its input Gram XᵀX (linalg.eigen_whitened_factors; one EVD serves gate and up), and of its medium
   columns of W_down with its intermediate Gram restricted to those channels. ``lowrank_svd="plain"``
   (Table 3's "Standard SVD") uses the plain truncated SVD instead.
5. **Down base.** ``base="ridge"`` (the paper): a down base B [H, I] shared by the layer's experts, fitted
   by ridge regression so that B·h̃_e compensates what the compressed expert misses:
   min Σ_(tokens, e) w²‖y_e − D_e h̃_e − B h̃_e‖² + λ‖B‖², with y_e the original expert output, h̃_e the
   intermediate of the compressed gate/up, D_e the expert's own compressed down. Choices: λ is relative
   (λ·mean diag of the Gram, λ = 1e-3 by default), and the fit uses the first ``ridge_samples`` routed
   tokens of each expert. ``mean``/``frequency`` are the merged-base ablations of Table 4 (D²-style: the
   experts' down deltas W_down,e − B are decomposed instead); ``none`` stores no base.

Memory: nothing above needs a whole projection, so the layer's experts are read an expert at a time from
their ``ExpertStack``s (offline/source_model.py) and never stacked: the unit scores per expert, the downstream
influence a chunk of the next layer's experts at a time (:func:`downstream_influence`, float32 as before), the
merged bases and deltas as D²-MoE forms them (d2.merge_base, d2.DeltaStack), the decompositions (on the CPU
``torch.get_num_threads()`` experts at once, one thread each: :func:`decompose_experts`) and the ridge fit's
sums expert by expert. Each expert's matrices are read and decomposed in float64 (the source's values, exactly),
and its sparse units and low-rank factors are kept in float32 as soon as they are formed (methods.base.as_stored:
the checkpoint stores float32 at most, so no stored byte changes, and the layer holds half of what float64 would:
at Qwen3-30B-A3B's shapes and ratio 0.6, 0.9 instead of 1.8 GiB, BENCHMARKS.md §12.10); the ridge base is fitted
to the layer so held. The ridge fit's Gram [I, I] and cross term [H, I] are float64, summed over every expert's
tokens before one solve.

Layer budgets (§3.5) come from offline/layer_allocation.py (``allocation``: ``mi``, ``uniform``, ``reverse``).
The checkpoint scheme is ``sparse_lowrank`` (vllm_moe_compress/format/schemes/sparse_lowrank.py, docs/format.md §9).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..budget import LayerShape
from ..calibration import ActivationMoments, ExpertStatistics, clock, elapsed
from ..choices import ALLOCATIONS, RS_BASES, RS_LOWRANK_SVDS, RS_SCORES
from ..layer_allocation import MIOptions, layer_keep_fractions
from ..linalg import eigen_whitened_factors, gram_eigen
from ..options import MethodOptions, check_choice, check_positive, check_range, option
from vllm_moe_compress.format.schemes.sparse_lowrank import ExpertUnits, SparseLowRankLayer
from .base import CompressionMethod, ExpertWeights, LayerInputs, LayerResult, as_stored, in_one_thread_workers
from .d2 import DeltaStack, merge_base

log = logging.getLogger(__name__)

def _by_max(t: torch.Tensor) -> torch.Tensor:
    """``t`` divided by its maximum (over all of ``t``); all-zero stays zero."""
    top = t.max()
    return t / top if top > 0 else t


NEXT_EXPERT_CHUNK = 16
"""Next-layer experts whose V_in rows are formed at once by :func:`downstream_influence` (float32, 16·I·H·4 B:
0.1 GiB at Qwen3-30B-A3B's shapes)."""


def down_norms_sq(down) -> torch.Tensor:
    """‖W_down[:, j]‖² of every unit, [E, I], read an expert at a time (``down``: [E, H, I] or an ExpertStack)."""
    return torch.stack([down[e].pow(2).sum(0) for e in range(len(down))])


def downstream_influence(down, next_weights: ExpertWeights, chunk: int = NEXT_EXPERT_CHUNK) -> torch.Tensor:
    """Algorithm 1 lines 7–9: I_down[e] = |W_down,eᵀ V_inᵀ| ‖rows of V_in‖, V_in = next layer's (gate+up)/2. [E, I]

    V_in has one row per unit of the next layer (all its experts), so it is never formed whole: its rows are
    built ``chunk`` next-layer experts at a time (float32, as the product is computed), every expert of this
    layer is multiplied by them (its W_down read again per chunk) and the chunks' sums are added in float64.
    Neither layer's experts are stacked.

    Cost: E·I·H·E_next·I_next multiply-adds (19.8 T at Qwen3-30B-A3B's shapes), in GEMMs that run at the rate
    of a large square float32 GEMM (BENCHMARKS.md §12.10). With a_j the unit's down column and v_r the rows of
    V_in, I_down[e, j] = Σ_r |a_j · v_r| ‖v_r‖: the absolute value inside the sum needs every product a_j · v_r,
    so no contraction through a Gram or a factorisation of V_in gives the same quantity (Σ_r ‖v_r‖ v_r v_rᵀ
    first would give Σ_r (a_j · v_r)² ‖v_r‖, another score)."""
    num_next = len(next_weights["gate"])
    influence = torch.zeros(len(down), down.shape[2], dtype=torch.float64)
    for start in range(0, num_next, chunk):
        v_in = torch.cat([((next_weights["gate"][n] + next_weights["up"][n]) / 2).float()
                          for n in range(start, min(start + chunk, num_next))])
        row_norms = v_in.norm(dim=1)
        for e in range(len(down)):
            influence[e] += ((down[e].T.float() @ v_in.T).abs() @ row_norms).double()
    return influence


def aci_scores(weights: ExpertWeights, moments: ActivationMoments, counts: torch.Tensor,
               next_weights: ExpertWeights | None, aci: ACIWeights) -> torch.Tensor:
    """Algorithm 1 for every unit of the layer, [E, I] (normalisations: module docstring, step 2)."""
    n = counts.clamp_min(1).double()[:, None]
    mean_sq = moments.sum_sq / n
    var_sq = (moments.sum_quad / n - mean_sq**2).clamp_min(0)
    hybrid = aci.w_mean * _by_max(mean_sq) + aci.w_var * _by_max(var_sq) + aci.w_peak * _by_max(moments.peak)
    inner = _by_max(hybrid * down_norms_sq(weights["down"]))
    if next_weights is None:
        return inner
    downstream = downstream_influence(weights["down"], next_weights)
    return inner + aci.gamma * torch.stack([_by_max(d) for d in downstream])


def unit_scores(metric: str, weights: ExpertWeights, stats: ExpertStatistics,
                next_weights: ExpertWeights | None, aci: ACIWeights) -> torch.Tensor:
    """Importance of every collaborative unit, [E, I], by ``metric`` (one of choices.RS_SCORES), computed an
    expert at a time."""
    if metric == "weight":
        gate, up = weights["gate"], weights["up"]
        row_norms_sq = torch.stack([gate[e].pow(2).sum(1) + up[e].pow(2).sum(1) for e in range(len(gate))])
        return row_norms_sq + down_norms_sq(weights["down"])
    if metric == "activation":
        return stats.moments.sum_sq.sqrt() * down_norms_sq(weights["down"]).sqrt()
    if metric == "peak":
        return stats.moments.peak.clone()
    return aci_scores(weights, stats.moments, stats.counts, next_weights, aci)


def lowrank_rank_cap(units: int, hidden: int) -> int:
    """Largest rank whose factors (gate, up, down) cost no more than the ``units`` dense: k(H + m) <= mH."""
    return min(units, hidden, units * hidden // (hidden + units)) if units else 0


def allocate_lowrank_ranks(budget: int, lowrank_counts: list[int], hidden: int, frequencies: list[float]) -> list[int]:
    """One rank k for every expert with low-rank units (each capped), leftover ranks to the most routed."""
    cost = [3 * (hidden + m) for m in lowrank_counts]
    caps = [lowrank_rank_cap(m, hidden) for m in lowrank_counts]

    def spent(k: int) -> int:
        return sum(c * min(k, cap) for c, cap in zip(cost, caps))

    k = 0
    while k < max(caps, default=0) and spent(k + 1) <= budget:
        k += 1
    ranks = [min(k, cap) for cap in caps]
    leftover = budget - spent(k)
    for e in sorted(range(len(ranks)), key=lambda e: (-frequencies[e], e)):
        if ranks[e] < caps[e] and cost[e] <= leftover:
            ranks[e] += 1
            leftover -= cost[e]
    return ranks


@dataclass
class UnitPlan:
    sparse: list[list[int]]   # per expert, its sparse channels (sorted)
    lowrank: list[list[int]]  # per expert, its low-rank channels (sorted; empty when its rank is 0)
    ranks: list[int]

    def params(self, hidden: int) -> int:
        return sum(3 * hidden * len(s) + 3 * k * (hidden + len(m)) for s, m, k in zip(self.sparse, self.lowrank, self.ranks))


def partition_units(scores: torch.Tensor, budget: int, hidden: int, sparse_share: float, lowrank_share: float,
                    frequencies: list[float]) -> UnitPlan:
    """Global grouping (§3.4) under ``budget`` parameters: top units sparse, next low-rank, rest pruned."""
    num_experts, intermediate = scores.shape
    order = torch.argsort(scores.flatten(), descending=True, stable=True).tolist()
    unit_cost = 3 * hidden
    num_sparse = min(len(order), int(sparse_share * budget) // unit_cost)
    while True:
        sparse, lowrank = [[] for _ in range(num_experts)], [[] for _ in range(num_experts)]
        for u in order[:num_sparse]:
            sparse[u // intermediate].append(u % intermediate)
        rest = order[num_sparse:]
        for u in rest[: round(lowrank_share * len(rest))]:
            lowrank[u // intermediate].append(u % intermediate)
        ranks = allocate_lowrank_ranks(budget - num_sparse * unit_cost, [len(m) for m in lowrank], hidden, frequencies)
        plan = UnitPlan([sorted(s) for s in sparse], [sorted(m) if k else [] for m, k in zip(lowrank, ranks)], ranks)
        extra_units = (budget - plan.params(hidden)) // unit_cost
        if extra_units == 0 or num_sparse == len(order):
            return plan
        num_sparse = min(len(order), num_sparse + extra_units)  # low-rank saturated: buy dense units


def compressed_intermediate(layer: SparseLowRankLayer, expert: int, x: torch.Tensor) -> torch.Tensor:
    """h̃ = act(Ŵ_gate x) ⊙ Ŵ_up x of a compressed expert, [n, I] (zero on pruned channels)."""
    return F.silu(x @ layer.dense_weight(expert, "gate").T) * (x @ layer.dense_weight(expert, "up").T)


def ridge_down_base(layer: SparseLowRankLayer, weights: ExpertWeights, moments: ActivationMoments,
                    lam: float) -> torch.Tensor:
    """B = argmin Σ w²‖y − D_e h̃ − B h̃‖² + λ·mean(diag G)‖B‖² over the kept routed tokens (§3.4), [H, I]."""
    h, i = layer.hidden_size, layer.intermediate_size
    gram = torch.zeros(i, i, dtype=torch.float64)
    cross = torch.zeros(h, i, dtype=torch.float64)
    for e in range(layer.num_experts):
        x, w = moments.samples(e, h)
        if not len(w):
            continue
        original = F.silu(x @ weights["gate"][e].T) * (x @ weights["up"][e].T)
        target = original @ weights["down"][e].T
        approx = compressed_intermediate(layer, e, x)
        residual = target - approx @ layer.dense_weight(e, "down").T
        w2 = (w**2)[:, None]
        gram += approx.T @ (w2 * approx)
        cross += (w2 * residual).T @ approx
    scale = gram.diagonal().mean().item()
    if scale <= 0:
        return torch.zeros(h, i, dtype=torch.float64)
    regularised = gram + lam * scale * torch.eye(i, dtype=torch.float64)
    return torch.linalg.solve(regularised, cross.T).T


def _expert_job(weights: ExpertWeights, down, stats: ExpertStatistics, plan: UnitPlan, expert: int, plain: bool,
                device: torch.device) -> tuple:
    """Expert ``expert``'s sparse units (its kept rows / columns) and what its low-rank units' decomposition needs:
    (sparse channels, sparse matrices, medium channels, rank, medium gate / up rows and down columns on
    ``device``, input Gram, intermediate Gram restricted to the medium channels), read in the calling thread.
    The sparse units are kept as stored (methods.base.as_stored: float32; the source's values, exactly, when it is
    stored in 32 bits or fewer)."""
    s, m, k = torch.tensor(plan.sparse[expert], dtype=torch.int64), plan.lowrank[expert], plan.ranks[expert]
    matrices = {"gate": weights["gate"][expert], "up": weights["up"][expert], "down": down[expert]}
    sparse = dict(zip(matrices, as_stored((matrices["gate"][s], matrices["up"][s], matrices["down"][:, s]))))
    if not k:
        return s, sparse, m, 0, None, None, None
    medium = {"gate": matrices["gate"][m].to(device), "up": matrices["up"][m].to(device),
              "down": matrices["down"][:, m].to(device)}
    # copies: a Gram chunk (calibration.ExpertGrams) is not kept alive by the experts in flight
    input_gram = stats.input_gram[expert].to(device, copy=True)
    inter_gram = stats.inter_gram[expert][m][:, m].to(device)
    if plain:  # a zero Gram makes eigen_whitened_factors the plain SVD
        input_gram, inter_gram = torch.zeros_like(input_gram), torch.zeros_like(inter_gram)
    return s, sparse, m, k, medium, input_gram, inter_gram


def _decompose(job: tuple) -> ExpertUnits:
    """One expert's units from :func:`_expert_job`: the low-rank factors of its medium units (§3.4, one EVD of
    the input Gram for gate and up), computed in float64 and kept as stored (float32 on the CPU, as_stored)."""
    s, sparse, m, k, medium, input_gram, inter_gram = job
    lowrank = dict.fromkeys(sparse)
    if k:
        input_eigen = gram_eigen(input_gram)  # [H, H]
        for p in ("gate", "up"):
            lowrank[p] = as_stored(eigen_whitened_factors(medium[p], input_eigen, k))
        lowrank["down"] = as_stored(eigen_whitened_factors(medium["down"], gram_eigen(inter_gram), k))
    return ExpertUnits(s, sparse, torch.tensor(m, dtype=torch.int64), lowrank)


def decompose_experts(weights: ExpertWeights, down, stats: ExpertStatistics, plan: UnitPlan, plain: bool,
                      device: torch.device) -> list[ExpertUnits]:
    """Every expert's units under ``plan`` (``down``: the down projections, or their deltas from a merged base).

    As methods.base.factorize_experts does: on the CPU ``torch.get_num_threads()`` experts are decomposed at
    once, each on one thread (the EVD of the [H, H] input Gram and the SVDs are mid-sized LAPACK calls, which
    waste much of a second thread's time on waiting when split over two, BENCHMARKS.md §12.3); the inputs of a
    round are read in expert order in the calling thread, so at most that many experts' matrices are held.
    An expert's result does not depend on the number of threads. On another device, one expert at a time."""
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    return list(in_one_thread_workers(len(plan.ranks), lambda e: _expert_job(weights, down, stats, plan, e, plain,
                                                                             device), _decompose, workers))


@dataclass(frozen=True)
class ACIWeights:
    """Algorithm 1's hyperparameters (RS-MoE), App. A.2 defaults."""

    w_mean: float = 0.4
    w_var: float = 0.05
    w_peak: float = 0.8
    gamma: float = 0.05


@dataclass(frozen=True)
class RSOptions(MethodOptions):
    """RS-MoE options (--method rs; docs/methods.md)"""

    flag_prefix: ClassVar[str] = "rs-"

    score: str = option("aci", "unit importance: aci (Algorithm 1) or the Figure 3 ablations weight / activation / "
                        "peak", choices=RS_SCORES)
    base: str = option("ridge", "shared down base: ridge regression (§3.4), mean / frequency merge (Table 4), none",
                       choices=RS_BASES)
    allocation: str = option("mi", "layer budgets: mi (MINE + QP, §3.5), uniform, reverse (Table 2)",
                             choices=ALLOCATIONS)
    sparse_share: float = option(0.8, "fraction of each layer's budget spent on dense (sparse-component) units")
    lowrank_share: float = option(0.5, "fraction of the remaining units approximated low-rank; the rest are pruned")
    ridge_lambda: float = option(1e-3, "ridge λ, relative to the Gram's mean diagonal")
    ridge_samples: int = option(2048, "routed tokens kept per expert for the ridge fit and the unit scores")
    lowrank_svd: str = option("activation", "SVD of the low-rank units: activation-aware via the EVD of XᵀX "
                              "(§3.4) or plain (Table 3)", choices=RS_LOWRANK_SVDS)
    aci: ACIWeights = option(ACIWeights(), "ACI weights", flag="--rs-aci")
    mi: MIOptions = option(MIOptions(), "MI layer budgets")

    def __post_init__(self):
        for value, allowed, what in ((self.score, RS_SCORES, "score"), (self.base, RS_BASES, "base"),
                                     (self.allocation, ALLOCATIONS, "allocation"),
                                     (self.lowrank_svd, RS_LOWRANK_SVDS, "lowrank_svd")):
            check_choice(value, allowed, what)
        check_range(self.sparse_share, 0.0, 1.0, "sparse_share")
        check_range(self.lowrank_share, 0.0, 1.0, "lowrank_share")
        if self.ridge_lambda < 0:
            raise ValueError(f"ridge_lambda must be >= 0, got {self.ridge_lambda}")
        check_positive(self.ridge_samples, "ridge_samples")


class RSMoE(CompressionMethod):
    """RS-MoE on one layer: ridge down base, ACI-scored sparse + low-rank units, MI layer budgets (module docstring)."""

    name = "rs"
    Options = RSOptions

    @property
    def needs_next_layer(self) -> bool:
        """Only ACI's downstream influence reads the next MoE layer."""
        return self.opts.score == "aci"

    @property
    def moment_samples(self) -> int:
        return self.opts.ridge_samples

    def fixed_params(self, shape: LayerShape) -> int:
        return 0 if self.opts.base == "none" else shape.hidden_size * shape.intermediate_size

    def layer_budget_weights(self, source, samples, shapes, keep_fraction, batch_size):
        return layer_keep_fractions(self.opts.allocation, source, samples, shapes, keep_fraction, batch_size,
                                    self.opts.mi) or None

    def compress_layer(self, inputs: LayerInputs) -> LayerResult:
        opts, weights, stats, shape = self.opts, inputs.weights, inputs.stats, inputs.shape
        started = clock()
        scores = unit_scores(opts.score, weights, stats, inputs.next_weights, opts.aci)
        scored = elapsed(started)
        plan = partition_units(scores, inputs.budget, shape.hidden_size, opts.sparse_share, opts.lowrank_share,
                               stats.frequencies)
        base = None
        down = weights["down"]
        if opts.base in ("mean", "frequency"):
            importance = stats.counts.double() if opts.base == "frequency" else torch.ones(shape.num_experts)
            base = merge_base(down, importance)
            down = DeltaStack(down, base)
        decompositions_started = clock()
        experts = decompose_experts(weights, down, stats, plan, opts.lowrank_svd == "plain", inputs.device)
        layer = SparseLowRankLayer(shape.hidden_size, shape.intermediate_size, experts, base)
        decomposed, ridge_started = elapsed(decompositions_started), clock()
        if opts.base == "ridge":
            layer.base_down = ridge_down_base(layer, weights, stats.moments, opts.ridge_lambda)
        log.info("rs layer seconds wall (CPU): unit scores %.1f (%.1f) (%s), decompositions %.1f (%.1f), "
                 "base %.1f (%.1f)", *scored, "with downstream influence" if inputs.next_weights else "no next layer",
                 *decomposed, *elapsed(ridge_started))
        return LayerResult(layer)
