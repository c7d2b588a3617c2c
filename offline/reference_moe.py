"""Pure-PyTorch reference forward of a compressed MoE layer — the ground truth for the plugin's tests.

It replaces transformers' fused ``experts`` module and keeps its call signature
``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``, so routing, shared experts and
everything else stay the model's own. Experts are computed from their factors, never materialised, and
the shared base exploits linearity (D²-MoE §3.5, forward y = W_b x + Σ G(x)_i ΔU_i ΔV_i x):

    g, u  = scatter(B_gate x), scatter(B_up x)   once per token
            + U_i (V_i x)                        per routed (token, expert)
    h_i   = act(g) * u
    y     = B_down · Σ_i w_i h_i                 once per token (on the weighted sum)
            + Σ_i w_i U_i,down (V_i,down h_i)    per routed (token, expert)

Semi-dynamic pruning (D²-MoE §3.4, Eq. 9), dynamic half: per forward call ("batch"), the base down
columns kept statically are re-scored with C_j = ‖B_down[:, j]‖₂ · ‖H[:, j]‖₂ on the batch's weighted
intermediate activations H = Σ_i w_i h_i, and the lowest ``dynamic_prune_ratio · I`` of them are skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from .architectures import PROJECTIONS
from .compressed_layer import CompressedLayer


class CompressedExperts(nn.Module):
    def __init__(self, layer: CompressedLayer, act_fn, dynamic_prune_ratio: float = 0.0):
        super().__init__()
        self.act_fn = act_fn
        self.num_experts = layer.num_experts
        self.intermediate_size = layer.intermediate_size
        self.ranks = layer.ranks()
        self.has_base = layer.base is not None
        self.num_dynamic_drop = round(dynamic_prune_ratio * layer.intermediate_size) if self.has_base else 0
        for p in PROJECTIONS:
            for e, f in enumerate(layer.factors[p]):
                if f is not None:
                    self.register_buffer(f"{p}_u_{e}", f[0].clone())
                    self.register_buffer(f"{p}_v_{e}", f[1].clone())
        if self.has_base:
            for p in PROJECTIONS:
                self.register_buffer(f"base_{p}", layer.base[p].clone())
            self.register_buffer("base_channels", layer.base_channels.clone())

    def _delta(self, x: torch.Tensor, proj: str, expert: int, out_dim: int) -> torch.Tensor:
        if not self.ranks[proj][expert]:
            return x.new_zeros(x.shape[0], out_dim)
        return (x @ getattr(self, f"{proj}_v_{expert}").T) @ getattr(self, f"{proj}_u_{expert}").T

    def _base_down(self, weighted_h: torch.Tensor) -> torch.Tensor:
        weight = self.base_down
        if self.num_dynamic_drop:
            keep = weight.shape[1] - self.num_dynamic_drop
            score = weight.float().norm(dim=0) * weighted_h.float().norm(dim=0)
            cols = score.topk(keep).indices
            weight, weighted_h = weight[:, cols], weighted_h[:, cols]
        return weighted_h @ weight.T

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        x = hidden_states
        num_tokens, top_k = top_k_index.shape
        flat_experts = top_k_index.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_of = torch.arange(num_tokens, device=x.device).repeat_interleave(top_k)[order]
        weight_of = top_k_weights.reshape(-1)[order].to(x.dtype)[:, None]
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()

        out = torch.zeros_like(x)
        if self.has_base:
            channels = self.base_channels
            base_gate, base_up = x @ self.base_gate.T, x @ self.base_up.T
            weighted_h = x.new_zeros(num_tokens, channels.numel())
        start = 0
        for expert, n in enumerate(counts[: self.num_experts]):
            if n == 0:
                continue
            tokens, w = token_of[start : start + n], weight_of[start : start + n]
            start += n
            xe = x[tokens]
            gate = self._delta(xe, "gate", expert, self.intermediate_size)
            up = self._delta(xe, "up", expert, self.intermediate_size)
            if self.has_base:
                gate[:, channels] += base_gate[tokens]
                up[:, channels] += base_up[tokens]
            h = self.act_fn(gate) * up
            if self.has_base:
                weighted_h.index_add_(0, tokens, w * h[:, channels])
            if self.ranks["down"][expert]:
                out.index_add_(0, tokens, w * self._delta(h, "down", expert, x.shape[1]))
        if self.has_base:
            out += self._base_down(weighted_h)
        return out
