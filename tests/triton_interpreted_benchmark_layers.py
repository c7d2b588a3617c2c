"""The GPU benchmark's layer builders (``benchmarks/kernels.py``) at a tiny model shape, under Triton's interpreter.

The benchmark itself needs a GPU; this runs the same builders (the compressor's accounting, random factors in
the plugin's layout) on the CPU, so a change to the accounting or a kernel's signature that breaks the
benchmark fails here: for every scheme, the Triton forward must match the torch path on fresh random inputs
and the byte/FLOP accounting must be positive and below the dense layer's. Run by tests/test_kernels_triton.py.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through tests/test_kernels_triton.py (needs TRITON_INTERPRET=1 before Triton loads)",
                allow_module_level=True)

from benchmarks.kernels import SCHEMES, ModelShape  # noqa: E402

TINY = ModelShape(layers=2, hidden=64, intermediate=48, experts=8, top_k=2, vocab=64, heads=2, kv_heads=1,
                  head_dim=32, qk_norm=True)


@pytest.mark.parametrize("ratio", [0.2, 0.5])  # rfid keeps down dense: at most 0.53 on this tiny model
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_benchmark_layer_runs_and_matches_the_torch_path(scheme, ratio):
    gen = torch.Generator().manual_seed(3)
    layer = SCHEMES[scheme](TINY, ratio, 0, torch.float32, torch.device("cpu"), gen)
    x = torch.randn(5, TINY.hidden, generator=gen)
    topk_logits, topk_ids = torch.randn(5, TINY.experts, generator=gen).topk(TINY.top_k, dim=1)
    topk_ids, topk_weights = topk_ids.to(torch.int32), topk_logits.softmax(dim=1)
    want = layer.torch_moe(x, topk_ids, topk_weights)
    got = layer.triton_moe(x, topk_ids, topk_weights)
    assert want.abs().max() > 0
    assert float((got - want).norm() / want.norm()) < 1e-4
    every_expert = torch.ones(TINY.experts, dtype=torch.bool)
    dense_params = 3 * TINY.hidden * TINY.intermediate * TINY.experts
    assert 0 < layer.read_params(every_expert) < dense_params
    assert layer.flops(topk_ids) > 0
