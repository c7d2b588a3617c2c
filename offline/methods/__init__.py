"""Compression methods, by CLI name."""

from .base import CompressionMethod
from .d2 import D2MoE
from .svd import PlainSVD, WhitenedSVD

METHODS: dict[str, type[CompressionMethod]] = {m.name: m for m in (D2MoE, PlainSVD, WhitenedSVD)}

__all__ = ["METHODS", "CompressionMethod"]
