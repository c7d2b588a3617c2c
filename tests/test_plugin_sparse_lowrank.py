"""The vLLM plugin's ``sparse_lowrank`` scheme (RS-MoE), driven directly as test_plugin_loading.py does for base_delta.

One tiny Qwen3-MoE checkpoint is compressed with ``rs`` (float32) per module; its layers hold sparse,
low-rank and pruned units and a ridge down base.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from vllm_moe_compress.offline.compress import CalibrationOptions, build_method, compress_checkpoint
from vllm_moe_compress.format import CompressionInfo
from vllm_moe_compress.format.names import base_name, unit_channels_name, unit_name
from vllm_moe_compress.format.schemes.sparse_lowrank import SparseLowRankExperts, SparseLowRankLayer
from test_plugin_loading import (
    CALIBRATION_FILE, Checkpoint, dense_forward, load_layer, loaded_layer, make_config, make_layer, nbytes,
    plugin_forward, routings, torch_backend, write_variant,  # noqa: F401  (torch_backend: a fixture)
)

LAYERS = (0, 1)


@pytest.fixture(scope="module")
def ckpt(tiny_moe, tmp_path_factory) -> Checkpoint:
    out = tmp_path_factory.mktemp("plugin-rs") / "qwen3_moe-rs"
    calibration = CalibrationOptions(file=CALIBRATION_FILE, samples=8, seqlen=64, batch_size=4)
    info = compress_checkpoint(tiny_moe("qwen3_moe"), out, build_method("rs", lowrank_share=0.6), 0.1, calibration,
                               dtype="float32", progress=False)
    assert abs(info.achieved_ratio - 0.1) <= 0.005
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    info = CompressionInfo.from_config(copy.deepcopy(qc))
    for spec in info.layers:  # what the tests rely on: every kind of unit present, and a base
        assert spec.scheme == "sparse_lowrank" and spec.shared_down_base
        kept = [s + m for s, m in zip(spec.sparse_channels, spec.lowrank_channels)]
        assert sum(spec.sparse_channels) > 0 and sum(spec.lowrank_channels) > 0
        assert sum(kept) < spec.num_experts * spec.intermediate_size
    return Checkpoint(out, qc, info, tensors)


def reference_layer(ckpt: Checkpoint, layer: int) -> SparseLowRankLayer:
    return SparseLowRankLayer.from_tensors(ckpt.spec(layer), ckpt.info.proj_names, ckpt.tensors.__getitem__)


@pytest.mark.parametrize("layer", LAYERS)
def test_apply_equals_reference_and_dense_math(ckpt, layer):
    method, module = loaded_layer(make_config(ckpt.qc, ckpt.dir), ckpt, layer)
    compressed = reference_layer(ckpt, layer)
    reference = SparseLowRankExperts(compressed).float()
    for x, ids, weights in routings(ckpt.spec(layer), seed=layer):
        got = plugin_forward(method, module, x, ids, weights)
        torch.testing.assert_close(got, reference(x, ids, weights), atol=1e-5, rtol=0)
        assert (got.double() - dense_forward(compressed, x, ids, weights)).abs().max() < 1e-4
        assert got.abs().max() > 1e-2


@pytest.mark.parametrize("layer", LAYERS)
def test_tensor_parallel_ranks_sum_to_full_output(ckpt, layer, torch_backend):
    tp = 2
    cfg = make_config(ckpt.qc, ckpt.dir)
    spec = ckpt.spec(layer)
    full_method, full = loaded_layer(cfg, ckpt, layer)
    ranks = [loaded_layer(cfg, ckpt, layer, tp_rank=t, tp_size=tp) for t in range(tp)]
    for name in ("w13_sparse", "w2_sparse", "w13_lowrank_u", "w2_lowrank_v", "w2_base"):
        assert sum(nbytes(getattr(m, name)) for _, m in ranks) == nbytes(getattr(full, name)), name
        assert all(0 < getattr(m, name).numel() < getattr(full, name).numel() for _, m in ranks), name
    for name in ("w13_lowrank_v", "w2_lowrank_u"):
        assert all(torch.equal(getattr(m, name), getattr(full, name)) for _, m in ranks), name
    for x, ids, weights in routings(spec, seed=10 + layer):
        want = plugin_forward(full_method, full, x, ids, weights)
        got = sum(plugin_forward(method, module, x, ids, weights) for method, module in ranks)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def first_expert_with(spec, kind: str) -> int:
    return next(e for e, n in enumerate(spec.unit_counts(kind)) if n and spec.ranks["gate"][e])


@pytest.mark.parametrize("part, how", [("sparse", "missing"), ("lowrank_u", "missing"), ("lowrank_v", "shape"),
                                       ("sparse", "nan"), ("base", "missing")])
def test_bad_tensor_error_names_it(ckpt, part, how):
    spec = ckpt.spec(0)
    e = first_expert_with(spec, "lowrank" if part.startswith("lowrank") else "sparse")
    name = base_name(spec.prefix, "down_proj") if part == "base" else unit_name(spec.prefix, e, "up_proj", part)
    tensors = ckpt.layer_tensors(0)
    if how == "missing":
        del tensors[name]
    elif how == "shape":
        tensors[name] = tensors[name][:, :-1]
    else:
        tensors[name] = tensors[name].clone()
        tensors[name][0, 0] = float("nan")
    method, module = make_layer(make_config(ckpt.qc, ckpt.dir), 0)
    with pytest.raises(ValueError, match=f"tensor {name.replace('.', '[.]')} "):
        load_layer(method, module, tensors)
        method.process_weights_after_loading(module)


def test_overlapping_unit_channels_are_rejected_at_start_up(ckpt, tmp_path):
    spec = ckpt.spec(0)
    e = next(e for e in range(spec.num_experts)
             if spec.sparse_channels[e] and spec.lowrank_channels[e])
    sparse = ckpt.tensors[unit_channels_name(spec.prefix, e, "sparse")]
    lowrank = ckpt.tensors[unit_channels_name(spec.prefix, e, "lowrank")]
    clash = torch.cat([lowrank[lowrank != sparse[0]][: len(lowrank) - 1], sparse[:1]]).sort().values
    tensors = dict(ckpt.tensors)
    tensors[unit_channels_name(spec.prefix, e, "lowrank")] = clash.to(torch.int32)
    with pytest.raises(ValueError, match="both sparse and low-rank"):
        make_config(ckpt.qc, write_variant(ckpt, tmp_path, tensors))
