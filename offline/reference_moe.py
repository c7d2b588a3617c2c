"""Pure-PyTorch reference forward of a compressed MoE layer — the engine of eval-ppl and generate.

It replaces transformers' fused ``experts`` module and keeps its call signature
``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``, so routing, shared experts and
everything else stay the model's own. The experts are computed from their factors in the packed layout
of kernels/base_delta_torch.py (the same function the vLLM plugin runs on CPU), never materialised:

    g, u  = scatter(B_gate x), scatter(B_up x)   once per token
            + U_i (V_i x)                        per routed (token, expert)
    h_i   = silu(g) * u
    y     = B_down · Σ_i w_i h_i                 once per token (on the weighted sum)
            + Σ_i w_i U_i,down (V_i,down h_i)    per routed (token, expert)

Its correctness is tested against float64 dense math (tests/test_reference_moe.py).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.base_delta_torch import base_delta_moe

from .compressed_layer import CompressedLayer


class CompressedExperts(nn.Module):
    def __init__(self, layer: CompressedLayer, dynamic_prune_ratio: float = 0.0):
        super().__init__()
        self.num_dynamic_drop = round(dynamic_prune_ratio * layer.intermediate_size) if layer.base is not None else 0
        for name, tensor in layer.packed().items():
            self.register_buffer(name, tensor)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return base_delta_moe(
            hidden_states, top_k_index, top_k_weights, self.ranks, self.gate_up_u, self.gate_up_v, self.down_u,
            self.down_v, self.base_gate_up, self.base_down, self.base_channels, self.num_dynamic_drop,
        )
