"""The check every plugin scheme runs on a checkpoint tensor before copying it into a parameter."""

from __future__ import annotations

import torch

from vllm_moe_compress.format import FormatError, check_tensor


def check_loaded(name: str, loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    """The format's tensor check (shape, floating-point dtype, no NaN/Inf), reported as vLLM start-up errors."""
    try:
        check_tensor(name, loaded, expected, floating=True)
    except FormatError as err:
        raise ValueError(f"moe_compress: {err}") from err
