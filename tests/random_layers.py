"""Random compressed layers shared by the kernel tests (the C++ CPU op's and the Triton interpreter's), their
float64 dense forward, and the plugin's parameters loaded from them."""

import torch
import torch.nn.functional as F

from vllm_moe_compress.basis_residual import BasisResidualScheme
from vllm_moe_compress.format import PROJECTIONS, matrix_shape
from vllm_moe_compress.format.names import counts_name
from vllm_moe_compress.format.schemes.basis_residual import BasisProjection, BasisResidualLayer
from vllm_moe_compress.format.schemes.sparse_lowrank import ExpertUnits, SparseLowRankLayer

PREFIX = "model.layers.0.mlp.experts"
NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def random_sparse_lowrank_layer(gen, hidden, intermediate, plan, with_base) -> SparseLowRankLayer:
    """``plan``: per expert (sparse units s, low-rank units m, (gate, up, down) rank); float64 weights scaled so
    every stage is O(1)."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) / max(shape[-1], 1) ** 0.5

    experts = []
    for s, m, ranks in plan:
        channels = torch.randperm(intermediate, generator=gen)
        sparse = {p: randn(hidden, s) if p == "down" else randn(s, hidden) for p in PROJECTIONS}
        lowrank = {p: None if not k else (randn(hidden, k), randn(k, m)) if p == "down" else (randn(m, k), randn(k, hidden))
                   for p, k in zip(PROJECTIONS, ranks)}
        experts.append(ExpertUnits(channels[:s].sort().values, sparse, channels[s: s + m].sort().values, lowrank))
    return SparseLowRankLayer(hidden, intermediate, experts, randn(hidden, intermediate) if with_base else None)


def random_basis_residual_layer(gen, num_experts: int, group_size: int, hidden: int, intermediate: int, ranks: dict,
                                mixed: bool, residual_size: int, activation: str) -> BasisResidualLayer:
    """``ranks[proj]``: one basis rank per group (or the common rank when mixed); down absent = dense down.
    Groups are a random partition; values scaled so every projection's output is O(1), the residual's entries
    as large as A φ(B)'s."""
    perm = torch.randperm(num_experts, generator=gen).tolist()
    groups = [perm[i: i + group_size] for i in range(0, num_experts, group_size)]
    group_of = {e: g for g, members in enumerate(groups) for e in members}

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    factorized = {}
    for proj, proj_ranks in ranks.items():
        out_dim, in_dim = matrix_shape(proj, hidden, intermediate)
        basis_ranks = proj_ranks if not mixed else [proj_ranks[0]] * len(groups)
        expert_ranks = [basis_ranks[0] if mixed else basis_ranks[group_of[e]] for e in range(num_experts)]
        entries_per_bucket = group_size * hidden * intermediate / max(residual_size, 1)
        factorized[proj] = BasisProjection(
            bases=[randn(r, in_dim) * 2 / in_dim**0.5 for r in basis_ranks],
            coefs=[randn(out_dim, r) / r**0.5 for r in expert_ranks],
            mix=(randn(num_experts, len(groups)) * 2).softmax(dim=1) if mixed else None,
            etas=[randn(residual_size) * (entries_per_bucket / in_dim) ** 0.5 for _ in groups]
            if residual_size else None)
    dense = {} if "down" in ranks else {"down": randn(num_experts, hidden, intermediate) / intermediate**0.5}
    return BasisResidualLayer(hidden, intermediate, groups, activation, factorized, dense, residual_size,
                              int(torch.randint(0, 2**31, (1,), generator=gen)))


def basis_residual_dense_float64(layer: BasisResidualLayer, x, ids, weights) -> torch.Tensor:
    """Σ_k w_k · W_down (silu(W_gate x) ⊙ W_up x) on the materialised float64 experts."""
    x64, out = x.double(), torch.zeros(x.shape, dtype=torch.float64)
    for e in range(layer.num_experts):
        gate, up, down = (layer.dense_weight(e, p) for p in PROJECTIONS)
        out += (weights.double() * (ids == e)).sum(1, keepdim=True) * ((F.silu(x64 @ gate.T) * (x64 @ up.T)) @ down.T)
    return out


def load_scheme(scheme, tensors: dict[str, torch.Tensor], dtype=torch.float32,
                backend: str = "triton") -> torch.nn.Module:
    """One TP rank's parameters of any plugin scheme, filled through the scheme's own loader (TP slicing
    included) from every checkpoint tensor they hold, and prepared for ``backend``."""
    module = torch.nn.Module()
    for param_name, shape in scheme.shapes.items():
        param = torch.full(shape, float("nan"), dtype=dtype)
        loaded = set()
        for proj in ("gate", "up") if param_name.startswith("w13") else ("down",):
            for index in range(scheme.spec.num_experts):  # an expert, basis or group; shared tensors ignore it
                name = scheme.checkpoint_name(param_name, proj, index)
                if name in tensors and name not in loaded:
                    scheme.load(param_name, param, tensors[name], proj, index)
                    loaded.add(name)
        assert not param.isnan().any(), param_name
        module.register_buffer(param_name, param)
    scheme.register_buffers(module)
    scheme.prepare(module, backend=backend)
    return module


def basis_residual_shard(layer: BasisResidualLayer, tensors: dict, dtype, tp_rank: int, tp_size: int, backend: str):
    """One TP rank's ``BasisResidualScheme`` and parameters, filled through the plugin's own loader and
    post-processing and prepared for ``backend``."""
    spec = layer.spec(0, PREFIX)
    indices = {counts_name(PREFIX): layer.residual_counts.tolist()} if layer.residual_size else {}
    scheme = BasisResidualScheme(spec, NAMES, indices, tp_rank, tp_size)
    return scheme, load_scheme(scheme, tensors, dtype, backend)
