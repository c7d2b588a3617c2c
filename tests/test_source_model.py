"""The streamed source model (offline/source_model.py) against transformers' own whole-model loading."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors import safe_open

from vllm_moe_compress.offline.calibration import forward_layerwise
from vllm_moe_compress.offline.checkpoint_io import CheckpointError
from vllm_moe_compress.offline.compress import CalibrationOptions, build_method, compress_checkpoint
from vllm_moe_compress.offline.methods import METHODS
from vllm_moe_compress.offline.methods.base import expert_weights
from vllm_moe_compress.offline.source_model import StreamedModel, stack_experts

from conftest import CALIBRATION_FILE, FAMILIES, tiny_config, write_tiny_model


def loaded(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_layers_equal_the_loaded_model(tiny_moe, family):
    path = tiny_moe(family)
    model, source = loaded(path), StreamedModel(path)
    state = model.state_dict()
    for index in range(source.num_layers):
        for name, tensor in source.build_layer(index).state_dict().items():
            assert torch.equal(tensor, state[f"model.layers.{index}.{name}"]), name
    outer = {n: t for n, t in source.model.state_dict().items() if not n.startswith("model.layers.")}
    assert outer and all(torch.equal(t, state[n]) for n, t in outer.items())
    assert all(p.is_meta for p in source.model.model.layers.parameters())  # nothing left materialised
    for layer in (i for i in range(source.num_layers) if hasattr(model.model.layers[i].mlp, "experts")):
        got, want = source.expert_weights(layer), expert_weights(model.model.layers[layer].mlp.experts)
        assert all(torch.equal(stack_experts(got[p], torch.float64), want[p]) for p in want)
        assert all(got[p].shape == want[p].shape and torch.equal(got[p][1], want[p][1]) for p in want)

    # the layer-streamed forward reproduces the whole model's hidden states (different batching: fp32 rounding)
    ids = torch.randint(0, 4096, (3, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    got = {}
    forward_layerwise(source, ids, 2, lambda i, h: got.setdefault(i, torch.cat(h)), progress=False)
    for index in range(source.num_layers - 1):  # the last entry of hidden_states is after the final norm
        torch.testing.assert_close(got[index], want[index + 1], rtol=1e-4, atol=1e-5)
    last = source.logits(got[source.num_layers - 1])
    torch.testing.assert_close(last, model(input_ids=ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)


def test_missing_layer_tensor_is_a_clear_error(tiny_moe, tmp_path):
    source = StreamedModel(tiny_moe("qwen3_moe"))
    name = "model.layers.1.self_attn.q_proj.weight"
    del source._keys[name]
    with pytest.raises(CheckpointError, match=f"tensor for {name} missing"):
        source.build_layer(1)


@pytest.fixture(scope="module")
def deep_moe(tmp_path_factory):
    """Three decoder layers, 8 experts: every method's cross-layer step (RS's next layer, MI budgets) runs."""
    config = tiny_config("qwen3_moe")
    config.num_hidden_layers = 3
    return write_tiny_model(config, tmp_path_factory.mktemp("deep") / "model", seed=2)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_compresses_without_loading_the_whole_model(deep_moe, tmp_path, monkeypatch, method):
    def refuse(*args, **kwargs):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    options = {"fit_steps": 5} if method in ("mobe", "rfid") else {}
    calibration = CalibrationOptions(file=CALIBRATION_FILE, samples=4, seqlen=32, batch_size=2, fisher_samples=2)
    info = compress_checkpoint(deep_moe, tmp_path / "out", build_method(method, **options), 0.1, calibration,
                               dtype="float32", progress=False)
    assert len(info.layers) == 3 and abs(info.achieved_ratio - 0.1) <= 0.005
    with safe_open(str(next((tmp_path / "out").glob("*.safetensors"))), framework="pt") as f:
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
