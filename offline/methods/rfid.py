"""RFID-MoE (Mi et al., arXiv 2602.09316): routing-frequency × information-density rank allocation per expert
group, group-shared bases, and a residual reconstructed through a shared seeded one-hot projection.

Per MoE layer (docs/methods.md has the full reading of the paper and every choice):

1. Groups (§3.1, Eq. 6–7): experts sorted by calibration routing count, most routed first, cut into groups of
   k (default 4); F_g = the group's share of routed tokens.
2. Information density (§3.2, Eq. 8–10): E_g ∝ exp(H) of the normalised σ² spectrum of the group matrix
   [k·out, in] (float64; ``effective_rank="singular"`` normalises σ instead).
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

import torch

from ..budget import LayerShape
from .basis_fit import fit_grouped
from .basis_method import BasisMethod
from .group_basis import (
    EFFECTIVE_RANK_MODES, allocate_group_ranks, effective_rank, frequency_groups, fused_importance, group_matrix,
)


class RFIDMoE(BasisMethod):
    name = "rfid"

    def __init__(self, xi: float = 0.75, effective_rank: str = "energy", residual_fraction: float = 0.0,
                 residual_seed: int = 0, **common):
        super().__init__(**common)
        if not 0.0 <= xi <= 1.0:
            raise ValueError(f"xi must be in [0, 1], got {xi}")
        if effective_rank not in EFFECTIVE_RANK_MODES:
            raise ValueError(f"effective rank must be one of {', '.join(EFFECTIVE_RANK_MODES)}, got {effective_rank!r}")
        if not 0.0 <= residual_fraction < 1.0:
            raise ValueError(f"residual fraction must be in [0, 1), got {residual_fraction}")
        self.xi, self.effective_rank = xi, effective_rank
        self.residual_fraction, self.residual_seed = residual_fraction, residual_seed

    def options(self) -> dict:
        return {**super().options(), "xi": self.xi, "effective_rank": self.effective_rank,
                "residual_fraction": self.residual_fraction, "residual_seed": self.residual_seed}

    def residual_size(self, shape: LayerShape) -> int:
        """a = round(fraction · k·H·I): the same for every group and projection, so one P serves them all."""
        return round(self.residual_fraction * self.group_size * shape.hidden_size * shape.intermediate_size)

    def rank_units(self, shape: LayerShape) -> int:
        return self.num_groups(shape)

    def rank_cost(self, proj: str, shape: LayerShape) -> int:
        out_dim, in_dim = self.dims(proj, shape)
        return self.group_size * out_dim + in_dim

    def floor_params(self, proj: str, shape: LayerShape) -> int:
        return self.num_groups(shape) * (self.rank_cost(proj, shape) + self.residual_size(shape))

    def compress_layer(self, weights, stats, fisher, budget: int, shape: LayerShape):
        groups = frequency_groups(stats.counts, self.group_size)
        frequencies = [float(stats.counts[g].sum()) for g in groups]
        m, residual = len(groups), self.residual_size(shape)
        fitted, importance_log = {}, {}
        extra = self.extra_ranks(budget, shape)
        for p in self.factorized:
            densities = [effective_rank(group_matrix(weights[p], g), self.effective_rank) for g in groups]
            importance = fused_importance(densities, frequencies, self.xi)
            ranks = allocate_group_ranks(m + extra[p], importance, self.max_rank(p, shape))
            fitted[p] = fit_grouped(weights[p], groups, ranks, self.fit, residual, self.residual_seed)
            importance_log[p] = {"effective_rank": [round(d, 3) for d in densities],
                                 "importance": [round(c, 6) for c in importance], "group_ranks": ranks}
        layer = self.build_layer(weights, fitted, shape, groups, residual, self.residual_seed)
        self.last_log.update({"group_frequency": frequencies, "groups": importance_log})
        return layer
