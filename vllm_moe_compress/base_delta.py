"""Scheme ``base_delta`` (D²-MoE, and the svd baselines): its parameters on one tensor-parallel rank.

vLLM shards experts on the intermediate dimension I; each factor follows (docs/format.md §6):

    w13_delta_u [I/tp, Rg+Ru]  gate/up U rows sharded      w13_delta_v [Rg+Ru, H]  replicated
    w2_delta_u  [H, Rd]        replicated                  w2_delta_v  [Rd, I/tp]  columns sharded
    w13_base    [2·C_r, H]     the base rows of the C_r kept channels inside this rank's slice
    w2_base     [H, C_r]

Ragged ranks are packed (kernels/base_delta_torch.py): expert e's gate U occupies columns
[start, start + r_e) of ``w13_delta_u``, no byte is padding. The partial outputs of all ranks sum to
the full output, which vLLM's MoE runner all-reduces.
"""

from __future__ import annotations

import torch

from vllm_moe_compress.format import PROJECTIONS, BaseDeltaSpec, matrix_shape
from vllm_moe_compress.format.names import base_channels_name, base_name, delta_name
from vllm_moe_compress.kernels.base_delta_torch import base_delta_moe, rank_offsets

from .scheme import SHARED_BASE_RENAME, CompressedMoEScheme, scheme_op


@scheme_op("base_delta_moe")
def base_delta_moe_op(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, ranks: torch.Tensor,
    gate_up_u: torch.Tensor, gate_up_v: torch.Tensor, down_u: torch.Tensor, down_v: torch.Tensor,
    base_gate_up: torch.Tensor, base_down: torch.Tensor, base_channels: torch.Tensor, num_dynamic_drop: int,
) -> torch.Tensor:
    return base_delta_moe(x, topk_ids, topk_weights, ranks, gate_up_u, gate_up_v, down_u, down_v,
                          base_gate_up, base_down, base_channels, num_dynamic_drop)


SUFFIX_OF_PARAM = {"w13_delta_u": "delta_u", "w13_delta_v": "delta_v", "w2_delta_u": "delta_u",
                   "w2_delta_v": "delta_v", "w13_base": "base", "w2_base": "base"}


class BaseDeltaScheme(CompressedMoEScheme):
    scheme = "base_delta"
    WEIGHT_RENAMES = SHARED_BASE_RENAME

    def __init__(self, spec: BaseDeltaSpec, proj_names: dict[str, str], indices: dict[str, list[int]], tp_rank: int,
                 tp_size: int, dynamic_prune_ratio: float = 0.0):
        super().__init__(spec, proj_names, tp_rank, tp_size)
        channels = indices.get(base_channels_name(spec.prefix), [])
        self.local_positions = [k for k, c in enumerate(channels) if self.lo <= c < self.lo + self.part]
        self.local_channels = [channels[k] - self.lo for k in self.local_positions]
        # Per TP rank: a rank drops its share of the channels, never more than it keeps (docs/format.md §7).
        self.num_dynamic_drop = min(round(dynamic_prune_ratio * self.part), len(self.local_channels))
        self.ranks = spec.ranks
        self.triton_layout = None  # per-layer metadata of the Triton path (prepare_triton)
        totals = {p: sum(r) for p, r in spec.ranks.items()}
        starts = rank_offsets(torch.tensor([spec.ranks[p] for p in PROJECTIONS]))
        self.starts = dict(zip(PROJECTIONS, starts))
        self.shapes = {
            "w13_delta_u": (self.part, totals["gate"] + totals["up"]),
            "w13_delta_v": (totals["gate"] + totals["up"], spec.hidden_size),
            "w2_delta_u": (spec.hidden_size, totals["down"]),
            "w2_delta_v": (totals["down"], self.part),
            "w13_base": (2 * len(self.local_channels), spec.hidden_size),
            "w2_base": (spec.hidden_size, len(self.local_channels)),
        }

    def register_buffers(self, layer: torch.nn.Module) -> None:
        """Metadata the compute needs on the device: ranks and this rank's local base channels."""
        ranks = [self.ranks[p] for p in ("gate", "up", "down")]
        layer.register_buffer("moe_compress_ranks", torch.tensor(ranks, dtype=torch.int64), persistent=False)
        layer.register_buffer("moe_compress_channels", torch.tensor(self.local_channels, dtype=torch.int64),
                              persistent=False)

    has_cpu_path = True

    def prepare_cpu(self, layer: torch.nn.Module) -> None:
        from vllm_moe_compress.kernels import base_delta_cpu

        self.register_cpu_layout(layer, base_delta_cpu.prepare(*self._op_args(layer)[:-1]), self.num_dynamic_drop)

    def _op_args(self, layer) -> tuple:
        return (layer.moe_compress_ranks, layer.w13_delta_u, layer.w13_delta_v, layer.w2_delta_u, layer.w2_delta_v,
                layer.w13_base, layer.w2_base, layer.moe_compress_channels, self.num_dynamic_drop)

    def apply_torch(self, layer, x, topk_weights, topk_ids) -> torch.Tensor:
        return torch.ops.moe_compress.base_delta_moe(x, topk_weights, topk_ids, *self._op_args(layer))

    def prepare_triton(self, layer, device) -> None:
        from vllm_moe_compress.kernels import base_delta_triton

        ranks = [self.ranks[p] for p in PROJECTIONS]
        self.triton_layout = base_delta_triton.BaseDeltaLayout.from_lists(ranks, self.local_channels, self.part, device)

    def apply_triton(self, layer, x, topk_weights, topk_ids) -> torch.Tensor:
        from vllm_moe_compress.kernels import base_delta_triton

        return base_delta_triton.base_delta_moe(x, topk_ids, topk_weights, *self._op_args(layer),
                                                layout=self.triton_layout)

    def checkpoint_name(self, param: str, proj: str, expert: int | None) -> str:
        """The checkpoint tensor a parameter slice comes from, e.g. ``…experts.3.gate_proj.delta_v``."""
        if param.endswith("base"):
            return base_name(self.spec.prefix, self.proj_names[proj])
        return delta_name(self.spec.prefix, expert, self.proj_names[proj], SUFFIX_OF_PARAM[param])

    def load(self, param_name: str, param: torch.Tensor, loaded: torch.Tensor, proj: str, expert: int) -> None:
        name = self.checkpoint_name(param_name, proj, expert)
        h, full_i = self.spec.hidden_size, self.spec.intermediate_size
        if param_name.endswith("base"):
            expected = matrix_shape(proj, h, self.spec.base_channels)
        else:
            r = self.ranks[proj][expert]
            if r == 0:
                raise ValueError(f"moe_compress: tensor {name} present but quantization_config gives expert {expert} rank 0")
            out_dim, in_dim = matrix_shape(proj, h, full_i)
            expected = (out_dim, r) if param_name.endswith("_u") else (r, in_dim)
        self.check_loaded(name, loaded, expected)
        positions = torch.tensor(self.local_positions, dtype=torch.long)
        if param_name == "w13_base":
            half = len(self.local_positions)
            param[(0 if proj == "gate" else half): (half if proj == "gate" else 2 * half)].copy_(loaded[positions])
        elif param_name == "w2_base":
            param.copy_(loaded[:, positions])
        else:
            s, r = self.starts[proj][expert], self.ranks[proj][expert]
            if param_name == "w13_delta_u":
                param[:, s : s + r].copy_(loaded.narrow(0, self.lo, self.part))
            elif param_name == "w2_delta_v":
                param[s : s + r].copy_(loaded.narrow(1, self.lo, self.part))
            elif param_name == "w2_delta_u":
                param[:, s : s + r].copy_(loaded)
            else:
                param[s : s + r].copy_(loaded)

    def first_unloaded(self, param_name: str, param: torch.Tensor) -> str:
        bad = torch.isnan(param)
        if param_name == "w2_base":
            return self.checkpoint_name(param_name, "down", None)
        if param_name == "w13_base":
            first_row = int(bad.any(dim=1).nonzero()[0])
            return self.checkpoint_name(param_name, "gate" if first_row < param.shape[0] // 2 else "up", None)
        along_columns = param_name in ("w13_delta_u", "w2_delta_u")
        index = int(bad.any(dim=0 if along_columns else 1).nonzero()[0])
        projs = ("gate", "up") if param_name.startswith("w13") else ("down",)
        for proj in projs:
            for e, (s, r) in enumerate(zip(self.starts[proj], self.ranks[proj])):
                if s <= index < s + r:
                    return self.checkpoint_name(param_name, proj, e)
        return param_name
