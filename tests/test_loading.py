"""The reference loader refuses malformed compressed checkpoints, naming the tensor or field."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_moe_compress.format import FormatError
from vllm_moe_compress.offline.compress import CalibrationOptions, build_method, compress_checkpoint
from vllm_moe_compress.offline.loading import load_compressed_model

from conftest import CALIBRATION_FILE


@pytest.fixture(scope="module")
def compressed(tiny_moe, tmp_path_factory):
    out = tmp_path_factory.mktemp("loading") / "d2"
    calibration = CalibrationOptions(file=CALIBRATION_FILE, samples=4, seqlen=64, batch_size=4, fisher_samples=2)
    compress_checkpoint(tiny_moe("qwen3_moe"), out, build_method("d2", base_prune=0.2), 0.05, calibration,
                        dtype="bfloat16", progress=False)
    return out


def edited_copy(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    shard = next(dst.glob("model-*.safetensors"))
    if edit_tensors:
        tensors = load_file(shard)
        edit_tensors(tensors)
        save_file(tensors, shard)
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config["quantization_config"])
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_good_checkpoint_loads(compressed):
    assert load_compressed_model(compressed) is not None


def test_stray_expert_tensor_is_refused(compressed, tmp_path):
    name = "model.layers.1.mlp.experts.99.gate_proj.delta_u"
    bad = edited_copy(compressed, tmp_path / "bad", lambda t: t.update({name: torch.zeros(32, 2, dtype=torch.bfloat16)}))
    with pytest.raises(FormatError, match=name.replace(".", r"\.")):
        load_compressed_model(bad)


def test_factor_dtype_must_match_config(compressed, tmp_path):
    name = "model.layers.0.mlp.experts.3.down_proj.delta_v"
    bad = edited_copy(compressed, tmp_path / "bad", lambda t: t.update({name: t[name].float()}))
    with pytest.raises(FormatError, match=name.replace(".", r"\.") + ".*float32"):
        load_compressed_model(bad)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.0.mlp.experts.2.up_proj.delta_v"), r"experts\.2\.up_proj\.delta_v not found"),
    (lambda t: t["model.layers.1.mlp.experts.0.gate_proj.delta_u"].fill_(float("nan")), r"experts\.0\.gate_proj\.delta_u contains NaN"),
    (lambda t: t.update({"model.layers.0.mlp.experts.base.channels": torch.flip(t["model.layers.0.mlp.experts.base.channels"], [0])}),
     r"base\.channels must hold sorted"),
])
def test_broken_tensors_are_named(compressed, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):  # FormatError or CheckpointError, both ValueErrors
        load_compressed_model(edited_copy(compressed, tmp_path / "bad", edit))


@pytest.mark.parametrize("edit, message", [
    (lambda q: q.update(format_version=2), "format_version"),
    (lambda q: q["layers"]["0"].update(scheme="mystery"), "mystery"),
    (lambda q: q["layers"]["1"]["ranks"]["down"].__setitem__(0, 10_000), r"ranks\['down'\]"),
    (lambda q: q.update(proj_names={"gate": "gate_proj"}), "proj_names"),
])
def test_broken_config_is_named(compressed, tmp_path, edit, message):
    with pytest.raises(FormatError, match=message):
        load_compressed_model(edited_copy(compressed, tmp_path / "bad", edit_config=edit))
