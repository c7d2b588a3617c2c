"""Load a checkpoint into transformers: dense as is, ``moe_compress`` with the reference experts.

The compressed loader builds the original architecture from config.json, swaps each compressed MoE
layer's ``experts`` module for its scheme's reference forward (vllm_moe_compress/format/schemes/) and loads every other
tensor by name, refusing a checkpoint that leaves any model parameter unloaded or has unknown tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from vllm_moe_compress.format import QUANT_METHOD, CompressionInfo, FormatError

from .architectures import architecture_for, moe_block
from .checkpoint_check import check_layer_tensors, check_model_sizes
from .checkpoint_io import SafetensorsCheckpoint, read_config
from vllm_moe_compress.format.schemes import SCHEME_LAYERS


def is_compressed(model_dir: str | Path) -> bool:
    return (read_config(model_dir).get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, dynamic_pruning: bool = False):
    """Any supported checkpoint, dense or compressed, as an eval-mode transformers model; D²-MoE's dynamic
    pruning off by default, as the vLLM plugin serves it."""
    if is_compressed(model_dir):
        return load_compressed_model(model_dir, dtype, dynamic_pruning)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


@torch.no_grad()
def load_compressed_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, dynamic_pruning: bool = True):
    raw = read_config(model_dir)
    info = CompressionInfo.from_config(raw.get("quantization_config"))
    arch = architecture_for(raw)
    ckpt = SafetensorsCheckpoint(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if getattr(config, "hidden_act", "silu") != "silu":
        raise FormatError(f"experts with activation {config.hidden_act!r} are not supported (only silu)")
    check_model_sizes(info, raw, config)
    expert_prefixes = tuple(spec.prefix + "." for spec in info.layers)
    for spec in info.layers:
        layer = check_layer_tensors(spec, info, ckpt, ckpt.get)
        ratio = info.dynamic_prune_ratio if dynamic_pruning else 0.0
        moe_block(model, spec.layer).experts = layer.experts_module(ratio).to(dtype)

    params = dict(model.named_parameters())
    loaded = set()
    for key in ckpt.keys():
        if key.startswith(expert_prefixes):
            continue
        name = arch.checkpoint_to_module_name(key)
        if name not in params:
            raise FormatError(f"tensor {key} matches no parameter of {type(model).__name__}")
        tensor = ckpt.get(key)
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise FormatError(f"tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}")
        params[name].copy_(tensor)
        loaded.add(name)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(params) - loaded - tied)
    if missing:
        raise FormatError(f"checkpoint {model_dir} lacks {len(missing)} tensors, e.g. {missing[0]}")
    return model
