"""The fused-MoE method for ``moe_compress`` layers: registers the scheme's parameters, loads, checks, applies.

Modelled on vLLM's ``MoeWNA16Method``: parameters are created per layer in ``create_weights`` with a
``weight_loader`` that vLLM's expert mapping calls per checkpoint tensor and that refuses a wrong shape, dtype
or a NaN/Inf (``CompressedMoEScheme.check_loaded``, the format's ``check_tensor``); they start as NaN, so a
tensor that never reached a loader is caught in ``process_weights_after_loading`` with the tensor's name. Experts are computed from their factors; dense expert weights never exist.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig

from vllm_moe_compress.format import LayerSpec

from .base_delta import BaseDeltaScheme
from .basis_residual import BasisResidualScheme
from .sparse_lowrank import SparseLowRankScheme

SCHEMES = {cls.scheme: cls for cls in (BaseDeltaScheme, SparseLowRankScheme, BasisResidualScheme)}
"""One class per checkpoint scheme (the contract: :class:`vllm_moe_compress.scheme.CompressedMoEScheme`)."""


def scheme_class(spec: LayerSpec):
    if spec.scheme not in SCHEMES:
        raise ValueError(f"moe_compress: {spec.prefix} uses scheme {spec.scheme!r}; this plugin knows "
                         f"{', '.join(SCHEMES)}")
    return SCHEMES[spec.scheme]


class CompressedMoEMethod(FusedMoEMethodBase):
    def __init__(self, moe, spec: LayerSpec, proj_names: dict[str, str], indices: dict[str, list[int]],
                 dynamic_prune_ratio: float):
        super().__init__(moe)
        if moe.moe_parallel_config.use_ep:
            raise ValueError("moe_compress: expert parallelism is not supported; use tensor parallelism")
        self.spec = spec
        self.scheme = scheme_class(spec)(spec, proj_names, indices, moe.moe_parallel_config.tp_rank, moe.tp_size,
                                         dynamic_prune_ratio)

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        if (num_experts, hidden_size, intermediate_size_per_partition) != (
                self.spec.num_experts, self.spec.hidden_size, self.scheme.part):
            raise ValueError(
                f"moe_compress: {self.spec.prefix} is {self.spec.num_experts} experts of {self.spec.hidden_size}x"
                f"{self.spec.intermediate_size} in quantization_config, but the model builds {num_experts} experts "
                f"of {hidden_size}x{intermediate_size_per_partition} per tensor-parallel rank")
        for name, shape in self.scheme.shapes.items():
            param = torch.nn.Parameter(torch.full(shape, float("nan"), dtype=params_dtype), requires_grad=False)
            param.weight_loader = self._loader(name)
            layer.register_parameter(name, param)
        self.scheme.register_buffers(layer)

    def _loader(self, name: str):
        def load(param, loaded_weight, weight_name=None, shard_id=None, expert_id=None, return_success=False):
            self.scheme.load_shard(name, param.data, loaded_weight, shard_id, expert_id)
            return True if return_success else None

        return load

    def process_weights_after_loading(self, layer) -> None:
        for name in self.scheme.shapes:
            missing = self.scheme.unloaded(name, getattr(layer, name))
            if missing:
                raise ValueError(f"moe_compress: tensor {missing} is missing from the checkpoint (no weight loader "
                                 "received it)")
        self.scheme.prepare(layer)

    def get_fused_moe_quant_config(self, layer) -> FusedMoEQuantConfig | None:
        return FusedMoEQuantConfig.make()

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input) -> torch.Tensor:
        """Σ_k w_k·expert_k(x) for this rank's intermediate slice; vLLM adds shared experts and all-reduces.
        The backend (Triton kernels on CUDA devices, on CPUs the C++ op or else the torch custom op) was chosen at
        load."""
        return self.scheme.apply(layer, x, topk_weights, topk_ids)
