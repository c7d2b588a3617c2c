"""``moe-compress compress`` on bad input: a clear message, exit code 2, and nothing written.

Complements tests/test_cli.py (missing model, pickle-only model, zeroed safetensors, unreachable ratio,
calibration text too short / not UTF-8 / missing, existing output). A disk that fills up mid-run is the one
failure that keeps something: the work directory with the layers finished so far, which the next run resumes.
"""

from __future__ import annotations

import errno
import json
import shutil
import struct
from pathlib import Path

import pytest
from safetensors import SafetensorError

from vllm_moe_compress.offline import checkpoint_io, workdir
from vllm_moe_compress.offline.cli import main

from conftest import tiny_config, write_tiny_model
from test_cli import DEMO, FAST, bad_run, leftovers


def demo_copy(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(DEMO, model)
    return model


def rewrite_header(path: Path, edit) -> None:
    """Replace the 8-byte length + JSON header of a safetensors file with ``edit(length, header bytes)``."""
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    path.write_bytes(edit(length, data[8 : 8 + length]) + data[8 + length :])


def test_truncated_safetensors(tmp_path, capsys):
    model = demo_copy(tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = bad_run(tmp_path, capsys, model)
    assert f"{weights} is not a readable safetensors file" in err and "not fully covered" in err


def test_safetensors_header_not_json(tmp_path, capsys):
    model = demo_copy(tmp_path)
    rewrite_header(model / "model.safetensors", lambda n, header: struct.pack("<Q", n) + b"[" + header[1:])
    err = bad_run(tmp_path, capsys, model)
    assert "model.safetensors is not a readable safetensors file" in err and "invalid JSON in header" in err


def test_safetensors_header_longer_than_file(tmp_path, capsys):
    model = demo_copy(tmp_path)
    rewrite_header(model / "model.safetensors", lambda n, header: struct.pack("<Q", 10**12) + header)
    err = bad_run(tmp_path, capsys, model)
    assert "model.safetensors is not a readable safetensors file" in err


def test_index_names_a_missing_shard(tmp_path, capsys):
    model = demo_copy(tmp_path)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    err = bad_run(tmp_path, capsys, model)
    assert "tensor lm_head.weight not found" in err
    assert "lists it in model-00002-of-00002.safetensors, and model-00002-of-00002.safetensors is missing" in err


def test_config_not_json(tmp_path, capsys):
    model = demo_copy(tmp_path)
    (model / "config.json").write_text('{"model_type": "qwen3_moe",')
    assert "config.json is not valid JSON" in bad_run(tmp_path, capsys, model)


def test_config_without_moe_layers(tmp_path, capsys):
    config = tiny_config("qwen3_moe")
    config.mlp_only_layers = list(range(config.num_hidden_layers))  # every layer a dense MLP
    model = write_tiny_model(config, tmp_path / "dense-qwen3-moe")
    err = bad_run(tmp_path, capsys, model)
    assert "no routed-expert tensors" in err and "no MoE layers to compress" in err


def test_unsupported_architecture(tmp_path, capsys):
    model = demo_copy(tmp_path)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (model / "config.json").write_text(json.dumps(config))
    err = bad_run(tmp_path, capsys, model)
    assert "unsupported architecture LlamaForCausalLM" in err and "Qwen3MoeForCausalLM, " in err


@pytest.mark.parametrize("method, ratio", [("d2", "0.9"), ("svd", "0.97")])
def test_unreachable_ratio_gives_the_range(tmp_path, capsys, method, ratio):
    err = bad_run(tmp_path, capsys, DEMO, "--method", method, "--ratio", ratio)
    assert f"method {method} cannot reach ratio {float(ratio):.4f}" in err and "reachable ratios are [0.0000, 0." in err


def test_calibration_shorter_than_one_window(tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("word " * 40)  # fewer tokens than --calib-seqlen 64 + 1
    assert "calibration text too short" in bad_run(tmp_path, capsys, DEMO, "--calib-file", str(text))


def enospc(path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def fill_disk_while_saving_output(monkeypatch) -> None:
    def full(tensors, filename, metadata=None):  # what safetensors' writer raises on a full disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint_io, "save_file", full)


def fill_disk_while_journaling_layer_1(monkeypatch) -> None:
    write = workdir.atomic_write

    def full_at_layer_1(path, data):
        if path.name == "layer-1.safetensors":
            raise enospc(path)
        write(path, data)

    monkeypatch.setattr(workdir, "atomic_write", full_at_layer_1)


@pytest.mark.parametrize("fill_disk, resumed", [
    (fill_disk_while_saving_output, "resuming: all 2 MoE layers already compressed"),
    (fill_disk_while_journaling_layer_1, "resuming from layer 1: 1 of 2 MoE layers already compressed"),
])
def test_disk_full_leaves_no_output_then_resumes(tmp_path, capsys, monkeypatch, fill_disk, resumed):
    out = tmp_path / "out"
    args = ["compress", str(DEMO), "-o", str(out), "--method", "svd", "--ratio", "0.4", *FAST,
            "--calib-samples", "2", "--calib-seqlen", "32"]  # two full runs: keep them small
    fill_disk(monkeypatch)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: disk full (no space left on device) while writing" in err and "run the same command again" in err
    (work,) = leftovers(tmp_path, "out")  # no output directory: only the work directory, named in the message
    assert work.name.startswith(".out.work-") and str(work) in err
    assert not list(work.glob("output.partial-*")) and not list(work.glob(".*.tmp"))

    monkeypatch.undo()  # space freed: the same command resumes and completes
    assert main(args) == 0
    assert resumed in (out / "compress.log").read_text()
    assert leftovers(tmp_path, "out") == [out]
