"""The vLLM plugin's ``basis_residual`` scheme driven directly (no engine): routing of every checkpoint tensor,
apply == reference forward at TP=1, TP=2 ranks summing to TP=1, and tensors rejected by name."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vllm_moe_compress.format import CompressionInfo
from vllm_moe_compress.format.names import coef_name, counts_name, eta_name
from vllm_moe_compress.moe_method import CompressedMoEMethod
from vllm_moe_compress.format.schemes.basis_residual import BasisResidualExperts

from test_plugin_loading import fake_moe, load_layer, make_config, route
from test_rfid import LAYER_KINDS, random_basis_layer

PREFIX = "model.layers.0.mlp.experts"
NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def checkpoint(tmp_path, mixed, down_factorized, residual):
    """A one-layer float32 checkpoint of a random basis_residual layer: (qc, directory, tensors, layer)."""
    layer = random_basis_layer(21, mixed, down_factorized, residual)
    tensors = layer.to_tensors(PREFIX, NAMES, torch.float32)
    info = CompressionInfo(method="rfid", target_ratio=0.5, achieved_ratio=0.5, expert_ratio=0.5, original_params=1,
                           compressed_params=1, dtype="float32", proj_names=NAMES, layers=[layer.spec(0, PREFIX)])
    save_file(tensors, str(tmp_path / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    return info.to_config(), tmp_path, tensors, layer


def make_layer(cfg, layer: int, tp_rank: int = 0, tp_size: int = 1):
    """Like test_plugin_loading.make_layer; a layer without index tensors has no entry in ``cfg.indices``."""
    spec = cfg.layers[layer]
    method = CompressedMoEMethod(fake_moe(tp_rank, tp_size), spec, cfg.info.proj_names, cfg.indices.get(layer, {}),
                                 0.0)
    module = torch.nn.Module()
    method.create_weights(module, spec.num_experts, spec.hidden_size, spec.intermediate_size // tp_size,
                          torch.float32)
    return method, module


def plugin_layer(qc, directory, tensors, tp_rank=0, tp_size=1):
    method, module = make_layer(make_config(qc, directory), 0, tp_rank, tp_size)
    load_layer(method, module, tensors)
    method.process_weights_after_loading(module)
    return method, module


def routing(seed: int, tokens: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 16, generator=g)
    ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(tokens)])
    return x, ids, torch.rand(tokens, 2, generator=g).softmax(dim=1)


@pytest.mark.parametrize("mixed,down_factorized,residual", LAYER_KINDS)
def test_apply_equals_reference_and_tp2_sums_to_tp1(tmp_path, mixed, down_factorized, residual):
    qc, directory, tensors, layer = checkpoint(tmp_path, mixed, down_factorized, residual)
    reference = BasisResidualExperts(layer).float()
    full = plugin_layer(qc, directory, tensors)
    ranks = [plugin_layer(qc, directory, tensors, t, 2) for t in range(2)]
    for seed, tokens in ((0, 1), (1, 7), (2, 40)):
        x, ids, w = routing(seed, tokens)
        got = full[0].apply(full[1], x, w, ids.to(torch.int32), None, None)
        torch.testing.assert_close(got, reference(x, ids, w), atol=1e-5, rtol=0)
        assert got.abs().max() > 1e-2
        tp2 = sum(m.apply(mod, x, w, ids.to(torch.int32), None, None) for m, mod in ranks)
        torch.testing.assert_close(tp2, got, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mixed,down_factorized,residual", LAYER_KINDS)
def test_every_tensor_reaches_a_parameter_once(tmp_path, mixed, down_factorized, residual):
    qc, _, tensors, _ = checkpoint(tmp_path, mixed, down_factorized, residual)
    targets = {}
    for name in tensors:
        target = route(name, 6)
        if target is None:
            assert name == counts_name(PREFIX)
            continue
        assert target not in targets.values(), name
        targets[name] = target
    method, _ = make_layer(make_config(qc, tmp_path), 0)
    assert {param for param, _, _ in targets.values()} == set(method.scheme.shapes)


def corrupt(tensors, name, value):
    out = dict(tensors)
    if value is None:
        del out[name]
    else:
        out[name] = value
    return out


def test_bad_tensors_are_rejected_by_name(tmp_path):
    qc, directory, tensors, _ = checkpoint(tmp_path, False, True, 20)
    coef, eta = coef_name(PREFIX, 4, "up_proj"), eta_name(PREFIX, 1, "down_proj")
    nan = tensors[eta].clone()
    nan[3] = float("nan")
    cases = [(corrupt(tensors, coef, tensors[coef][:, :-1]), coef), (corrupt(tensors, eta, nan), eta),
             (corrupt(tensors, coef, None), coef), (corrupt(tensors, eta, None), eta)]
    for bad, name in cases:
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            plugin_layer(qc, directory, bad)


def test_counts_that_do_not_match_the_seed_are_rejected(tmp_path):
    qc, directory, tensors, _ = checkpoint(tmp_path, False, False, 20)
    save_file(corrupt(tensors, counts_name(PREFIX), tensors[counts_name(PREFIX)].roll(1)),
              str(directory / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"residual\.counts"):
        make_config(qc, directory)
