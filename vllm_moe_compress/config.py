"""The ``moe_compress`` quantization config: read ``quantization_config``, hand MoE layers our method.

Registered with vLLM's out-of-tree API (``register_quantization_config``); ``vllm serve DIR`` picks it up
from config.json, ``--quantization moe_compress`` checks it. Linear layers (attention, dense MLPs, shared
experts, routers) stay unquantized.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from vllm_moe_compress.format import QUANT_METHOD, CompressionInfo, FormatError, check_checkpoint_headers

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
        self.indices: dict[int, dict[str, list[int]]] = {}  # layer -> index tensor name -> values
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
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                     hf_config: Any = None) -> str | None:
        """vLLM calls this in the API-server process while it builds the model config, before any engine
        process starts: the place to refuse a broken checkpoint in seconds. Runs the format's header-level check
        (``format.check_checkpoint_headers``: format_version, schemes, every layer's tensor names, shapes and
        dtypes) on the local model directory; the values are checked by the weight loaders later, the model's
        sizes when the engine builds each layer."""
        if (hf_quant_cfg or {}).get("quant_method") != QUANT_METHOD:
            return None
        model_dir = getattr(hf_config, "name_or_path", None) or getattr(hf_config, "_name_or_path", None)
        if model_dir and Path(model_dir).is_dir():
            try:
                check_checkpoint_headers(model_dir, CompressionInfo.from_config(copy.deepcopy(hf_quant_cfg)))
            except FormatError as err:
                message = f"moe_compress: {model_dir} cannot be served: {err}"
                if Path(sys.argv[0]).name == "vllm":
                    # The vllm command: end with this line. A ValueError would reach the user wrapped in pydantic's
                    # ValidationError of ModelConfig, under a traceback and above a link to pydantic's docs.
                    raise SystemExit(message) from None
                raise ValueError(message) from None
        return QUANT_METHOD

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MoECompressConfig":
        try:
            return cls(CompressionInfo.from_config(config))
        except FormatError as err:
            raise ValueError(f"moe_compress: {err}") from err

    @staticmethod
    def get_checkpoint_weight_mapper():
        """Each scheme's renames (e.g. the shared base gets an expert-0 name so vLLM's expert mapping routes
        it), and index tensors (``….channels``) dropped: they are read at start-up (``maybe_update_config``),
        so no loader ever sees a tensor it has no parameter for. Idempotent: vLLM may apply it twice."""
        from vllm.model_executor.models.utils import WeightsMapper

        from .moe_method import SCHEMES

        renames = {pattern: new for scheme in SCHEMES.values() for pattern, new in scheme.WEIGHT_RENAMES.items()}
        renames[re.compile(r"\.experts\.(?:[^.]+\.)*channels$")] = None
        return QuantizationConfig.get_checkpoint_weight_mapper() | WeightsMapper(orig_to_new_regex=renames)

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """Read the small int32 index tensors the schemes declare: parameter shapes per TP rank depend on them."""
        from .moe_method import scheme_class

        wanted = {name: spec for spec in self.info.layers for name in spec.index_tensor_names()}
        files = sorted(Path(model_name).glob("*.safetensors"))
        if not files:
            raise ValueError(f"moe_compress: no safetensors files in {model_name} (only local checkpoints are supported)")
        found: dict[str, list[int]] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = set(f.keys())
                    self._check_expert_numbers(keys)
                    for name in wanted.keys() & keys:
                        tensor = f.get_tensor(name)
                        if tensor.is_floating_point() or tensor.dim() != 1:
                            raise ValueError(f"moe_compress: tensor {name} must be a 1-D integer index, "
                                             f"got {tensor.dtype} of shape {tuple(tensor.shape)}")
                        found[name] = tensor.tolist()
            except SafetensorError as err:
                raise ValueError(f"moe_compress: {path} is not a readable safetensors file: {err}") from err
        missing = [name for name in wanted if name not in found]
        if missing:
            raise ValueError(f"moe_compress: tensor {missing[0]} missing from the checkpoint")
        for spec in self.info.layers:
            self.indices[spec.layer] = {name: found[name] for name in spec.index_tensor_names()}
            try:
                scheme_class(spec).check_indices(spec, self.indices[spec.layer])
            except FormatError as err:
                raise ValueError(f"moe_compress: {err}") from err

    def _check_expert_numbers(self, keys: set[str]) -> None:
        """vLLM's expert mapping silently skips a tensor of an expert the layer does not have: refuse it here."""
        for spec in self.info.layers:
            pattern = re.compile(re.escape(spec.prefix) + r"\.(\d+)\.")
            for key in keys:
                match = pattern.match(key)
                if match and int(match[1]) >= spec.num_experts:
                    raise ValueError(f"moe_compress: tensor {key} names expert {match[1]}, but quantization_config "
                                     f"gives layer {spec.layer} {spec.num_experts} experts")

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod()
        if isinstance(layer, RoutedExperts):
            from .moe_method import CompressedMoEMethod

            match = re.search(r"layers\.(\d+)\.", prefix)
            spec = self.layers.get(int(match[1])) if match else None
            if spec is None:
                raise ValueError(f"moe_compress: MoE layer {prefix} has no entry in quantization_config.layers")
            return CompressedMoEMethod(layer.moe_config, spec, self.info.proj_names, self.indices.get(spec.layer, {}),
                                       self.info.dynamic_prune_ratio if self.dynamic_pruning else 0.0)
        return None
