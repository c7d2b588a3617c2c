"""MoBE (Chen et al., ICLR 2026; inclusionAI/MoBE train.py): mixture of basis experts.

Per layer and factorised projection, Ŵ_i = A_i · φ(Σ_j α_ij B_j) with m = E/k bases B_j [r, in] shared by all
experts, α_i = softmax of learned logits, φ = SiLU (tanh option). Initialised from the truncated SVD of
consecutive expert groups (by index, as train.py), then fitted by full-batch Adam on the scaled MSE
(methods/basis_fit.py). Parameters per projection: E·out·r + m·r·in + E·m; r is the largest the layer's
budget pays for (the leftover, less than one rank, stays unspent). Stored as scheme ``basis_residual`` with
``mixed`` bases and no residual.
"""

from __future__ import annotations

from ..budget import LayerShape
from .base import LayerInputs, LayerResult
from .basis_fit import fit_mixed
from .basis_method import BasisMethod
from .group_basis import index_groups


class MoBE(BasisMethod):
    name = "mobe"

    def rank_cost(self, proj: str, shape: LayerShape) -> int:
        out_dim, in_dim = self.dims(proj, shape)
        return shape.num_experts * out_dim + self.num_groups(shape) * in_dim

    def floor_params(self, proj: str, shape: LayerShape) -> int:
        return self.rank_cost(proj, shape) + shape.num_experts * self.num_groups(shape)

    def largest_parameter(self, proj: str, shape: LayerShape, params: int) -> int:
        """The bases [m, K, in] or one group's coefficients [k, out, K] (basis_fit.fit_mixed), at the rank K that
        ``params`` parameters pay for."""
        out_dim, in_dim = self.dims(proj, shape)
        rank = params // self.rank_cost(proj, shape)
        return max(self.num_groups(shape) * in_dim, self.opts.group_size * out_dim) * rank

    def compress_layer(self, inputs: LayerInputs) -> LayerResult:
        shape = inputs.shape
        groups = index_groups(shape.num_experts, self.opts.group_size)
        extra = self.extra_ranks(inputs.budget, shape)
        fitted = {p: fit_mixed(inputs.weights[p], groups, 1 + extra[p], self.fit, inputs.device)
                  for p in self.factorized}
        return self.build_layer(inputs.weights, fitted, shape, groups)
