"""Checks every loader runs on the tensors it reads, and the one shape convention of the format."""

from __future__ import annotations

import torch

from .config import FormatError


def matrix_shape(proj: str, hidden: int, intermediate: int) -> tuple[int, int]:
    """(out, in) of a canonical projection: gate/up [I, H], down [H, I]."""
    return (hidden, intermediate) if proj == "down" else (intermediate, hidden)


def check_tensor(name: str, tensor: torch.Tensor, shape: tuple[int, ...], floating: bool = False) -> torch.Tensor:
    """Refuse a wrong shape, a non-finite floating-point value, or (``floating``) an integer tensor, naming it.
    A tensor on the meta device (the header-level check, offline/checkpoint_check.py) has no values to check."""
    if tuple(tensor.shape) != shape:
        raise FormatError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {shape}")
    if floating and not tensor.is_floating_point():
        raise FormatError(f"tensor {name} has dtype {tensor.dtype}, expected a floating-point factor")
    if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all():
        raise FormatError(f"tensor {name} contains NaN or Inf")
    return tensor


def check_channel_index(name: str, channels: list[int], count: int, limit: int) -> None:
    """An index tensor must hold ``count`` strictly increasing channels in [0, limit)."""
    if len(channels) != count or any(b <= a for a, b in zip(channels, channels[1:])) or (
            channels and not 0 <= channels[0] <= channels[-1] < limit):
        raise FormatError(f"tensor {name} must hold sorted distinct channels ({count} of them) in [0, {limit})")
