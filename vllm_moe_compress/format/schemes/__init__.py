"""Checkpoint schemes by name (``quantization_config.layers[*].scheme``): their in-memory layer classes.

A scheme's layer is what a compression method returns, what the compressor packs into checkpoint tensors and what
the reference loader unpacks again, with its reference forward; like the scheme's ``LayerSpec`` (``format/layers.py``)
it belongs to the format, so that the compressor and every loader share it."""

from .base import SchemeLayer
from .base_delta import BaseDeltaLayer
from .basis_residual import BasisResidualLayer
from .sparse_lowrank import SparseLowRankLayer

SCHEME_LAYERS: dict[str, type[SchemeLayer]] = {
    cls.scheme: cls for cls in (BaseDeltaLayer, SparseLowRankLayer, BasisResidualLayer)
}

__all__ = ["SCHEME_LAYERS", "SchemeLayer", "BaseDeltaLayer", "SparseLowRankLayer", "BasisResidualLayer"]
