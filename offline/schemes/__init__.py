"""Checkpoint schemes by name (``quantization_config.layers[*].scheme``): their in-memory layer classes."""

from .base import SchemeLayer
from .base_delta import BaseDeltaLayer
from .basis_residual import BasisResidualLayer
from .sparse_lowrank import SparseLowRankLayer

SCHEME_LAYERS: dict[str, type[SchemeLayer]] = {
    cls.scheme: cls for cls in (BaseDeltaLayer, SparseLowRankLayer, BasisResidualLayer)
}

__all__ = ["SCHEME_LAYERS", "SchemeLayer", "BaseDeltaLayer", "SparseLowRankLayer", "BasisResidualLayer"]
