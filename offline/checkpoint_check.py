"""Check a compressed checkpoint without loading its weights: what a loader would refuse, found in seconds.

:func:`check_checkpoint` runs the checks the loaders run (docs/reliability.md), reading only config.json, the
safetensors headers and the small integer index tensors:

- config.json is JSON with a valid ``quantization_config`` (quant_method, ``format_version``, scheme names and
  every layer's fields: :meth:`CompressionInfo.from_config`), and each layer's expert count and sizes match
  what config.json builds;
- every safetensors file is readable and the index lists only tensors that are there;
- per MoE layer, the format's table of its tensors (``LayerSpec.expected_tensors``, checked by
  ``vllm_moe_compress.format.check_layer_headers``): every expected tensor must exist with its shape and
  dtype, and no stray tensor may sit under the layer's prefix; then the scheme's own reader
  (:meth:`SchemeLayer.from_tensors`) on shape-only (meta) tensors checks the index values
  (:func:`check_layer_tensors`, shared with the reference loader); and no MoE layer's expert tensors may be
  left out of ``quantization_config.layers``.

With ``values=True`` the factors are read as well and refused if they hold NaN or Inf (``moe-compress inspect
--verify``). The vLLM plugin runs the format's part (``format.check_checkpoint_headers``) in the API-server
process before the engine starts, so a broken checkpoint fails in seconds; the model sizes and the unlisted
layers, which need this package's architecture adapters, it refuses when the engine builds the layers.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from vllm_moe_compress.format import CompressionInfo, FormatError, LayerSpec, check_layer_headers

from .architectures import architecture_for
from .checkpoint_io import CheckpointError, SafetensorsCheckpoint, read_config
from vllm_moe_compress.format.schemes import SCHEME_LAYERS
from vllm_moe_compress.format.schemes.base import TensorGetter


def check_layer_tensors(spec: LayerSpec, info: CompressionInfo, ckpt: SafetensorsCheckpoint, get: TensorGetter):
    """Check the layer's tensor headers against the format's table (names, shapes, stored dtype, no stray tensor
    under its prefix: ``format.check_layer_headers``), then rebuild it with ``get``, which checks the index values
    and, with real tensors, NaN/Inf. Returns the rebuilt layer."""
    check_layer_headers(spec, info, ckpt, ckpt.model_dir)
    return SCHEME_LAYERS[spec.scheme].from_tensors(spec, info.proj_names, get)


def check_model_sizes(info: CompressionInfo, raw_config: dict, config) -> None:
    """Each compressed layer's expert count and sizes must be those the model config builds (``config``: the
    transformers config object, whose attribute map knows e.g. Qwen3-MoE's ``num_local_experts``)."""
    arch = architecture_for(raw_config)
    try:
        sizes = {"num_experts": arch.num_experts(config), "hidden_size": int(config.hidden_size),
                 "intermediate_size": arch.intermediate_size(config)}
    except (AttributeError, TypeError, ValueError) as err:
        raise CheckpointError(f"config.json lacks a valid {arch.model_type} MoE field: {err}") from err
    for spec in info.layers:
        for field, value in sizes.items():
            if getattr(spec, field) != value:
                raise FormatError(f"quantization_config layer {spec.layer} ({spec.prefix}) has {field} "
                                  f"{getattr(spec, field)}, but config.json builds {value}")


def check_checkpoint(model_dir: str | Path, values: bool = False, config=None) -> CompressionInfo:
    """Raise :class:`FormatError` / :class:`CheckpointError` naming the first problem (module docstring).
    ``config``: the model's transformers config if the caller has it (vLLM does), else read here."""
    raw = read_config(model_dir)
    info = CompressionInfo.from_config(raw.get("quantization_config"))
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
    check_model_sizes(info, raw, config)
    ckpt = SafetensorsCheckpoint(model_dir)

    def shape_only(name: str) -> torch.Tensor:
        if name not in ckpt:
            raise CheckpointError(f"tensor {name} not found in {ckpt.model_dir}")
        dtype = ckpt.dtype(name)
        if not dtype.is_floating_point:
            return ckpt.get(name)  # index tensors are small and their values are checked
        return torch.empty(ckpt.shape(name), dtype=dtype, device="meta")

    for spec in info.layers:
        check_layer_tensors(spec, info, ckpt, ckpt.get if values else shape_only)
    check_every_moe_layer_listed(info, architecture_for(raw), ckpt)
    return info


def check_every_moe_layer_listed(info: CompressionInfo, arch, ckpt: SafetensorsCheckpoint) -> None:
    """Expert tensors of a MoE block that ``quantization_config.layers`` does not list are refused: the plugin
    would find no entry for that layer, the reference loader no parameter for its tensors."""
    listed = tuple(spec.prefix + "." for spec in info.layers)
    block = re.compile(rf"^(?:.*\.)?layers\.\d+\.{re.escape(arch.block_name)}\.experts\.")
    for key in ckpt.keys():
        if block.match(key) and not key.startswith(listed):
            raise FormatError(f"tensor {key} belongs to a MoE layer that quantization_config.layers does not list")
