"""What every checkpoint scheme's in-memory layer provides (one module per scheme in this package).

A scheme is the tensor layout of one compressed MoE layer (docs/format.md): the compressor builds a
:class:`SchemeLayer`, writes it with :meth:`to_tensors`; the reference loader rebuilds it with
:meth:`from_tensors` and runs :meth:`experts_module`; the vLLM plugin has a matching class per scheme in
``vllm_moe_compress/``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import nn

from ..format import FormatError, LayerSpec

TensorGetter = Callable[[str], torch.Tensor]


class SchemeLayer(ABC):
    scheme: str
    hidden_size: int
    intermediate_size: int

    @staticmethod
    @abstractmethod
    def validate_spec(spec: LayerSpec) -> None:
        """Raise :class:`FormatError` if the scheme-specific fields of ``spec`` are inconsistent."""

    def num_params(self) -> int:
        """Stored weight parameters (index tensors are metadata, not counted)."""
        return sum(self.params_by_projection().values())

    @staticmethod
    @abstractmethod
    def params_from_spec(spec: LayerSpec) -> int:
        """What :meth:`num_params` counts, from a layer's spec alone (``moe-compress inspect``)."""

    @abstractmethod
    def spec(self, layer: int, prefix: str) -> LayerSpec:
        """The layer's entry in ``quantization_config.layers``."""

    @abstractmethod
    def params_by_projection(self) -> dict[str, int]:
        """Stored parameters per canonical projection (shared tensors counted with their projection)."""

    @abstractmethod
    def allocation(self) -> dict:
        """Per-expert sizes for moe_compress_stats.json and the report (e.g. ``ranks``, ``base_channels``)."""

    @abstractmethod
    def to_tensors(self, prefix: str, proj_names: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Checkpoint tensors named per docs/format.md, weights cast to ``dtype``."""

    @classmethod
    @abstractmethod
    def from_tensors(cls, spec: LayerSpec, proj_names: dict[str, str], get: TensorGetter) -> "SchemeLayer":
        """Rebuild from a checkpoint, checking every tensor against ``spec`` (errors name the tensor)."""

    @abstractmethod
    def dense_weight(self, expert: int, proj: str) -> torch.Tensor:
        """Materialise expert ``expert``'s ``proj`` matrix in float64 (tests and analysis only)."""

    @abstractmethod
    def experts_module(self, dynamic_prune_ratio: float = 0.0) -> nn.Module:
        """The reference forward: a drop-in for transformers' fused ``experts`` module,
        ``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``."""


def fetch_checked(get: TensorGetter, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """``get(name)``, refusing a wrong shape or a non-finite floating-point value (naming the tensor).
    A tensor on the meta device (header-only checks, offline/checkpoint_check.py) has no values to check."""
    t = get(name)
    if tuple(t.shape) != shape:
        raise FormatError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
    if t.is_floating_point() and not t.is_meta and not torch.isfinite(t).all():
        raise FormatError(f"tensor {name} contains NaN or Inf")
    return t


def check_channel_index(name: str, channels: list[int], count: int, limit: int) -> None:
    """An index tensor must hold ``count`` strictly increasing channels in [0, limit)."""
    if len(channels) != count or any(b <= a for a, b in zip(channels, channels[1:])) or (
            channels and not 0 <= channels[0] <= channels[-1] < limit):
        raise FormatError(f"tensor {name} must hold sorted distinct channels ({count} of them) in [0, {limit})")
