"""Scheme ``base_delta`` (D²-MoE and the SVD baselines): one layer in memory, its tensors, its reference forward.

The reference forward replaces transformers' fused ``experts`` module and keeps its call signature, so
routing, shared experts and everything else stay the model's own. Experts are computed from their factors
in the packed layout of kernels/base_delta_torch.py (the function the vLLM plugin runs on CPU), never
materialised:

    g, u  = scatter(B_gate x), scatter(B_up x)   once per token
            + U_i (V_i x)                        per routed (token, expert)
    h_i   = silu(g) * u
    y     = B_down · Σ_i w_i h_i                 once per token (on the weighted sum)
            + Σ_i w_i U_i,down (V_i,down h_i)    per routed (token, expert)

Its correctness is tested against float64 dense math (tests/test_reference_moe.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vllm_moe_compress.format import PROJECTIONS, BaseDeltaSpec, FormatError, matrix_shape
from vllm_moe_compress.format.names import base_channels_name, base_name, delta_name
from vllm_moe_compress.kernels.base_delta_torch import base_delta_moe

from .base import SchemeLayer, fetch_checked

Factors = tuple[torch.Tensor, torch.Tensor]  # (U [out, r], V [r, in])


@dataclass
class BaseDeltaLayer(SchemeLayer):
    """Expert i's projection p is  W_i,p = scatter(B_p) + U_i,p V_i,p  (either term may be absent).

    ``base`` maps a canonical projection to the shared base restricted to ``base_channels``
    (gate/up: [C, H] rows, down: [H, C] columns); ``factors[p][i]`` is ``None`` for rank 0.
    """

    hidden_size: int
    intermediate_size: int
    factors: dict[str, list[Factors | None]]
    base: dict[str, torch.Tensor] | None = None
    base_channels: torch.Tensor | None = None  # int64 [C], sorted
    scheme = "base_delta"

    @property
    def num_experts(self) -> int:
        return len(self.factors["gate"])

    def ranks(self) -> dict[str, list[int]]:
        return {p: [0 if f is None else f[0].shape[1] for f in self.factors[p]] for p in PROJECTIONS}

    def params_by_projection(self) -> dict[str, int]:
        counts = {p: sum(u.numel() + v.numel() for f in self.factors[p] if f is not None for u, v in [f])
                  for p in PROJECTIONS}
        for p, w in (self.base or {}).items():
            counts[p] += w.numel()
        return counts

    def allocation(self) -> dict:
        return {"ranks": self.ranks(), "base_channels": 0 if self.base is None else int(self.base_channels.numel())}

    def base_weight(self, proj: str) -> torch.Tensor:
        """scatter(B_p): the shared base on its kept channels, zero elsewhere (float64; zero without a base)."""
        out_dim, in_dim = matrix_shape(proj, self.hidden_size, self.intermediate_size)
        w = torch.zeros(out_dim, in_dim, dtype=torch.float64)
        if self.base is not None:
            if proj == "down":
                w[:, self.base_channels] += self.base[proj].double()
            else:
                w[self.base_channels] += self.base[proj].double()
        return w

    def dense_weight(self, expert: int, proj: str) -> torch.Tensor:
        """Materialise W_i,p (tests and analysis only; serving never does this)."""
        w = self.base_weight(proj)
        f = self.factors[proj][expert]
        if f is not None:
            w += f[0].double() @ f[1].double()
        return w

    def packed(self) -> dict[str, torch.Tensor]:
        """The packed layout of kernels/base_delta_torch.py (ragged ranks concatenated, no padding)."""
        ranks = self.ranks()

        def cat(proj_list, index, dim, empty_shape):
            parts = [self.factors[p][e][index] for p in proj_list for e in range(self.num_experts) if ranks[p][e]]
            return torch.cat(parts, dim) if parts else torch.zeros(empty_shape, dtype=torch.float64)

        h, i = self.hidden_size, self.intermediate_size
        base = self.base or {}
        return {
            "ranks": torch.tensor([ranks[p] for p in PROJECTIONS], dtype=torch.int64),
            "gate_up_u": cat(("gate", "up"), 0, 1, (i, 0)),
            "gate_up_v": cat(("gate", "up"), 1, 0, (0, h)),
            "down_u": cat(("down",), 0, 1, (h, 0)),
            "down_v": cat(("down",), 1, 0, (0, i)),
            "base_gate_up": torch.cat([base["gate"], base["up"]]) if base else torch.zeros(0, h, dtype=torch.float64),
            "base_down": base["down"] if base else torch.zeros(h, 0, dtype=torch.float64),
            "base_channels": self.base_channels if base else torch.zeros(0, dtype=torch.int64),
        }

    def spec(self, layer: int, prefix: str) -> BaseDeltaSpec:
        return BaseDeltaSpec(
            layer=layer, prefix=prefix, num_experts=self.num_experts,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            base_channels=0 if self.base is None else int(self.base_channels.numel()), ranks=self.ranks(),
        )

    def to_tensors(self, prefix: str, proj_names: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Checkpoint tensors named per docs/format.md, factors cast to ``dtype``."""
        out = {}
        for p in PROJECTIONS:
            for i, f in enumerate(self.factors[p]):
                if f is not None:
                    out[delta_name(prefix, i, proj_names[p], "delta_u")] = f[0].to(dtype).contiguous()
                    out[delta_name(prefix, i, proj_names[p], "delta_v")] = f[1].to(dtype).contiguous()
        if self.base is not None:
            for p in PROJECTIONS:
                out[base_name(prefix, proj_names[p])] = self.base[p].to(dtype).contiguous()
            out[base_channels_name(prefix)] = self.base_channels.to(torch.int32)
        return out

    @classmethod
    def from_tensors(cls, spec: BaseDeltaSpec, proj_names: dict[str, str], get) -> "BaseDeltaLayer":
        h, i_size, prefix = spec.hidden_size, spec.intermediate_size, spec.prefix

        def fetch(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            return fetch_checked(get, name, shape)

        factors: dict[str, list[Factors | None]] = {}
        for p in PROJECTIONS:
            out_dim, in_dim = matrix_shape(p, h, i_size)
            factors[p] = [
                (fetch(delta_name(prefix, e, proj_names[p], "delta_u"), (out_dim, r)),
                 fetch(delta_name(prefix, e, proj_names[p], "delta_v"), (r, in_dim))) if r else None
                for e, r in enumerate(spec.ranks[p])
            ]
        base = channels = None
        c = spec.base_channels
        if c:
            channels = fetch(base_channels_name(prefix), (c,))
            if channels.is_floating_point():
                raise FormatError(f"tensor {base_channels_name(prefix)} must be an integer index, got {channels.dtype}")
            channels = channels.long()
            spec.check_indices({base_channels_name(prefix): channels.tolist()})
            base = {p: fetch(base_name(prefix, proj_names[p]), matrix_shape(p, h, c)) for p in PROJECTIONS}
        return cls(h, i_size, factors, base, channels)

    def experts_module(self, dynamic_prune_ratio: float = 0.0) -> nn.Module:
        return BaseDeltaExperts(self, dynamic_prune_ratio)


class BaseDeltaExperts(nn.Module):
    """Reference forward of a ``base_delta`` layer over its packed buffers (see the module docstring)."""

    def __init__(self, layer: BaseDeltaLayer, dynamic_prune_ratio: float = 0.0):
        super().__init__()
        self.num_dynamic_drop = round(dynamic_prune_ratio * layer.intermediate_size) if layer.base is not None else 0
        for name, tensor in layer.packed().items():
            self.register_buffer(name, tensor)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return base_delta_moe(
            hidden_states, top_k_index, top_k_weights, self.ranks, self.gate_up_u, self.gate_up_v, self.down_u,
            self.down_v, self.base_gate_up, self.base_down, self.base_channels, self.num_dynamic_drop,
        )
