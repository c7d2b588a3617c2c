"""Scheme ``basis_residual`` (RFID-MoE and MoBE): group-shared bases, per-expert coefficients, hashed residual.

Per factorised projection p (gate and up by default; down too with ``--factorize-down``) expert i computes

    W_i = A_i · φ(B_g(i)) + R̂_i                 one basis per group (RFID-MoE)
    W_i = A_i · φ(Σ_j α_ij B_j)                  mixed bases (MoBE, ``spec.mixed``)

with R̂_i member ``slot(i)`` of reshape(P η_g(i)), P the seeded one-hot projection of kernels/residual_hash.py.
Projections that are not factorised keep the original dense expert matrices. φ(B_g) is computed once when
the module is built (weights only), so the forward is a shared right factor per group and an expert-specific
left factor; R̂_i is regenerated from (η, seed, counts) in bounded chunks and never stored per expert
(kernels/basis_residual_torch.py). Tensors and spec fields: docs/format.md §10.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from vllm_moe_compress.format import PROJECTIONS, BasisResidualSpec, FormatError, matrix_shape
from vllm_moe_compress.format.names import basis_name, coef_name, counts_name, dense_name, eta_name, mix_name
from vllm_moe_compress.kernels.basis_residual_torch import ACTIVATIONS, ProjectionWeights, basis_residual_moe
from vllm_moe_compress.kernels.residual_hash import bucket_counts, bucket_scales, residual_block

from .base import SchemeLayer, fetch_checked


@dataclass
class BasisProjection:
    """One factorised projection: ``bases[j]`` [K_j, in] before φ, ``coefs[i]`` [out, K], optional mixing
    weights ``mix`` [E, m] (MoBE) and residual vectors ``etas[g]`` [a] (RFID-MoE)."""

    bases: list[torch.Tensor]
    coefs: list[torch.Tensor]
    mix: torch.Tensor | None = None
    etas: list[torch.Tensor] | None = None

    def num_params(self) -> int:
        n = sum(t.numel() for t in self.bases + self.coefs)
        n += self.mix.numel() if self.mix is not None else 0
        return n + (sum(t.numel() for t in self.etas) if self.etas is not None else 0)


@dataclass
class BasisResidualLayer(SchemeLayer):
    hidden_size: int
    intermediate_size: int
    groups: list[list[int]]  # experts of each group, in group-matrix order
    activation: str
    factorized: dict[str, BasisProjection]
    dense: dict[str, torch.Tensor]  # proj -> [E, out, in] for projections kept dense
    residual_size: int = 0
    residual_seed: int = 0
    scheme = "basis_residual"

    @property
    def num_experts(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def group_of(self) -> list[tuple[int, int]]:
        """(group, slot in the group) per expert."""
        return self.spec(0, "").group_and_slot()

    @cached_property
    def residual_counts(self) -> torch.Tensor:
        """n_q of the shared P for this layer's group-matrix size k·I·H."""
        k = len(self.groups[0])
        return bucket_counts(k * self.hidden_size * self.intermediate_size, self.residual_seed, self.residual_size)

    # ------------------------------------------------------------------------------------ spec and sizes

    def spec(self, layer: int, prefix: str) -> BasisResidualSpec:
        return BasisResidualSpec(
            layer=layer, prefix=prefix, num_experts=self.num_experts,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            ranks={p: [c.shape[1] for c in f.coefs] for p, f in self.factorized.items()},
            activation=self.activation, groups=self.groups,
            basis_ranks={p: [b.shape[0] for b in f.bases] for p, f in self.factorized.items()},
            mixed=self.mixed, residual_size=self.residual_size, residual_seed=self.residual_seed,
        )

    @property
    def mixed(self) -> bool:
        return any(f.mix is not None for f in self.factorized.values())

    def allocation(self) -> dict:
        spec = self.spec(0, "")
        return {"ranks": spec.ranks, "basis_ranks": spec.basis_ranks, "groups": self.groups,
                "params": self.params_by_projection()}

    def params_by_projection(self) -> dict[str, int]:
        counts = {p: f.num_params() for p, f in self.factorized.items()}
        return {**counts, **{p: t.numel() for p, t in self.dense.items()}}

    # ------------------------------------------------------------------------------------ tensors

    def to_tensors(self, prefix: str, proj_names: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {}
        for p, f in self.factorized.items():
            name = proj_names[p]
            for e, coef in enumerate(f.coefs):
                out[coef_name(prefix, e, name)] = coef.to(dtype).contiguous()
            for j, basis in enumerate(f.bases):
                out[basis_name(prefix, j, name)] = basis.to(dtype).contiguous()
            if f.mix is not None:
                out[mix_name(prefix, name)] = f.mix.to(dtype).contiguous()
            for g, eta in enumerate(f.etas or []):
                out[eta_name(prefix, g, name)] = eta.to(dtype).contiguous()
        for p, weights in self.dense.items():
            for e in range(weights.shape[0]):
                out[dense_name(prefix, e, proj_names[p])] = weights[e].to(dtype).contiguous()
        if self.residual_size:
            out[counts_name(prefix)] = self.residual_counts.to(torch.int32)
        return out

    @classmethod
    def from_tensors(cls, spec: BasisResidualSpec, proj_names: dict[str, str], get) -> "BasisResidualLayer":
        prefix, h, i_size = spec.prefix, spec.hidden_size, spec.intermediate_size
        factorized, dense = {}, {}
        for p in PROJECTIONS:
            name = proj_names[p]
            out_dim, in_dim = matrix_shape(p, h, i_size)
            if p not in spec.basis_ranks:
                dense[p] = torch.stack([fetch_checked(get, dense_name(prefix, e, name), (out_dim, in_dim))
                                        for e in range(spec.num_experts)])
                continue
            basis_ranks = spec.basis_ranks[p]
            bases = [fetch_checked(get, basis_name(prefix, j, name), (r, in_dim)) for j, r in enumerate(basis_ranks)]
            coefs = [fetch_checked(get, coef_name(prefix, e, name), (out_dim, r)) for e, r in enumerate(spec.ranks[p])]
            mix = fetch_checked(get, mix_name(prefix, name), (spec.num_experts, len(bases))) if spec.mixed else None
            etas = [fetch_checked(get, eta_name(prefix, g, name), (spec.residual_size,))
                    for g in range(len(spec.groups))] if spec.residual_size else None
            factorized[p] = BasisProjection(bases, coefs, mix, etas)
        layer = cls(h, i_size, spec.groups, spec.activation, factorized, dense, spec.residual_size, spec.residual_seed)
        if layer.residual_size:
            stored = fetch_checked(get, counts_name(prefix), (layer.residual_size,))
            if not torch.equal(stored.long(), layer.residual_counts):
                raise FormatError(f"tensor {counts_name(prefix)} does not match the bucket counts of residual_seed "
                                  f"{layer.residual_seed}")
        return layer

    # ------------------------------------------------------------------------------------ math

    def right_factor(self, expert: int, proj: str) -> torch.Tensor:
        f = self.factorized[proj]
        phi = ACTIVATIONS[self.activation]
        if f.mix is not None:
            return phi(torch.einsum("m,mri->ri", f.mix[expert].double(), torch.stack([b.double() for b in f.bases])))
        return phi(f.bases[self.group_of[expert][0]].double())

    def residual_weight(self, expert: int, proj: str) -> torch.Tensor:
        """R̂_i materialised from the hash (tests and analysis only)."""
        group, slot = self.group_of[expert]
        out_dim, in_dim = matrix_shape(proj, self.hidden_size, self.intermediate_size)
        scaled = self.factorized[proj].etas[group].double() * bucket_scales(self.residual_counts)
        return residual_block(scaled, self.residual_seed, slot * out_dim * in_dim, in_dim, range(out_dim), range(in_dim))

    def dense_weight(self, expert: int, proj: str) -> torch.Tensor:
        if proj in self.dense:
            return self.dense[proj][expert].double()
        w = self.factorized[proj].coefs[expert].double() @ self.right_factor(expert, proj)
        if self.residual_size:
            w = w + self.residual_weight(expert, proj)
        return w

    def projection_weights(self, proj: str) -> ProjectionWeights:
        """The torch path's tensors for ``proj`` (kernels/basis_residual_torch.py), φ(B) precomputed."""
        empty = torch.zeros(0)
        if proj in self.dense:
            return ProjectionWeights(self.dense[proj], empty, torch.zeros(0, dtype=torch.int64), empty,
                                     torch.zeros(0, dtype=torch.int64), empty, empty)
        f = self.factorized[proj]
        bases = torch.cat(f.bases)
        right = bases if f.mix is not None else ACTIVATIONS[self.activation](bases)
        scaled_eta = torch.stack(f.etas) * bucket_scales(self.residual_counts, f.etas[0].dtype) \
            if f.etas is not None else empty
        return ProjectionWeights(
            empty, torch.cat(f.coefs, dim=1), torch.tensor([c.shape[1] for c in f.coefs]), right,
            torch.tensor([b.shape[0] for b in f.bases]), f.mix if f.mix is not None else empty, scaled_eta,
        )

    def experts_module(self, dynamic_prune_ratio: float = 0.0) -> nn.Module:
        return BasisResidualExperts(self)


class BasisResidualExperts(nn.Module):
    """Reference forward of a ``basis_residual`` layer (see the module docstring)."""

    def __init__(self, layer: BasisResidualLayer):
        super().__init__()
        self.activation, self.seed, self.intermediate = layer.activation, layer.residual_seed, layer.intermediate_size
        for proj in PROJECTIONS:
            for field, tensor in layer.projection_weights(proj)._asdict().items():
                self.register_buffer(f"{proj}_{field}", tensor)
        groups, slots = zip(*layer.group_of)
        self.register_buffer("expert_group", torch.tensor(groups, dtype=torch.int64))
        self.register_buffer("expert_slot", torch.tensor(slots, dtype=torch.int64))

    def weights(self, proj: str) -> ProjectionWeights:
        return ProjectionWeights(*(getattr(self, f"{proj}_{f}") for f in ProjectionWeights._fields))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return basis_residual_moe(
            hidden_states, top_k_index, top_k_weights, *(self.weights(p) for p in PROJECTIONS), self.expert_group,
            self.expert_slot, self.activation, self.seed, self.intermediate, 0,
        )
