"""Scheme ``basis_residual`` (RFID-MoE, MoBE): its parameters on one tensor-parallel rank.

vLLM shards experts on the intermediate dimension I (docs/format.md §10):

    w13_coef  [I/tp, Σ_e K_e,gate + Σ_e K_e,up]   expert coefficients A_e, rows sharded
    w13_basis [Σ_j K_j,gate + Σ_j K_j,up, H]     group bases, replicated; φ(B) replaces B after loading
    w13_mix   [2, E, m]                           MoBE mixing weights (mixed bases only)
    w13_eta   [2·m, a]                            residual η per group; s ⊙ η after loading (residual only)
    w2_weight [E, H, I/tp]                        dense down (default), columns sharded
 or w2_coef [H, Σ_e K_e], w2_basis [Σ_j K_j, I/tp], w2_mix [E, m], w2_eta [m, a]   factorised down

On CUDA devices ``apply_triton`` runs the Triton kernels (kernels/basis_residual_triton.py; MoBE's per-expert right
factors are materialised there once, at load: ``prepare_triton``); on CPUs ``apply_cpu``, the C++ op
(kernels/basis_residual_cpu.py, layout made in ``prepare_cpu``), or ``apply_torch``, the torch custom op, where
the C++ op cannot be built.

Group-shared tensors get an expert-style name from the config's weight mapper (the basis / η of group g as
``experts.{g}.{proj}.basis`` / ``.eta``, the mixing weights as ``experts.0.{proj}.mix``) so vLLM's expert
mapping routes them; the bucket counts ``P.residual.counts`` are read at start-up and checked against the seed.
"""

from __future__ import annotations

import re

import torch

from vllm_moe_compress.format import PROJECTIONS, BasisResidualSpec, FormatError, matrix_shape
from vllm_moe_compress.format.names import basis_name, coef_name, counts_name, dense_name, eta_name, mix_name
from vllm_moe_compress.kernels.basis_residual_torch import (ACTIVATIONS, ProjectionWeights, basis_residual_moe,
                                                            materialise_mixed_right)
from vllm_moe_compress.kernels.grouped import offsets
from vllm_moe_compress.kernels.residual_hash import bucket_counts, bucket_scales

from .scheme import CHECKPOINT_PROJ as PROJ, CompressedMoEScheme, scheme_op


@scheme_op("basis_residual_moe")
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


GATE_UP = ("gate", "up")


class BasisResidualScheme(CompressedMoEScheme):
    scheme = "basis_residual"
    WEIGHT_RENAMES = {
        re.compile(rf"\.experts\.basis\.(\d+)\.{PROJ}\.weight$"): r".experts.\1.\2.basis",
        re.compile(rf"\.experts\.basis\.{PROJ}\.mix$"): r".experts.0.\1.mix",
        re.compile(rf"\.experts\.residual\.(\d+)\.{PROJ}\.eta$"): r".experts.\1.\2.eta",
        re.compile(r"\.experts\.residual\.counts$"): None,  # read at start-up (spec.index_tensor_names)
    }

    @staticmethod
    def check_indices(spec: BasisResidualSpec, indices: dict[str, list[int]]) -> None:
        """The stored bucket counts must be those of the residual's seed (the hash: kernels/residual_hash.py)."""
        if spec.residual_size:
            want = bucket_counts(spec.group_size * spec.hidden_size * spec.intermediate_size, spec.residual_seed,
                                 spec.residual_size)
            if indices[counts_name(spec.prefix)] != want.tolist():
                raise FormatError(f"tensor {counts_name(spec.prefix)} does not match the bucket counts of "
                                  f"residual_seed {spec.residual_seed}")

    def __init__(self, spec: BasisResidualSpec, proj_names: dict[str, str], indices: dict[str, list[int]], tp_rank: int,
                 tp_size: int, dynamic_prune_ratio: float = 0.0):
        super().__init__(spec, proj_names, tp_rank, tp_size)
        self.factorized = spec.factorized
        if not set(GATE_UP) <= set(self.factorized):
            raise ValueError(f"moe_compress: {spec.prefix}: this plugin serves basis_residual layers whose gate and "
                             f"up are factorised; factorised here: {self.factorized}")
        self.mixed, self.residual = spec.mixed, spec.residual_size
        self.triton_inputs = None  # (layout, right factors) of the Triton path (prepare_triton)
        self.num_bases = len(spec.basis_ranks["gate"])
        self.group_slot = spec.group_and_slot()
        if self.residual:
            counts = torch.tensor(indices[counts_name(spec.prefix)], dtype=torch.int64)
            self.scales = bucket_scales(counts)  # float64; rounded to the weights' dtype when applied
        # Column (coef) and row (basis) starts of each (projection, expert / basis) in the packed w13 tensors.
        packed = (("gate", "up"), ("down",))
        self.coef_start, self.basis_start = {}, {}
        for projs in packed:
            coef_sizes = [r for p in projs if p in self.factorized for r in spec.ranks[p]]
            basis_sizes = [r for p in projs if p in self.factorized for r in spec.basis_ranks[p]]
            cs, bs = offsets(coef_sizes), offsets(basis_sizes)
            for i, p in enumerate(q for q in projs if q in self.factorized):
                self.coef_start[p] = cs[i * spec.num_experts : (i + 1) * spec.num_experts]
                self.basis_start[p] = bs[i * self.num_bases : (i + 1) * self.num_bases]
        h, e, m, a = spec.hidden_size, spec.num_experts, self.num_bases, self.residual
        gu = {"ranks": sum(spec.ranks["gate"]) + sum(spec.ranks["up"]),
              "bases": sum(spec.basis_ranks["gate"]) + sum(spec.basis_ranks["up"])}
        self.shapes = {"w13_coef": (self.part, gu["ranks"]), "w13_basis": (gu["bases"], h)}
        if self.mixed:
            self.shapes["w13_mix"] = (2, e, m)
        if a:
            self.shapes["w13_eta"] = (2 * m, a)
        if "down" in self.factorized:
            self.shapes |= {"w2_coef": (h, sum(spec.ranks["down"])),
                            "w2_basis": (sum(spec.basis_ranks["down"]), self.part)}
            if self.mixed:
                self.shapes["w2_mix"] = (e, m)
            if a:
                self.shapes["w2_eta"] = (m, a)
        else:
            self.shapes["w2_weight"] = (e, h, self.part)

    def register_buffers(self, layer: torch.nn.Module) -> None:
        """Ranks per (projection, expert) and per (projection, basis); group and slot of each expert."""
        expert_ranks = [self.spec.ranks.get(p, [0] * self.spec.num_experts) for p in PROJECTIONS]
        basis_ranks = [self.spec.basis_ranks.get(p, [0] * self.num_bases) for p in PROJECTIONS]
        groups, slots = zip(*self.group_slot)
        for name, values in (("expert_ranks", expert_ranks), ("basis_ranks", basis_ranks), ("expert_group", groups),
                             ("expert_slot", slots)):
            layer.register_buffer(f"moe_compress_{name}", torch.tensor(values, dtype=torch.int64), persistent=False)

    def process_loaded(self, layer: torch.nn.Module) -> None:
        """Weights-only precomputation: φ(B_g) in place of B_g (one basis per group), s ⊙ η in place of η."""
        phi = ACTIVATIONS[self.spec.activation]
        with torch.no_grad():
            for prefix in ("w13", "w2"):
                basis = getattr(layer, f"{prefix}_basis", None)
                if basis is not None and not self.mixed:
                    basis.copy_(phi(basis))
                eta = getattr(layer, f"{prefix}_eta", None)
                if eta is not None:
                    eta.mul_(self.scales.to(eta.device, eta.dtype))

    # ------------------------------------------------------------------------------------ loading

    def checkpoint_name(self, param: str, proj: str, index: int) -> str:
        """The checkpoint tensor a parameter slice comes from (``index``: expert, basis or group)."""
        name, prefix = self.proj_names[proj], self.spec.prefix
        kind = param.split("_", 1)[1]
        return {"coef": lambda: coef_name(prefix, index, name), "basis": lambda: basis_name(prefix, index, name),
                "mix": lambda: mix_name(prefix, name), "eta": lambda: eta_name(prefix, index, name),
                "weight": lambda: dense_name(prefix, index, name)}[kind]()

    def expected_shape(self, kind: str, proj: str, index: int) -> tuple[int, ...]:
        out_dim, in_dim = matrix_shape(proj, self.spec.hidden_size, self.spec.intermediate_size)
        return {"coef": lambda: (out_dim, self.spec.ranks[proj][index]),
                "basis": lambda: (self.spec.basis_ranks[proj][index], in_dim),
                "mix": lambda: (self.spec.num_experts, self.num_bases),
                "eta": lambda: (self.residual,), "weight": lambda: (out_dim, in_dim)}[kind]()

    def load(self, param_name: str, param: torch.Tensor, loaded: torch.Tensor, proj: str, expert: int) -> None:
        kind = param_name.split("_", 1)[1]
        limit = self.num_bases if kind in ("basis", "eta") else self.spec.num_experts
        if not 0 <= expert < limit:
            raise ValueError(f"moe_compress: {self.spec.prefix}: {proj} {kind} index {expert} outside [0, {limit})")
        name = self.checkpoint_name(param_name, proj, expert)
        expected = self.expected_shape(kind, proj, expert)
        self.check_loaded(name, loaded, expected)
        sharded_rows = proj != "down"  # gate/up: rows of I; down: columns of I
        if kind == "coef":
            s, r = self.coef_start[proj][expert], expected[1]
            param[:, s : s + r].copy_(loaded.narrow(0, self.lo, self.part) if sharded_rows else loaded)
        elif kind == "basis":
            s, r = self.basis_start[proj][expert], expected[0]
            param[s : s + r].copy_(loaded if sharded_rows else loaded.narrow(1, self.lo, self.part))
        elif kind == "mix":
            (param[GATE_UP.index(proj)] if sharded_rows else param).copy_(loaded)
        elif kind == "eta":
            row = (GATE_UP.index(proj) * self.num_bases if sharded_rows else 0) + expert
            param[row].copy_(loaded)
        else:
            param[expert].copy_(loaded.narrow(1, self.lo, self.part))

    def first_unloaded(self, param_name: str, param: torch.Tensor) -> str:
        bad = torch.isnan(param)
        kind = param_name.split("_", 1)[1]
        projs = GATE_UP if param_name.startswith("w13") else ("down",)
        if kind == "weight":
            return self.checkpoint_name(param_name, "down", int(bad.flatten(1).any(1).nonzero()[0]))
        if kind == "mix":
            first = int(bad.flatten(1).any(1).nonzero()[0]) if param.dim() == 3 else 0
            return self.checkpoint_name(param_name, projs[first], 0)
        if kind == "eta":
            row = int(bad.any(1).nonzero()[0])
            return self.checkpoint_name(param_name, projs[row // self.num_bases], row % self.num_bases)
        packed_dim = 1 if kind == "coef" else 0  # coef: columns per expert; basis: rows per basis
        index = int(bad.any(1 - packed_dim).nonzero()[0])
        starts = self.coef_start if kind == "coef" else self.basis_start
        for proj in projs:
            for i, s in enumerate(starts[proj]):
                if s <= index < s + self.expected_shape(kind, proj, i)[packed_dim]:
                    return self.checkpoint_name(param_name, proj, i)
        return param_name

    # ------------------------------------------------------------------------------------ compute

    def projection(self, layer, proj: str, x: torch.Tensor) -> ProjectionWeights:
        empty = x.new_zeros(0)
        i = PROJECTIONS.index(proj)
        expert_ranks, basis_ranks = layer.moe_compress_expert_ranks[i], layer.moe_compress_basis_ranks[i]
        if proj not in self.factorized:
            return ProjectionWeights(layer.w2_weight, empty, expert_ranks, empty, basis_ranks, empty, empty)
        if proj == "down":
            return ProjectionWeights(empty, layer.w2_coef, expert_ranks, layer.w2_basis, basis_ranks,
                                     getattr(layer, "w2_mix", empty), getattr(layer, "w2_eta", empty))
        j = GATE_UP.index(proj)
        split_coef, split_basis = sum(self.spec.ranks["gate"]), sum(self.spec.basis_ranks["gate"])
        coef = layer.w13_coef[:, :split_coef] if j == 0 else layer.w13_coef[:, split_coef:]
        basis = layer.w13_basis[:split_basis] if j == 0 else layer.w13_basis[split_basis:]
        mix = layer.w13_mix[j] if self.mixed else empty
        eta = layer.w13_eta[j * self.num_bases : (j + 1) * self.num_bases] if self.residual else empty
        return ProjectionWeights(empty, coef, expert_ranks, basis, basis_ranks, mix, eta)

    def apply_torch(self, layer, x, topk_weights, topk_ids) -> torch.Tensor:
        """Σ_k w_k·expert_k(x) through the torch custom op (CPUs where the C++ op cannot be built)."""
        weights = [t for p in PROJECTIONS for t in self.projection(layer, p, x)]
        return torch.ops.moe_compress.basis_residual_moe(
            x, topk_weights, topk_ids, weights, layer.moe_compress_expert_group, layer.moe_compress_expert_slot,
            self.spec.activation, self.spec.residual_seed, self.spec.intermediate_size,
            self.lo,
        )

    has_cpu_path = True

    def prepare_cpu(self, layer: torch.nn.Module) -> None:
        """The C++ CPU op's layout (kernels/basis_residual_cpu.py): Aᵀ per expert, MoBE's right factors made once."""
        from vllm_moe_compress.kernels import basis_residual_cpu

        empty = layer.w13_coef.new_zeros(0)
        layout = basis_residual_cpu.prepare(
            *(self.projection(layer, p, empty) for p in PROJECTIONS), layer.moe_compress_expert_group,
            layer.moe_compress_expert_slot, self.spec.activation, self.spec.residual_seed,
            self.spec.intermediate_size, self.lo)
        self.register_cpu_layout(layer, layout)

    def apply_triton(self, layer, x, topk_weights, topk_ids) -> torch.Tensor:
        from vllm_moe_compress.kernels import basis_residual_triton as kernels

        layout, gate_up_right, down_right = self.triton_inputs
        empty = x.new_zeros(0)
        weights = kernels.BasisResidualWeights(
            layer.w13_coef, gate_up_right, getattr(layer, "w13_eta", empty), getattr(layer, "w2_weight", empty),
            getattr(layer, "w2_coef", empty), down_right, getattr(layer, "w2_eta", empty))
        return kernels.basis_residual_moe(x, topk_ids, topk_weights, weights, layout)

    def prepare_triton(self, layer, device) -> None:
        """The kernels' per-layer metadata and right factors: φ(B_g) as loaded, or MoBE's per-expert
        φ(Σ_j α_ej B_j) materialised once (GPU memory E·K·in per projection; kernels/basis_residual_triton.py)."""
        from vllm_moe_compress.kernels import basis_residual_triton as kernels

        spec, e = self.spec, self.spec.num_experts
        expert_ranks = [spec.ranks.get(p, [0] * e) for p in PROJECTIONS]
        basis_ranks = [spec.basis_ranks.get(p, [0] * self.num_bases) for p in PROJECTIONS]
        groups, slots = zip(*self.group_slot)
        layout = kernels.BasisResidualLayout.from_lists(
            expert_ranks, basis_ranks, list(groups), list(slots), self.mixed, self.spec.hidden_size, self.part,
            self.spec.intermediate_size, self.lo, self.residual, spec.residual_seed, device)
        gate_up_right = layer.w13_basis
        down_right = getattr(layer, "w2_basis", layer.w13_basis.new_zeros(0))
        if self.mixed:
            activation, split = spec.activation, sum(spec.basis_ranks["gate"])
            gate_up_right = torch.cat([
                materialise_mixed_right(basis, layer.w13_mix[j], activation)
                for j, basis in enumerate((layer.w13_basis[:split], layer.w13_basis[split:]))])
            if "down" in self.factorized:
                down_right = materialise_mixed_right(layer.w2_basis, layer.w2_mix, activation)
        self.triton_inputs = layout, gate_up_right, down_right
