"""One compressed MoE layer in memory (scheme ``base_delta``), and its tensors in the checkpoint format."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .architectures import PROJECTIONS
from .format import FormatError, LayerSpec, base_channels_name, base_name, delta_name

Factors = tuple[torch.Tensor, torch.Tensor]  # (U [out, r], V [r, in])


@dataclass
class CompressedLayer:
    """Expert i's projection p is  W_i,p = scatter(B_p) + U_i,p V_i,p  (either term may be absent).

    ``base`` maps a canonical projection to the shared base restricted to ``base_channels``
    (gate/up: [C, H] rows, down: [H, C] columns); ``factors[p][i]`` is ``None`` for rank 0.
    """

    hidden_size: int
    intermediate_size: int
    factors: dict[str, list[Factors | None]]
    base: dict[str, torch.Tensor] | None = None
    base_channels: torch.Tensor | None = None  # int64 [C], sorted

    @property
    def num_experts(self) -> int:
        return len(self.factors["gate"])

    def ranks(self) -> dict[str, list[int]]:
        return {p: [0 if f is None else f[0].shape[1] for f in self.factors[p]] for p in PROJECTIONS}

    def num_params(self) -> int:
        """Stored weight parameters (the channel index is metadata, not counted)."""
        n = sum(u.numel() + v.numel() for p in PROJECTIONS for f in self.factors[p] if f is not None for u, v in [f])
        if self.base is not None:
            n += sum(w.numel() for w in self.base.values())
        return n

    def base_weight(self, proj: str) -> torch.Tensor:
        """scatter(B_p): the shared base on its kept channels, zero elsewhere (float64; zero without a base)."""
        out_dim, in_dim = (self.intermediate_size, self.hidden_size) if proj != "down" else (
            self.hidden_size, self.intermediate_size)
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

    def spec(self, layer: int, prefix: str) -> LayerSpec:
        return LayerSpec(
            layer=layer, prefix=prefix, scheme="base_delta", num_experts=self.num_experts,
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
    def from_tensors(cls, spec: LayerSpec, proj_names: dict[str, str], get) -> "CompressedLayer":
        """Rebuild from a checkpoint; ``get(name)`` returns a tensor. Shapes are checked against ``spec``."""
        h, i_size, prefix = spec.hidden_size, spec.intermediate_size, spec.prefix

        def fetch(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            t = get(name)
            if tuple(t.shape) != shape:
                raise FormatError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise FormatError(f"tensor {name} contains NaN or Inf")
            return t

        factors: dict[str, list[Factors | None]] = {}
        for p in PROJECTIONS:
            out_dim, in_dim = (h, i_size) if p == "down" else (i_size, h)
            factors[p] = [
                (fetch(delta_name(prefix, e, proj_names[p], "delta_u"), (out_dim, r)),
                 fetch(delta_name(prefix, e, proj_names[p], "delta_v"), (r, in_dim))) if r else None
                for e, r in enumerate(spec.ranks[p])
            ]
        base = channels = None
        c = spec.base_channels
        if c:
            channels = fetch(base_channels_name(prefix), (c,)).long()
            spec.check_base_channels(channels.tolist())
            base = {p: fetch(base_name(prefix, proj_names[p]), (h, c) if p == "down" else (c, h)) for p in PROJECTIONS}
        return cls(h, i_size, factors, base, channels)
