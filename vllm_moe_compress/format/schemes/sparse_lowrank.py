"""Scheme ``sparse_lowrank`` (RS-MoE): one layer in memory, its tensors, its reference forward.

Each expert's intermediate channels (collaborative units) are sparse (gate/up rows and down column stored
dense), low-rank (gate/up rows and down columns given by rank-k factors over the expert's low-rank
channels) or pruned (nothing stored); an optional shared down base ``B`` [H, I] acts on every expert's
intermediate. Expert e is therefore the dense expert with

    W_gate,e[j] = G_e[j] (j sparse),  (Ug Vg)[j] (j low-rank),  0 (pruned);   W_up,e likewise
    W_down,e    = B + scatter(D_S,e) + scatter(Ud Vd)

The reference forward runs kernels/sparse_lowrank_torch.py (the function the vLLM plugin calls) on the
packed buffers; nothing dense is materialised (``dense_weight`` exists for tests and analysis only).
Tensors: docs/format.md §9.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vllm_moe_compress.format import PROJECTIONS, SparseLowRankSpec, matrix_shape
from vllm_moe_compress.format.names import base_name, unit_channels_name, unit_name
from vllm_moe_compress.kernels.sparse_lowrank_torch import sparse_lowrank_moe

from .base import SchemeLayer, fetch_checked

Factors = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ExpertUnits:
    """One expert: ``sparse[p]`` gate/up [s, H], down [H, s]; ``lowrank[p]`` (U, V) or None (rank 0) with
    gate/up U [m, k], V [k, H] and down U [H, k], V [k, m]."""

    sparse_channels: torch.Tensor  # int64 [s], sorted
    sparse: dict[str, torch.Tensor]
    lowrank_channels: torch.Tensor  # int64 [m], sorted
    lowrank: dict[str, Factors | None]

    def rank(self, proj: str) -> int:
        f = self.lowrank[proj]
        return 0 if f is None else int(f[1].shape[0])


@dataclass
class SparseLowRankLayer(SchemeLayer):
    hidden_size: int
    intermediate_size: int
    experts: list[ExpertUnits]
    base_down: torch.Tensor | None = None  # [H, I]
    scheme = "sparse_lowrank"

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def ranks(self) -> dict[str, list[int]]:
        return {p: [ex.rank(p) for ex in self.experts] for p in PROJECTIONS}

    def counts(self) -> dict[str, list[int]]:
        return {"sparse_channels": [int(ex.sparse_channels.numel()) for ex in self.experts],
                "lowrank_channels": [int(ex.lowrank_channels.numel()) for ex in self.experts]}

    def params_by_projection(self) -> dict[str, int]:
        counts = dict.fromkeys(PROJECTIONS, 0)
        for ex in self.experts:
            for p, t in ex.sparse.items():
                counts[p] += t.numel()
            for p, f in ex.lowrank.items():
                if f is not None:
                    counts[p] += f[0].numel() + f[1].numel()
        if self.base_down is not None:
            counts["down"] += self.base_down.numel()
        return counts

    def allocation(self) -> dict:
        return {"ranks": self.ranks(), **self.counts(), "base_channels": self._base_channels()}

    def _base_channels(self) -> int:
        return 0 if self.base_down is None else self.intermediate_size

    def spec(self, layer: int, prefix: str) -> SparseLowRankSpec:
        return SparseLowRankSpec(layer=layer, prefix=prefix, num_experts=self.num_experts,
                                 hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                                 ranks=self.ranks(), **self.counts(), shared_down_base=self.base_down is not None)

    def dense_weight(self, expert: int, proj: str) -> torch.Tensor:
        """Materialise W_e,p in float64 (tests and analysis only; serving never does this)."""
        ex = self.experts[expert]
        h, i = self.hidden_size, self.intermediate_size
        if proj == "down":
            w = torch.zeros(h, i, dtype=torch.float64) if self.base_down is None else self.base_down.double().clone()
            w[:, ex.sparse_channels] += ex.sparse[proj].double()
            if ex.lowrank[proj] is not None:
                w[:, ex.lowrank_channels] += ex.lowrank[proj][0].double() @ ex.lowrank[proj][1].double()
            return w
        w = torch.zeros(i, h, dtype=torch.float64)
        w[ex.sparse_channels] = ex.sparse[proj].double()
        if ex.lowrank[proj] is not None:
            w[ex.lowrank_channels] = ex.lowrank[proj][0].double() @ ex.lowrank[proj][1].double()
        return w

    def to_tensors(self, prefix: str, proj_names: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {}
        for e, ex in enumerate(self.experts):
            for kind, channels in (("sparse", ex.sparse_channels), ("lowrank", ex.lowrank_channels)):
                if channels.numel():
                    out[unit_channels_name(prefix, e, kind)] = channels.to(torch.int32)
            for p in PROJECTIONS:
                if ex.sparse_channels.numel():
                    out[unit_name(prefix, e, proj_names[p], "sparse")] = ex.sparse[p].to(dtype).contiguous()
                if ex.lowrank[p] is not None:
                    out[unit_name(prefix, e, proj_names[p], "lowrank_u")] = ex.lowrank[p][0].to(dtype).contiguous()
                    out[unit_name(prefix, e, proj_names[p], "lowrank_v")] = ex.lowrank[p][1].to(dtype).contiguous()
        if self.base_down is not None:
            out[base_name(prefix, proj_names["down"])] = self.base_down.to(dtype).contiguous()
        return out

    @classmethod
    def from_tensors(cls, spec: SparseLowRankSpec, proj_names: dict[str, str], get) -> "SparseLowRankLayer":
        h, prefix = spec.hidden_size, spec.prefix
        indices = {}
        for e in range(spec.num_experts):
            for kind in ("sparse", "lowrank"):
                count = spec.unit_counts(kind)[e]
                if count:
                    name = unit_channels_name(prefix, e, kind)
                    indices[name] = fetch_checked(get, name, (count,)).tolist()
        spec.check_indices(indices)
        experts = []
        for e in range(spec.num_experts):
            s, m = spec.sparse_channels[e], spec.lowrank_channels[e]
            sparse = {}
            lowrank = {}
            for p in PROJECTIONS:
                name = proj_names[p]
                sparse[p] = (fetch_checked(get, unit_name(prefix, e, name, "sparse"), matrix_shape(p, h, s))
                             if s else torch.zeros(matrix_shape(p, h, 0), dtype=torch.float64))
                r = spec.ranks[p][e]
                u_shape, v_shape = ((h, r), (r, m)) if p == "down" else ((m, r), (r, h))
                lowrank[p] = (fetch_checked(get, unit_name(prefix, e, name, "lowrank_u"), u_shape),
                              fetch_checked(get, unit_name(prefix, e, name, "lowrank_v"), v_shape)) if r else None
            experts.append(ExpertUnits(
                torch.tensor(indices.get(unit_channels_name(prefix, e, "sparse"), []), dtype=torch.int64), sparse,
                torch.tensor(indices.get(unit_channels_name(prefix, e, "lowrank"), []), dtype=torch.int64), lowrank))
        base = None
        if spec.shared_down_base:
            base = fetch_checked(get, base_name(prefix, proj_names["down"]), (h, spec.intermediate_size))
        return cls(h, spec.intermediate_size, experts, base)

    def packed(self) -> dict[str, torch.Tensor]:
        """The packed layout of kernels/sparse_lowrank_torch.py for the whole intermediate dimension."""
        h = self.hidden_size
        f64 = torch.float64

        def cat(parts, dim, empty_shape):
            parts = [t.to(f64) for t in parts]
            return torch.cat(parts, dim) if parts else torch.zeros(empty_shape, dtype=f64)

        def factor(p, index):
            return [ex.lowrank[p][index] for ex in self.experts if ex.lowrank[p] is not None]

        ranks = self.ranks()
        return {
            "sparse_counts": torch.tensor(self.counts()["sparse_channels"], dtype=torch.int64),
            "lowrank_counts": torch.tensor(self.counts()["lowrank_channels"], dtype=torch.int64),
            "ranks": torch.tensor([ranks[p] for p in PROJECTIONS], dtype=torch.int64),
            "sparse_gate_up": cat([ex.sparse[p] for p in ("gate", "up") for ex in self.experts], 0, (0, h)),
            "sparse_down": cat([ex.sparse["down"] for ex in self.experts], 1, (h, 0)),
            "lowrank_gate_up_u": cat([u.reshape(-1) for p in ("gate", "up") for u in factor(p, 0)], 0, (0,)),
            "lowrank_gate_up_v": cat([v for p in ("gate", "up") for v in factor(p, 1)], 0, (0, h)),
            "lowrank_down_u": cat(factor("down", 0), 1, (h, 0)),
            "lowrank_down_v": cat([v.reshape(-1) for v in factor("down", 1)], 0, (0,)),
            "base_down": self.base_down.to(f64) if self.base_down is not None else torch.zeros(h, 0, dtype=f64),
            "sparse_channels": torch.cat([ex.sparse_channels for ex in self.experts]).long(),
            "lowrank_channels": torch.cat([ex.lowrank_channels for ex in self.experts]).long(),
        }

    def experts_module(self, dynamic_prune_ratio: float = 0.0) -> nn.Module:
        return SparseLowRankExperts(self)


class SparseLowRankExperts(nn.Module):
    """Reference forward of a ``sparse_lowrank`` layer over its packed buffers (no dynamic pruning)."""

    def __init__(self, layer: SparseLowRankLayer):
        super().__init__()
        for name, tensor in layer.packed().items():
            self.register_buffer(name, tensor)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        b = dict(self.named_buffers())
        return sparse_lowrank_moe(hidden_states, top_k_index, top_k_weights, **b)
