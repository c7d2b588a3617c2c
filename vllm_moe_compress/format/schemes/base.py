"""What every checkpoint scheme's in-memory layer provides (one module per scheme in this package).

A scheme is the tensor layout of one compressed MoE layer (docs/format.md): the compressor builds a
:class:`SchemeLayer`, writes it with :meth:`to_tensors`; the reference loader rebuilds it with
:meth:`from_tensors` and runs :meth:`experts_module`; the vLLM plugin has a matching class per scheme in
``vllm_moe_compress/``. What a layer's ``quantization_config`` entry holds, its validation and its tensor names are
the format package's (``vllm_moe_compress.format``: one ``LayerSpec`` subclass per scheme).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import nn

from vllm_moe_compress.format import LayerSpec, check_tensor

TensorGetter = Callable[[str], torch.Tensor]


class SchemeLayer(ABC):
    scheme: str
    hidden_size: int
    intermediate_size: int

    def num_params(self) -> int:
        """Stored weight parameters (index tensors are metadata, not counted)."""
        return sum(self.params_by_projection().values())

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
    """``get(name)`` through the format's tensor check (wrong shape or NaN/Inf raise ``FormatError``)."""
    return check_tensor(name, get(name), shape)
