"""Compression methods, by CLI name."""

from .base import CompressionMethod
from .d2 import D2MoE
from .mobe import MoBE
from .rfid import RFIDMoE
from .rs import RSMoE
from .svd import PlainSVD, WhitenedSVD

METHODS: dict[str, type[CompressionMethod]] = {
    m.name: m for m in (D2MoE, PlainSVD, WhitenedSVD, RSMoE, MoBE, RFIDMoE)
}

__all__ = ["METHODS", "CompressionMethod"]
