"""The header-level check of a compressed checkpoint: every layer's tensors by name, shape and dtype, no values read.

Each layer's :meth:`LayerSpec.expected_tensors` is the table: every listed tensor must be in the safetensors
files with that shape, factors in ``quantization_config.dtype``, index tensors integer, and no other tensor may
sit under the layer's prefix. The vLLM plugin runs :func:`check_checkpoint_headers` in the API-server process
before any engine starts (``MoECompressConfig.override_quantization_method``); the compressor's
``offline/checkpoint_check.py`` (``moe-compress inspect``) and its reference loader run
:func:`check_layer_headers` before they read values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from .config import CompressionInfo, FormatError
from .layers import LayerSpec

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I32": torch.int32, "I64": torch.int64, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
"""safetensors header dtype -> torch dtype (the dtypes a checkpoint of this format may hold)."""


class Headers(Protocol):
    """Names, shapes and dtypes of a checkpoint's tensors (:class:`TensorHeaders`, the compressor's reader)."""

    def keys(self) -> list[str]: ...

    def shape(self, name: str) -> list[int]: ...

    def dtype(self, name: str) -> torch.dtype: ...


class TensorHeaders:
    """The headers of every ``*.safetensors`` file in a model directory (tensor data is never read)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise FormatError(f"no *.safetensors files in {self.model_dir}")
        self._headers: dict[str, tuple[list[int], str]] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        tensor = f.get_slice(name)
                        self._headers[name] = (list(tensor.get_shape()), tensor.get_dtype())
            except (SafetensorError, OSError) as err:
                raise FormatError(f"{path} is not a readable safetensors file: {err}") from err

    def keys(self) -> list[str]:
        return list(self._headers)

    def shape(self, name: str) -> list[int]:
        return self._headers[name][0]

    def dtype(self, name: str) -> torch.dtype:
        stored = self._headers[name][1]
        if stored not in SAFETENSORS_DTYPES:
            raise FormatError(f"tensor {name} has dtype {stored}, which this format never stores")
        return SAFETENSORS_DTYPES[stored]


def check_layer_headers(spec: LayerSpec, info: CompressionInfo, headers: Headers, source: str | Path) -> None:
    """Raise :class:`FormatError` naming the first tensor of ``spec``'s layer that is missing (``not found in
    source``), has another shape, is a factor not stored in ``info.dtype`` or a floating-point index, or sits
    under the layer's prefix without being part of it (module docstring)."""
    expected = spec.expected_tensors(info.proj_names)
    indices = set(spec.index_tensor_names())
    stored_dtype = getattr(torch, info.dtype)
    present = set(headers.keys())
    for name, shape in expected.items():
        if name not in present:
            raise FormatError(f"tensor {name} not found in {source}")
        if tuple(headers.shape(name)) != shape:
            raise FormatError(f"tensor {name} has shape {tuple(headers.shape(name))}, expected {shape}")
        dtype = headers.dtype(name)
        if name in indices and dtype.is_floating_point:
            raise FormatError(f"tensor {name} must be an integer index, got {dtype}")
        if name not in indices and dtype != stored_dtype:
            raise FormatError(f"tensor {name} is {dtype}, quantization_config.dtype says {info.dtype}")
    for name in present:
        if name.startswith(spec.prefix + ".") and name not in expected:
            raise FormatError(f"tensor {name} is not part of layer {spec.layer}'s {spec.scheme} factors")


def check_checkpoint_headers(model_dir: str | Path, info: CompressionInfo) -> None:
    """:func:`check_layer_headers` for every layer of ``info`` on the safetensors files of ``model_dir``."""
    headers = TensorHeaders(model_dir)
    for spec in info.layers:
        check_layer_headers(spec, info, headers, model_dir)
