"""The check every plugin scheme runs on a checkpoint tensor before copying it into a parameter."""

from __future__ import annotations

import torch


def check_loaded(name: str, loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Refuse a wrong shape, a non-floating dtype or a NaN/Inf, naming the checkpoint tensor."""
    if tuple(loaded.shape) != expected:
        raise ValueError(f"moe_compress: tensor {name} has shape {tuple(loaded.shape)}, expected {expected}")
    if not loaded.is_floating_point():
        raise ValueError(f"moe_compress: tensor {name} has dtype {loaded.dtype}, expected a floating-point factor")
    if not torch.isfinite(loaded).all():
        raise ValueError(f"moe_compress: tensor {name} contains NaN or Inf")
