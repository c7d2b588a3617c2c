"""Scheme ``sparse_lowrank`` (RS-MoE): its parameters on one tensor-parallel rank.

vLLM shards experts on the intermediate dimension I; rank t holds channels [t·I/T, (t+1)·I/T). Each expert's
sparse and low-rank units are split by the channel they sit on (docs/format.md §9), in the packed layout of
kernels/sparse_lowrank_torch.py with this rank's counts s_e, m_e:

    w13_sparse     [2·S, H]     gate rows then up rows of the rank's sparse units
    w2_sparse      [H, S]       their down columns
    w13_lowrank_u  [Σ m_e (kg_e + ku_e)]  flat: gate U_e rows of the rank's low-rank units, then up U_e
    w13_lowrank_v  [Kg + Ku, H] replicated
    w2_lowrank_u   [H, Kd]      replicated
    w2_lowrank_v   [Σ kd_e m_e] flat: down V_e columns of the rank's low-rank units
    w2_base        [H, I/T]     columns of the shared down base in the slice ([H, 0] without a base)

Every term of the forward is linear in the rank's channels, so the partial outputs sum to the full output
(vLLM's MoE runner all-reduces them).
"""

from __future__ import annotations

import torch

from vllm_moe_compress.format import PROJECTIONS, SparseLowRankSpec, matrix_shape
from vllm_moe_compress.format.names import base_name, unit_channels_name, unit_name
from vllm_moe_compress.kernels.sparse_lowrank_torch import PackedOffsets, sparse_lowrank_moe

from .scheme import SHARED_BASE_RENAME, CompressedMoEScheme, scheme_op


@scheme_op("sparse_lowrank_moe")
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


class SparseLowRankScheme(CompressedMoEScheme):
    scheme = "sparse_lowrank"
    WEIGHT_RENAMES = SHARED_BASE_RENAME  # experts.base.down_proj.weight -> w2_base

    def __init__(self, spec: SparseLowRankSpec, proj_names: dict[str, str], indices: dict[str, list[int]], tp_rank: int,
                 tp_size: int, dynamic_prune_ratio: float = 0.0):
        super().__init__(spec, proj_names, tp_rank, tp_size)
        # positions[kind][e]: which of expert e's stored units of that kind lie in this rank's slice
        self.positions: dict[str, list[list[int]]] = {}
        self.local_channels: dict[str, list[int]] = {}
        for kind in ("sparse", "lowrank"):
            self.positions[kind], self.local_channels[kind] = [], []
            for e in range(spec.num_experts):
                channels = indices.get(unit_channels_name(spec.prefix, e, kind), [])
                inside = [k for k, c in enumerate(channels) if self.lo <= c < self.lo + self.part]
                self.positions[kind].append(inside)
                self.local_channels[kind] += [channels[k] - self.lo for k in inside]
        self.ranks = [spec.ranks[p] for p in PROJECTIONS]
        self.triton_layout = None  # per-layer metadata of the Triton path (prepare_triton)
        self.at = PackedOffsets([len(p) for p in self.positions["sparse"]],
                                [len(p) for p in self.positions["lowrank"]], self.ranks)
        totals = self.at.totals
        self.shapes = {
            "w13_sparse": (2 * totals["S"], spec.hidden_size),
            "w2_sparse": (spec.hidden_size, totals["S"]),
            "w13_lowrank_u": (totals["gate_up_u"],),
            "w13_lowrank_v": (totals["Kgu"], spec.hidden_size),
            "w2_lowrank_u": (spec.hidden_size, totals["Kd"]),
            "w2_lowrank_v": (totals["down_v"],),
            "w2_base": (spec.hidden_size, self.part if spec.shared_down_base else 0),
        }

    def register_buffers(self, layer: torch.nn.Module) -> None:
        """Counts, ranks and local channels the compute reads (kernels/sparse_lowrank_torch.py)."""
        def int_buffer(name, values):
            layer.register_buffer(name, torch.tensor(values, dtype=torch.int64), persistent=False)

        int_buffer("moe_compress_sparse_counts", self.at.s)
        int_buffer("moe_compress_lowrank_counts", self.at.m)
        int_buffer("moe_compress_ranks", self.ranks)
        int_buffer("moe_compress_sparse_channels", self.local_channels["sparse"])
        int_buffer("moe_compress_lowrank_channels", self.local_channels["lowrank"])

    has_cpu_path = True

    def prepare_cpu(self, layer: torch.nn.Module) -> None:
        from vllm_moe_compress.kernels import sparse_lowrank_cpu

        self.register_cpu_layout(layer, sparse_lowrank_cpu.prepare(*self._op_args(layer)))

    @staticmethod
    def _op_args(layer) -> tuple:
        return (layer.moe_compress_sparse_counts, layer.moe_compress_lowrank_counts, layer.moe_compress_ranks,
                layer.w13_sparse, layer.w2_sparse, layer.w13_lowrank_u, layer.w13_lowrank_v, layer.w2_lowrank_u,
                layer.w2_lowrank_v, layer.w2_base, layer.moe_compress_sparse_channels,
                layer.moe_compress_lowrank_channels)

    def apply_torch(self, layer, x, topk_weights, topk_ids) -> torch.Tensor:
        return torch.ops.moe_compress.sparse_lowrank_moe(x, topk_weights, topk_ids, *self._op_args(layer))

    def prepare_triton(self, layer, device) -> None:
        from vllm_moe_compress.kernels import sparse_lowrank_triton

        self.triton_layout = sparse_lowrank_triton.SparseLowrankLayout.from_lists(
            self.at.s, self.at.m, self.ranks, self.local_channels["sparse"], self.local_channels["lowrank"],
            self.shapes["w2_base"][1], device)

    def apply_triton(self, layer, x, topk_weights, topk_ids) -> torch.Tensor:
        from vllm_moe_compress.kernels import sparse_lowrank_triton

        return sparse_lowrank_triton.sparse_lowrank_moe(x, topk_ids, topk_weights, *self._op_args(layer),
                                                        layout=self.triton_layout)

    def checkpoint_name(self, param: str, proj: str, expert: int | None) -> str:
        if param == "w2_base":
            return base_name(self.spec.prefix, self.proj_names[proj])
        return unit_name(self.spec.prefix, expert, self.proj_names[proj], param.split("_", 1)[1])

    def _expected_shape(self, param: str, proj: str, e: int | None) -> tuple[int, ...]:
        """Shape of the whole checkpoint tensor (before TP slicing)."""
        h, spec = self.spec.hidden_size, self.spec
        if param == "w2_base":
            return (h, spec.intermediate_size)
        s, m = spec.sparse_channels[e], spec.lowrank_channels[e]
        k = spec.ranks[proj][e]
        down = proj == "down"
        return {"sparse": matrix_shape(proj, h, s), "lowrank_u": (h, k) if down else (m, k),
                "lowrank_v": (k, m) if down else (k, h)}[param.split("_", 1)[1]]

    def _block(self, param_name: str, param: torch.Tensor, proj: str, e: int | None) -> torch.Tensor:
        """The view of ``param`` that holds (``proj``, expert ``e``)'s part on this rank."""
        at = self.at
        if param_name == "w2_base":
            return param
        if param_name == "w13_sparse":
            start = at.sparse[e] + (0 if proj == "gate" else at.totals["S"])
            return param[start : start + at.s[e]]
        if param_name == "w2_sparse":
            return param[:, at.sparse[e] : at.sparse[e] + at.s[e]]
        if param_name == "w13_lowrank_u":
            start, k = (at.gate_u[e], at.kg[e]) if proj == "gate" else (at.up_u[e], at.ku[e])
            return param[start : start + at.m[e] * k].view(at.m[e], k)
        if param_name == "w13_lowrank_v":
            start, k = (at.gate_v[e], at.kg[e]) if proj == "gate" else (at.up_v[e], at.ku[e])
            return param[start : start + k]
        if param_name == "w2_lowrank_u":
            return param[:, at.down_u[e] : at.down_u[e] + at.kd[e]]
        return param[at.down_v[e] : at.down_v[e] + at.kd[e] * at.m[e]].view(at.kd[e], at.m[e])

    def _local(self, param_name: str, proj: str, e: int | None, loaded: torch.Tensor) -> torch.Tensor:
        """The part of a whole checkpoint tensor that this rank keeps."""
        if param_name == "w2_base":
            return loaded[:, self.lo : self.lo + self.part]
        kind = "sparse" if param_name.endswith("sparse") else "lowrank"
        rows = torch.tensor(self.positions[kind][e], dtype=torch.long)
        sliced_rows = param_name in ("w13_sparse", "w13_lowrank_u")
        sliced_columns = param_name in ("w2_sparse", "w2_lowrank_v")
        return loaded[rows] if sliced_rows else loaded[:, rows] if sliced_columns else loaded

    def load(self, param_name: str, param: torch.Tensor, loaded: torch.Tensor, proj: str, expert: int) -> None:
        e = None if param_name == "w2_base" else expert
        name = self.checkpoint_name(param_name, proj, e)
        expected = self._expected_shape(param_name, proj, e)
        self.check_loaded(name, loaded, expected)
        self._block(param_name, param, proj, e).copy_(self._local(param_name, proj, e, loaded))

    def first_unloaded(self, param_name: str, param: torch.Tensor) -> str:
        if param_name == "w2_base":
            return self.checkpoint_name(param_name, "down", None)
        projs = ("gate", "up") if param_name.startswith("w13") else ("down",)
        for proj in projs:
            for e in range(self.spec.num_experts):
                if torch.isnan(self._block(param_name, param, proj, e)).any():
                    return self.checkpoint_name(param_name, proj, e)
        return param_name
