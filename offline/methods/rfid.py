"""RFID-MoE (Mi et al., arXiv 2602.09316): routing-frequency × information-density rank allocation per expert
group, group-shared bases, and a residual reconstructed through a shared seeded one-hot projection.

Per MoE layer (docs/methods.md has the full reading of the paper and every choice):

1. Groups (§3.1, Eq. 6–7): experts sorted by calibration routing count, most routed first, cut into groups of
   k (default 4); F_g = the group's share of routed tokens.
2. Information density (§3.2, Eq. 8–10): E_g ∝ exp(H) of the normalised σ² spectrum of the group matrix
   [k·out, in] (float64, the eigenvalues of its Gram; ``effective_rank="singular"`` normalises σ instead,
   from its singular values); the groups on one-thread workers (group_basis.each_group).
3. Ranks (§3.3, Eq. 11–13): C_g = ξ·E_g + (1 − ξ)·F_g, K_g = max(1, ⌊K_total·C_g/ΣC⌋), capped at the group
   matrix's rank, plus the greedy settlement of group_basis.allocate_group_ranks so Σ K_g = K_total exactly;
   K_total is what the projection's share of the layer budget pays for at k·out + in parameters per rank.
4. Bases: one per group, B_g from the truncated SVD of the group matrix (Alg. 1 l.17), Ŵ_i = A_i·φ(B_g)
   (the printed Eq. 14 mixes bases of different ranks, which is undefined as written; not implemented).
5. Residual (§3.4, Eq. 15–17): per group η_g of size a = ``residual_fraction``·k·out·in (the paper's 3 %, taken
   out of the A/B budget; default 0 = off, our choice: the same parameters spent on basis ranks measured better,
   brown PPL −0.29 ± 0.03 % at 40 %, BENCHMARKS.md §9.4), one P shared by all groups, layers and projections (kernels/residual_hash.py), η initialised in
   closed form and trained jointly with A and B by Adam on the scaled loss (methods/basis_fit.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..budget import LayerShape
from ..calibration import clock, elapsed
from ..choices import EFFECTIVE_RANK_MODES
from ..options import check_choice, check_range, option
from .base import LayerInputs, LayerResult
from .basis_fit import fit_grouped
from .basis_method import BasisMethod, BasisOptions
from .group_basis import allocate_group_ranks, each_group, effective_rank, frequency_groups, fused_importance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RFIDOptions(BasisOptions):
    """RFID-MoE options (--method rfid)"""

    xi: float = option(0.75, "weight of information density vs routing frequency, C = ξE + (1−ξ)F")
    effective_rank: str = option("energy", "spectrum normalisation of the effective rank: σ² (energy, the paper) "
                                 "or σ (singular)", choices=EFFECTIVE_RANK_MODES)
    residual_fraction: float = option(0.0, "size of each group's residual vector η as a fraction of its parameters; "
                                      "0 = off is our choice, measured (BENCHMARKS.md §11.4); the paper's 0.03 = 3 %")
    residual_seed: int = option(0, "seed of the shared projection P")

    def __post_init__(self):
        super().__post_init__()
        check_range(self.xi, 0.0, 1.0, "xi")
        check_choice(self.effective_rank, EFFECTIVE_RANK_MODES, "effective rank")
        check_range(self.residual_fraction, 0.0, 1.0, "residual fraction", high_open=True)

    def record(self) -> dict:
        return {**super().record(), "xi": self.xi, "effective_rank": self.effective_rank,
                "residual_fraction": self.residual_fraction, "residual_seed": self.residual_seed}


class RFIDMoE(BasisMethod):
    name = "rfid"
    Options = RFIDOptions

    def residual_size(self, shape: LayerShape) -> int:
        """a = round(fraction · k·H·I): the same for every group and projection, so one P serves them all."""
        return round(self.opts.residual_fraction * self.opts.group_size * shape.hidden_size * shape.intermediate_size)

    def rank_units(self, shape: LayerShape) -> int:
        return self.num_groups(shape)

    def rank_cost(self, proj: str, shape: LayerShape) -> int:
        out_dim, in_dim = self.dims(proj, shape)
        return self.opts.group_size * out_dim + in_dim

    def floor_params(self, proj: str, shape: LayerShape) -> int:
        return self.num_groups(shape) * (self.rank_cost(proj, shape) + self.residual_size(shape))

    def largest_parameter(self, proj: str, shape: LayerShape, params: int) -> int:
        """One group's coefficients [k, out, K_g] or basis [K_g, in] at the largest rank ``params`` parameters pay
        for in one group (at most max_rank), or the groups' residual vectors [m, a] (basis_fit.fit_grouped)."""
        out_dim, in_dim = self.dims(proj, shape)
        rank = min(self.max_rank(proj, shape), params // self.rank_cost(proj, shape))
        return max(max(self.opts.group_size * out_dim, in_dim) * rank,
                   self.num_groups(shape) * self.residual_size(shape))

    def compress_layer(self, inputs: LayerInputs) -> LayerResult:
        weights, counts, shape, opts = inputs.weights, inputs.stats.counts, inputs.shape, self.opts
        groups = frequency_groups(counts, opts.group_size)
        frequencies = [float(counts[g].sum()) for g in groups]
        m, residual = len(groups), self.residual_size(shape)
        fitted, importance_log = {}, {}
        extra = self.extra_ranks(inputs.budget, shape)
        for p in self.factorized:
            started = clock()
            densities = list(each_group(weights[p], groups,
                                        lambda g, matrix: effective_rank(matrix, opts.effective_rank), inputs.device))
            log.info("effective ranks of %d groups of %s: %.1f s (CPU %.1f)", m, "x".join(map(str, weights[p].shape)),
                     *elapsed(started))
            importance = fused_importance(densities, frequencies, opts.xi)
            ranks = allocate_group_ranks(m + extra[p], importance, self.max_rank(p, shape))
            fitted[p] = fit_grouped(weights[p], groups, ranks, self.fit, residual, opts.residual_seed, inputs.device)
            importance_log[p] = {"effective_rank": [round(d, 3) for d in densities],
                                 "importance": [round(c, 6) for c in importance], "group_ranks": ranks}
        result = self.build_layer(weights, fitted, shape, groups, residual, opts.residual_seed)
        result.log.update({"group_frequency": frequencies, "groups": importance_log})
        return result
