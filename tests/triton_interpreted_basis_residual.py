"""The Triton ``basis_residual`` kernels (RFID-MoE, MoBE) under Triton's interpreter, through the plugin's CUDA branch.

Run by ``tests/test_kernels_triton.py`` in a subprocess with ``TRITON_INTERPRET=1`` (see ``triton_interpreted.py``).
Each case builds a random ``BasisResidualLayer`` (fresh values, never zeros; the hashed residual as large as the
low-rank part), writes its checkpoint tensors in the dtype under test, loads them through
``BasisResidualScheme.load`` / ``prepare`` (the plugin's packing and TP slicing), and runs
``apply_triton`` against the plugin's torch path (the custom op, in float32 on the same loaded weights, per TP
rank) and float64 dense math (the ranks' sum) on the materialised
experts, with every float buffer NaN-poisoned first.
"""

import copy
import dataclasses
import os
import zlib

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through tests/test_kernels_triton.py (needs TRITON_INTERPRET=1 before Triton loads)",
                allow_module_level=True)

import vllm_moe_compress.kernels.basis_residual_triton as triton_path  # noqa: E402
from vllm_moe_compress.kernels.routing import block_size_for  # noqa: E402
import vllm_moe_compress.basis_residual  # noqa: E402,F401  (registers the torch path's custom op)
from vllm_moe_compress.kernels.residual_hash import MAX_POSITIONS, bucket_of  # noqa: E402
from vllm_moe_compress.format.schemes.basis_residual import BasisResidualLayer  # noqa: E402
from random_layers import (NAMES, PREFIX, basis_residual_dense_float64, basis_residual_shard,  # noqa: E402
                           random_basis_residual_layer)
from triton_interpreted import TOLERANCE, poisoned_buffers  # noqa: E402,F401  (a fixture)


@pytest.mark.parametrize("seed, size", [(0, 1), (1, 7), (3, 97), (2**31 + 11, 189_001), (123456789, 2**31 - 1),
                                        (5, 2**32 - 1)])
def test_in_kernel_hash_equals_bucket_of(seed, size):
    gen = torch.Generator().manual_seed(seed % 2**31)
    positions = torch.cat([torch.randint(0, MAX_POSITIONS, (3000,), generator=gen),
                           torch.arange(MAX_POSITIONS - 300, MAX_POSITIONS), torch.arange(300)])
    assert torch.equal(triton_path.residual_buckets(positions, seed, size), bucket_of(positions, seed, size))


CASES = {
    # name: (tokens, top_k, experts, group size, hidden, intermediate, ranks, mixed, residual size, activation, tp)
    "rfid, residual, ragged ranks, idle group": (13, 3, 8, 2, 48, 40, {"gate": [3, 17, 1, 6], "up": [5, 2, 9, 4]},
                                                  False, 97, "silu", 1),
    "rfid, no residual, factorised down": (9, 2, 6, 3, 32, 24, {"gate": [4, 11], "up": [7, 2], "down": [5, 3]},
                                           False, 0, "silu", 1),
    "rfid, residual, factorised down, TP 2": (10, 2, 6, 2, 40, 48, {"gate": [3, 8, 5], "up": [6, 2, 7],
                                                                    "down": [4, 9, 2]}, False, 61, "silu", 2),
    "mobe, factorised down": (11, 2, 6, 2, 32, 40, {"gate": [5], "up": [6], "down": [4]}, True, 0, "tanh", 1),
    "mobe, dense down": (7, 3, 8, 4, 48, 24, {"gate": [9], "up": [3]}, True, 0, "silu", 1),
    "single token, top-8": (1, 8, 10, 2, 32, 24, {"gate": [2, 5, 3, 1, 7], "up": [4, 4, 6, 2, 3]}, False, 30,
                            "silu", 1),
    "top-1, 64-slot blocks": (130, 1, 4, 2, 24, 32, {"gate": [6, 3], "up": [2, 5], "down": [3, 4]}, False, 40,
                              "silu", 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_torch_path_and_dense_float64(case, dtype, poisoned_buffers):
    tokens, top_k, num_experts, group_size, hidden, intermediate, ranks, mixed, residual, activation, tp = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case} {dtype}".encode()))
    layer = random_basis_residual_layer(gen, num_experts, group_size, hidden, intermediate, ranks, mixed, residual, activation)
    tensors = layer.to_tensors(PREFIX, NAMES, dtype)
    # The float64 reference sees the stored (rounded) weights, so only the compute's rounding is measured.
    stored = BasisResidualLayer.from_tensors(layer.spec(0, PREFIX), NAMES,
                                             lambda name: tensors[name].double() if tensors[name].is_floating_point()
                                             else tensors[name])
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    # "idle": the experts of group 0 get no token (an idle expert and an idle owner of a right factor).
    routed = torch.tensor([e for e in range(num_experts) if "idle" not in case or e not in layer.groups[0]])
    ids = torch.stack([routed[torch.randperm(len(routed), generator=gen)[:top_k]] for _ in range(tokens)]).int()
    weights = torch.rand(tokens, top_k, generator=gen)
    if "64-slot" in case:
        assert block_size_for(ids.numel(), num_experts) == 64

    total = torch.zeros(tokens, hidden, dtype=torch.float64)
    for tp_rank in range(tp):
        scheme, module = basis_residual_shard(layer, tensors, dtype, tp_rank, tp, "triton")
        got = scheme.apply_triton(module, x, weights, ids)
        assert got.dtype == dtype and got.shape == x.shape
        # The torch path in float32 on the same loaded (rounded, post-processed) weights: the difference is the
        # kernels' own rounding, and a wrong slice of this rank's packing or positions shows up per rank.
        torch_path = scheme.apply_torch(copy.deepcopy(module).float(), x.float(), weights, ids).double()
        error = (got.double() - torch_path).norm() / torch_path.norm()
        assert error <= TOLERANCE[dtype], f"TP rank {tp_rank}: relative error vs torch path {error:.2e}"
        total += got.double()

    dense = basis_residual_dense_float64(stored, x, ids, weights)
    assert dense.norm() > 0.1 * tokens**0.5  # not a vacuous comparison
    if residual:  # the residual is a large part of the output, so ignoring or misplacing it fails
        without = basis_residual_dense_float64(dataclasses.replace(stored, residual_size=0), x, ids, weights)
        assert (dense - without).norm() > 0.2 * dense.norm()
    error = (total - dense).norm() / dense.norm()
    assert error <= TOLERANCE[dtype], f"relative error vs float64 dense {error:.2e}"
