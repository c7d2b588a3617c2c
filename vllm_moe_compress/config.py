"""The ``moe_compress`` quantization config: read ``quantization_config``, hand MoE layers our method.

Registered with vLLM's out-of-tree API (``register_quantization_config``); ``vllm serve DIR`` picks it up
from config.json, ``--quantization moe_compress`` checks it. Linear layers (attention, dense MLPs, shared
experts, routers) stay unquantized.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from offline.format import QUANT_METHOD, CompressionInfo, FormatError, base_channels_name

DYNAMIC_PRUNE_ENV = "VLLM_MOE_COMPRESS_DYNAMIC_PRUNE"
"""Set to 1 to run D²-MoE's dynamic base pruning per batch (default off: a request's output then never
depends on which other requests share its batch)."""


class NotCompressedError(ValueError):
    pass


@register_quantization_config(QUANT_METHOD)
class MoECompressConfig(QuantizationConfig):
    def __init__(self, info: CompressionInfo | None = None) -> None:
        super().__init__()
        if info is None:
            raise NotCompressedError(
                "--quantization moe_compress needs a checkpoint written by `moe-compress compress`: this model's "
                "config.json has no quantization_config with quant_method 'moe_compress'"
            )
        self.info = info
        self.layers = {spec.layer: spec for spec in info.layers}
        self.base_channels: dict[int, list[int]] = {}
        self.dynamic_pruning = os.environ.get(DYNAMIC_PRUNE_ENV, "0") == "1"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MoECompressConfig":
        try:
            return cls(CompressionInfo.from_config(config))
        except FormatError as err:
            raise ValueError(f"moe_compress: {err}") from err

    @staticmethod
    def get_checkpoint_weight_mapper():
        """Give the shared base an expert-0 name so vLLM's expert mapping routes it to ``w13_base``/``w2_base``.

        ``experts.base.<proj>.weight`` → ``experts.0.<proj>.base``. The channel index is read from the
        checkpoint at start-up (``maybe_update_config``) and dropped here, so no loader ever sees a tensor
        it has no parameter for. Idempotent: vLLM may apply it twice.
        """
        from vllm.model_executor.models.utils import WeightsMapper

        return QuantizationConfig.get_checkpoint_weight_mapper() | WeightsMapper(orig_to_new_regex={
            re.compile(r"\.experts\.base\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$"): r".experts.0.\1.base",
            re.compile(r"\.experts\.base\.channels$"): None,
        })

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """Read each layer's base channel index (tiny int32 tensors): shapes per TP rank depend on it."""
        needed = {spec.layer: spec for spec in self.info.layers if spec.base_channels}
        if not needed:
            return
        files = sorted(Path(model_name).glob("*.safetensors"))
        if not files:
            raise ValueError(f"moe_compress: no safetensors files in {model_name} (only local checkpoints are supported)")
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                for layer, spec in needed.items():
                    name = base_channels_name(spec.prefix)
                    if name in keys:
                        channels = f.get_tensor(name).tolist()
                        try:
                            spec.check_base_channels(channels)
                        except FormatError as err:
                            raise ValueError(f"moe_compress: {err}") from err
                        self.base_channels[layer] = channels
        missing = [base_channels_name(s.prefix) for l, s in needed.items() if l not in self.base_channels]
        if missing:
            raise ValueError(f"moe_compress: tensor {missing[0]} missing from the checkpoint")

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod()
        if isinstance(layer, RoutedExperts):
            from .moe_method import CompressedMoEMethod

            match = re.search(r"layers\.(\d+)\.", prefix)
            spec = self.layers.get(int(match[1])) if match else None
            if spec is None:
                raise ValueError(f"moe_compress: MoE layer {prefix} has no entry in quantization_config.layers")
            return CompressedMoEMethod(layer.moe_config, spec, self.info.proj_names, self.base_channels.get(spec.layer, []),
                                       self.info.dynamic_prune_ratio if self.dynamic_pruning else 0.0)
        return None
