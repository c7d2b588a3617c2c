"""The reference compressed-MoE forward against float64 dense math on fresh random inputs."""

import pytest
import torch
import torch.nn.functional as F

from vllm_moe_compress.format.schemes.base_delta import BaseDeltaExperts
from vllm_moe_compress.format.schemes.base_delta import BaseDeltaLayer
import vllm_moe_compress.kernels.base_delta_torch as base_delta_torch

E, H, I, T, K = 6, 16, 10, 40, 3


@pytest.fixture(autouse=True, params=["masked", "grouped"])
def strategy(request, monkeypatch):
    """Run every test through both strategies of the torch path."""
    limit = 2**62 if request.param == "masked" else -1
    monkeypatch.setattr(base_delta_torch, "MASKED_PATH_MAX_MACS", limit)
    return request.param


def random_layer(seed: int, with_base: bool) -> BaseDeltaLayer:
    g = torch.Generator().manual_seed(seed)
    ranks = [3, 0, 5, 1, 10, 2]  # ragged, one rank-0 expert, one full rank
    factors = {}
    for p in ("gate", "up", "down"):
        out_dim, in_dim = (H, I) if p == "down" else (I, H)
        factors[p] = [
            (torch.randn(out_dim, r, generator=g, dtype=torch.float64), torch.randn(r, in_dim, generator=g, dtype=torch.float64))
            if r else None for r in ranks
        ]
    base = channels = None
    if with_base:
        channels = torch.tensor([0, 2, 3, 5, 6, 9])
        base = {"gate": torch.randn(6, H, generator=g, dtype=torch.float64),
                "up": torch.randn(6, H, generator=g, dtype=torch.float64),
                "down": torch.randn(H, 6, generator=g, dtype=torch.float64)}
    return BaseDeltaLayer(H, I, factors, base, channels)


def dense_moe(layer, x, idx, w):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            g = layer.dense_weight(e, "gate") @ x[t]
            u = layer.dense_weight(e, "up") @ x[t]
            out[t] += w[t, j] * (layer.dense_weight(e, "down") @ (F.silu(g) * u))
    return out


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_dense_float64(with_base, seed):
    layer = random_layer(seed, with_base)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    # experts 1..5 only: expert 0 receives no tokens
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:K] + 1 for _ in range(T)])
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    module = BaseDeltaExperts(layer)
    torch.testing.assert_close(module(x, idx, w), dense_moe(layer, x, idx, w), rtol=1e-10, atol=1e-10)


def test_single_token_and_float32():
    layer = random_layer(3, True)
    x = torch.randn(1, H, dtype=torch.float64)
    idx, w = torch.tensor([[4, 2, 0]]), torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    expected = dense_moe(layer, x, idx, w)
    module = BaseDeltaExperts(layer).float()
    # fp32 against float64: an element near zero after cancellation carries the rounding of the output's scale
    scale = expected.abs().max().item()
    torch.testing.assert_close(module(x.float(), idx, w.float()).double(), expected, rtol=1e-4, atol=1e-5 * scale)


def test_dynamic_pruning_skips_lowest_scoring_base_columns():
    layer = random_layer(4, True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    full = BaseDeltaExperts(layer)
    pruned = BaseDeltaExperts(layer, dynamic_prune_ratio=0.2)  # round(0.2 * 10) = 2 columns
    assert pruned.num_dynamic_drop == 2
    # expected: the same forward with the two lowest-scoring base-down columns zeroed
    acc = torch.zeros(T, 6, dtype=torch.float64)
    for t in range(T):
        for j in range(K):
            e = int(idx[t, j])
            h = F.silu(layer.dense_weight(e, "gate") @ x[t]) * (layer.dense_weight(e, "up") @ x[t])
            acc[t] += w[t, j] * h[layer.base_channels]
    score = layer.base["down"].norm(dim=0) * acc.norm(dim=0)
    dropped = torch.argsort(score)[:2]
    expected = full(x, idx, w) - acc[:, dropped] @ layer.base["down"][:, dropped].T
    torch.testing.assert_close(pruned(x, idx, w), expected, rtol=1e-10, atol=1e-10)
