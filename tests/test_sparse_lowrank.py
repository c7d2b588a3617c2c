"""Scheme ``sparse_lowrank``: reference forward against float64 dense math, and the checkpoint round trip."""

import pytest
import torch
import torch.nn.functional as F

from vllm_moe_compress.format import FormatError
from vllm_moe_compress.format.names import unit_channels_name, unit_name
from vllm_moe_compress.format.schemes.sparse_lowrank import ExpertUnits, SparseLowRankLayer

E, H, I, T, K = 5, 16, 12, 40, 3
PROJ_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def random_layer(seed: int, with_base: bool) -> SparseLowRankLayer:
    """Ragged experts: all sparse, all low-rank, mixed, nothing at all, low-rank with rank 0 on one projection."""
    g = torch.Generator().manual_seed(seed)
    plan = [(3, 5, (2, 2, 2)), (0, 6, (3, 1, 2)), (I, 0, (0, 0, 0)), (0, 0, (0, 0, 0)), (4, 4, (1, 0, 4))]
    experts = []
    for s, m, ranks in plan:
        channels = torch.randperm(I, generator=g)
        sparse_ch, lowrank_ch = channels[:s].sort().values, channels[s : s + m].sort().values
        sparse = {p: torch.randn((H, s) if p == "down" else (s, H), generator=g, dtype=torch.float64)
                  for p in PROJ_NAMES}
        lowrank = {}
        for p, k in zip(PROJ_NAMES, ranks):
            u_shape, v_shape = ((H, k), (k, m)) if p == "down" else ((m, k), (k, H))
            lowrank[p] = (torch.randn(u_shape, generator=g, dtype=torch.float64),
                          torch.randn(v_shape, generator=g, dtype=torch.float64)) if k else None
        experts.append(ExpertUnits(sparse_ch, sparse, lowrank_ch, lowrank))
    base = torch.randn(H, I, generator=g, dtype=torch.float64) if with_base else None
    return SparseLowRankLayer(H, I, experts, base)


def dense_forward(layer, x, idx, w):
    """Σ_k w_k W_down (silu(W_gate x) ⊙ W_up x) with every expert's matrices materialised in float64."""
    dense = {p: torch.stack([layer.dense_weight(e, p) for e in range(E)]) for p in PROJ_NAMES}
    gate = torch.einsum("eih,th->tei", dense["gate"], x)
    up = torch.einsum("eih,th->tei", dense["up"], x)
    y = torch.einsum("ehi,tei->teh", dense["down"], F.silu(gate) * up)  # every expert on every token
    chosen = y[torch.arange(x.shape[0])[:, None], idx]  # [T, K, H]
    return (w[..., None] * chosen).sum(1)


def routed_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return x, idx, torch.rand(T, K, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_forward_matches_dense_float64(with_base, seed):
    layer = random_layer(seed, with_base)
    x, idx, w = routed_inputs(10 + seed)
    out = layer.experts_module()(x, idx, w)
    torch.testing.assert_close(out, dense_forward(layer, x, idx, w), rtol=1e-10, atol=1e-10)


def test_pruned_channels_contribute_nothing():
    layer = random_layer(2, True)
    ex = layer.experts[0]
    kept = set(ex.sparse_channels.tolist()) | set(ex.lowrank_channels.tolist())
    pruned = [j for j in range(I) if j not in kept]
    assert pruned and not layer.dense_weight(0, "gate")[pruned].any()


def round_trip(layer, dtype=torch.float64):
    tensors = layer.to_tensors("m.layers.0.mlp.experts", PROJ_NAMES, dtype)
    spec = layer.spec(0, "m.layers.0.mlp.experts")
    spec.validate()
    return tensors, spec


def test_format_round_trip_preserves_every_part():
    layer = random_layer(3, True)
    tensors, spec = round_trip(layer)
    assert spec.sparse_channels == [3, 0, I, 0, 4]
    assert spec.ranks["up"] == [2, 1, 0, 0, 0]
    assert spec.shared_down_base and spec.to_json()["base_channels"] == I
    assert layer.num_params() == sum(t.numel() for n, t in tensors.items() if not n.endswith("channels"))
    assert spec.num_params() == layer.num_params()
    back = SparseLowRankLayer.from_tensors(spec, PROJ_NAMES, tensors.__getitem__)
    for name, tensor in layer.packed().items():
        torch.testing.assert_close(back.packed()[name], tensor, rtol=0, atol=0, msg=name)


def test_loader_rejects_bad_tensors_by_name():
    layer = random_layer(4, False)
    tensors, spec = round_trip(layer)
    prefix = "m.layers.0.mlp.experts"
    bad = dict(tensors)
    bad[unit_name(prefix, 0, "up_proj", "lowrank_v")] = torch.zeros(3, H, dtype=torch.float64)
    with pytest.raises(FormatError, match=r"experts\.0\.up_proj\.lowrank_v has shape"):
        SparseLowRankLayer.from_tensors(spec, PROJ_NAMES, bad.__getitem__)
    overlap = dict(tensors)
    sparse = overlap[unit_channels_name(prefix, 4, "sparse")]
    lowrank = overlap[unit_channels_name(prefix, 4, "lowrank")].clone()
    lowrank[0] = sparse[0]
    overlap[unit_channels_name(prefix, 4, "lowrank")] = lowrank.sort().values
    with pytest.raises(FormatError, match="both sparse and low-rank|sorted distinct"):
        SparseLowRankLayer.from_tensors(spec, PROJ_NAMES, overlap.__getitem__)


def test_spec_validation_refuses_inconsistent_sizes():
    layer = random_layer(5, False)
    _, spec = round_trip(layer)
    spec.ranks["gate"][0] = 6  # expert 0 has 5 low-rank channels
    with pytest.raises(FormatError, match=r"ranks\['gate'\]\[0\]"):
        spec.validate()
