"""The compressed-MoE compute as torch custom ops: opaque to Dynamo, so vLLM's compiled CPU graph
(fullgraph) can call code that loops over experts and reads ranks on the host. ``<scheme>_moe_cpu``: the C++
CPU path on the layout prepared at load (docs/kernels.md, CPU path); ``<scheme>_moe``: the torch path."""

from __future__ import annotations

import torch

from vllm_moe_compress.kernels.base_delta_torch import base_delta_moe
from vllm_moe_compress.kernels.basis_residual_torch import ProjectionWeights, basis_residual_moe
from vllm_moe_compress.kernels.sparse_lowrank_torch import sparse_lowrank_moe


@torch.library.custom_op("moe_compress::base_delta_moe", mutates_args=())
def base_delta_moe_op(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, ranks: torch.Tensor,
    gate_up_u: torch.Tensor, gate_up_v: torch.Tensor, down_u: torch.Tensor, down_v: torch.Tensor,
    base_gate_up: torch.Tensor, base_down: torch.Tensor, base_channels: torch.Tensor, num_dynamic_drop: int,
) -> torch.Tensor:
    return base_delta_moe(x, topk_ids, topk_weights, ranks, gate_up_u, gate_up_v, down_u, down_v,
                          base_gate_up, base_down, base_channels, num_dynamic_drop)


@torch.library.custom_op("moe_compress::base_delta_moe_cpu", mutates_args=())
def base_delta_moe_cpu_op(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                          layout: list[torch.Tensor], num_dynamic_drop: int) -> torch.Tensor:
    """``layout``: the fields of ``kernels.base_delta_cpu.BaseDeltaCpuLayout`` (prepared at load)."""
    from vllm_moe_compress.kernels import base_delta_cpu

    return base_delta_cpu.base_delta_moe(x, topk_ids, topk_weights, base_delta_cpu.BaseDeltaCpuLayout(*layout),
                                         num_dynamic_drop)


@torch.library.custom_op("moe_compress::sparse_lowrank_moe", mutates_args=())
def sparse_lowrank_moe_op(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, sparse_counts: torch.Tensor,
    lowrank_counts: torch.Tensor, ranks: torch.Tensor, sparse_gate_up: torch.Tensor, sparse_down: torch.Tensor,
    lowrank_gate_up_u: torch.Tensor, lowrank_gate_up_v: torch.Tensor, lowrank_down_u: torch.Tensor,
    lowrank_down_v: torch.Tensor, base_down: torch.Tensor, sparse_channels: torch.Tensor,
    lowrank_channels: torch.Tensor,
) -> torch.Tensor:
    return sparse_lowrank_moe(x, topk_ids, topk_weights, sparse_counts, lowrank_counts, ranks, sparse_gate_up,
                              sparse_down, lowrank_gate_up_u, lowrank_gate_up_v, lowrank_down_u, lowrank_down_v,
                              base_down, sparse_channels, lowrank_channels)


@torch.library.custom_op("moe_compress::sparse_lowrank_moe_cpu", mutates_args=())
def sparse_lowrank_moe_cpu_op(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                              layout: list[torch.Tensor]) -> torch.Tensor:
    """``layout``: the fields of ``kernels.sparse_lowrank_cpu.SparseLowrankCpuLayout`` (prepared at load)."""
    from vllm_moe_compress.kernels import sparse_lowrank_cpu

    return sparse_lowrank_cpu.sparse_lowrank_moe(x, topk_ids, topk_weights,
                                                 sparse_lowrank_cpu.SparseLowrankCpuLayout(*layout))


@torch.library.custom_op("moe_compress::basis_residual_moe", mutates_args=())
def basis_residual_moe_op(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, weights: list[torch.Tensor],
    expert_group: torch.Tensor, expert_slot: torch.Tensor, activation: str, seed: int, full_intermediate: int,
    intermediate_lo: int,
) -> torch.Tensor:
    """``weights``: the ProjectionWeights fields of gate, then up, then down (7 tensors each)."""
    n = len(ProjectionWeights._fields)
    gate, up, down = (ProjectionWeights(*weights[i * n : (i + 1) * n]) for i in range(3))
    return basis_residual_moe(x, topk_ids, topk_weights, gate, up, down, expert_group, expert_slot, activation, seed,
                              full_intermediate, intermediate_lo)


@torch.library.custom_op("moe_compress::basis_residual_moe_cpu", mutates_args=())
def basis_residual_moe_cpu_op(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                              layout: list[torch.Tensor]) -> torch.Tensor:
    """``layout``: the fields of ``kernels.basis_residual_cpu.BasisResidualCpuLayout`` (prepared at load)."""
    from vllm_moe_compress.kernels import basis_residual_cpu

    return basis_residual_cpu.basis_residual_moe(x, topk_ids, topk_weights,
                                                 basis_residual_cpu.BasisResidualCpuLayout(*layout))


def _output_like_x(x, *args) -> torch.Tensor:
    """What every op returns, for tracing (torch.compile's fake tensors): a tensor shaped like ``x``."""
    return torch.empty_like(x)


for _op in (base_delta_moe_op, base_delta_moe_cpu_op, sparse_lowrank_moe_op, sparse_lowrank_moe_cpu_op,
            basis_residual_moe_op, basis_residual_moe_cpu_op):
    _op.register_fake(_output_like_x)
