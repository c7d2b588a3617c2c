"""The Triton sparse_lowrank kernels under Triton's interpreter (CPU), against the torch path and float64 dense math.

Run by ``tests/test_kernels_triton.py`` in a subprocess with ``TRITON_INTERPRET=1`` (see ``triton_interpreted.py``,
whose NaN-poisoned buffers, tolerances and dense reference this module shares). Every case draws fresh random
experts and inputs; the experts cover what RS-MoE produces and the edges of the packed layout: sparse-only,
low-rank-only, mixed, nothing kept, low-rank units of rank 0, ragged ranks above one rank chunk, an idle expert.
"""

import os
import zlib

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through tests/test_kernels_triton.py (needs TRITON_INTERPRET=1 before Triton loads)",
                allow_module_level=True)

import vllm_moe_compress.kernels.sparse_lowrank_torch as torch_path  # noqa: E402
import vllm_moe_compress.kernels.sparse_lowrank_triton as triton_path  # noqa: E402
from vllm_moe_compress.kernels.routing import block_size_for  # noqa: E402
from vllm_moe_compress.format.names import unit_channels_name  # noqa: E402
from vllm_moe_compress.format.schemes.sparse_lowrank import ExpertUnits, SparseLowRankLayer  # noqa: E402
from random_layers import random_sparse_lowrank_layer  # noqa: E402
from random_layers import load_scheme  # noqa: E402
from triton_interpreted import PROJ_NAMES, TOLERANCE, dense_float64, poisoned_buffers  # noqa: E402, F401


def rounded(layer: SparseLowRankLayer, dtype) -> SparseLowRankLayer:
    """Every weight rounded to ``dtype`` (kept in float64): the dense reference sees the kernels' weights."""
    def r(t):
        return t.to(dtype).double()

    experts = [ExpertUnits(ex.sparse_channels, {p: r(w) for p, w in ex.sparse.items()}, ex.lowrank_channels,
                           {p: None if f is None else (r(f[0]), r(f[1])) for p, f in ex.lowrank.items()})
               for ex in layer.experts]
    base = None if layer.base_down is None else r(layer.base_down)
    return SparseLowRankLayer(layer.hidden_size, layer.intermediate_size, experts, base)


CASES = {
    # name: (tokens, top_k, hidden, intermediate, per expert (sparse units, low-rank units, ranks), base)
    "mixed experts, ragged ranks, idle expert 0": (37, 3, 48, 40, [
        (5, 7, (3, 0, 4)),        # idle: gets no token
        (6, 9, (2, 5, 0)),        # mixed, down rank 0
        (12, 0, (0, 0, 0)),       # sparse units only
        (0, 11, (4, 3, 6)),       # low-rank units only
        (0, 0, (0, 0, 0)),        # nothing kept
        (3, 4, (0, 0, 0)),        # low-rank units of rank 0: they contribute nothing
        (2, 36, (35, 33, 34)),    # ranks above one 32-rank chunk
    ], True),
    "no base": (9, 2, 32, 24, [(4, 6, (3, 2, 5)), (0, 9, (6, 6, 1)), (10, 3, (1, 0, 2)), (7, 0, (0, 0, 0)),
                               (1, 12, (9, 8, 7))], False),
    "single token, top-8": (1, 8, 32, 20, [(e % 4, 6 + e % 5, (e % 3, 1 + e % 4, e % 5)) for e in range(10)], True),
    "top-1, sparse units only": (20, 1, 32, 24, [(3, 0, (0, 0, 0)), (8, 0, (0, 0, 0)), (0, 0, (0, 0, 0)),
                                                 (13, 0, (0, 0, 0))], True),
    "low-rank units only, no base": (12, 2, 32, 24, [(0, 10, (4, 2, 3)), (0, 24, (7, 9, 11)), (0, 5, (0, 1, 2)),
                                                     (0, 17, (5, 5, 5))], False),
    "64-pair blocks, wide experts": (48, 3, 24, 96, [(70, 20, (5, 9, 3)), (2, 90, (24, 20, 22)), (33, 33, (8, 0, 8)),
                                                     (0, 0, (0, 0, 0))], True),
}


def routing(gen, tokens, top_k, num_experts, first_expert):
    """Distinct experts per token from [first_expert, E); routing weights in (0, 1)."""
    ids = torch.stack([torch.randperm(num_experts - first_expert, generator=gen)[:top_k] + first_expert
                       for _ in range(tokens)]).int()
    return ids, torch.rand(tokens, top_k, generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_torch_path_and_dense_float64(case, dtype, poisoned_buffers):
    tokens, top_k, hidden, intermediate, plan, with_base = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case} {dtype}".encode()))
    layer = rounded(random_sparse_lowrank_layer(gen, hidden, intermediate, plan, with_base), dtype)
    packed = {name: t.to(dtype) if t.is_floating_point() else t for name, t in layer.packed().items()}
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    ids, weights = routing(gen, tokens, top_k, len(plan), first_expert=1 if "idle" in case else 0)
    if case.startswith("64-pair"):
        assert block_size_for(ids.numel(), len(plan)) == 64

    got = triton_path.sparse_lowrank_moe(x, ids, weights, **packed)

    assert got.dtype == dtype and got.shape == x.shape
    dense = dense_float64(layer, x, ids, weights)
    reference = torch_path.sparse_lowrank_moe(x, ids, weights, **packed).double()
    assert dense.norm() > 0.1 * tokens ** 0.5  # not a vacuous comparison
    for expected in (dense, reference):
        error = (got.double() - expected).norm() / expected.norm()
        assert error <= TOLERANCE[dtype], f"relative error {error:.2e}"


def test_plugin_triton_branch_sums_over_tensor_parallel_ranks(poisoned_buffers):
    """``SparseLowRankScheme.apply_triton`` (the backend on CUDA devices) on each of 2 TP shards, whose unit counts
    differ per expert and rank: its per-layer metadata comes from host lists; the shards sum to the layer."""
    from vllm_moe_compress.sparse_lowrank import SparseLowRankScheme

    gen = torch.Generator().manual_seed(5)
    plan = [(5, 7, (3, 2, 4)), (0, 11, (4, 3, 6)), (12, 0, (0, 0, 0)), (6, 9, (2, 5, 0))]
    layer = rounded(random_sparse_lowrank_layer(gen, 32, 24, plan, True), torch.float32)
    spec = layer.spec(0, "model.layers.0.mlp.experts")
    tensors = layer.to_tensors(spec.prefix, PROJ_NAMES, torch.float32)
    indices = {name: tensors[name].tolist() for e in range(len(plan)) for kind in ("sparse", "lowrank")
               if (name := unit_channels_name(spec.prefix, e, kind)) in tensors}
    x = torch.randn(9, 32, generator=gen)
    ids, weights = routing(gen, 9, 2, len(plan), first_expert=0)
    total = torch.zeros(9, 32)
    for tp_rank in range(2):
        scheme = SparseLowRankScheme(spec, PROJ_NAMES, indices, tp_rank, 2)
        total += scheme.apply_triton(load_scheme(scheme, tensors, backend="triton"), x, weights, ids)
    dense = dense_float64(layer, x, ids, weights)
    assert (total.double() - dense).norm() / dense.norm() <= TOLERANCE[torch.float32]
