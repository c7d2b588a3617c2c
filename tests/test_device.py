"""``compress --device``: cpu and auto (on a machine without a GPU) give the bytes of a run without the flag;
cuda without a visible GPU is refused before anything is written; on a GPU, a cuda run completes."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm_moe_compress.offline.cli import main

FAST = ["--calib-samples", "4", "--calib-seqlen", "32", "--no-progress", "--dtype", "float32"]


def compress(model: Path, calib_file: Path, out: Path, method: str, *extra: str) -> Path:
    assert main(["compress", str(model), "-o", str(out), "--method", method, "--ratio", "0.1",
                 "--calib-file", str(calib_file), *FAST, *extra]) == 0
    return out


def tensors(out: Path) -> dict[str, torch.Tensor]:
    found = {}
    for shard in sorted(out.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto is cuda here: its result is not the CPU's bytes")
@pytest.mark.parametrize("method, extra", [("whitened-svd", ()), ("rs", ()), ("rfid", ("--factorize-down",))])
def test_cpu_and_auto_write_the_bytes_of_a_run_without_the_flag(tiny_moe, calib_file, tmp_path, method, extra):
    """factorize_experts (whitened-svd), the moments path (rs) and a group-basis fit (rfid)."""
    model = tiny_moe("qwen3_moe")
    plain = compress(model, calib_file, tmp_path / "plain", method, *extra)
    expected = tensors(plain)
    for device in ("cpu", "auto"):
        out = compress(model, calib_file, tmp_path / device, method, *extra, "--device", device)
        assert (out / "config.json").read_bytes() == (plain / "config.json").read_bytes(), device
        got = tensors(out)
        assert list(got) == list(expected), device
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), (device, name)
        assert json.loads((out / "moe_compress_stats.json").read_text())["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_one_line_and_writes_nothing(tiny_moe, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compress", str(tiny_moe("qwen3_moe")), "-o", str(out), "--method", "svd", "--ratio", "0.1",
                 "--calib-file", str(calib_file), *FAST, "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("moe-compress compress: error: --device cuda: no CUDA GPU is visible"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method, extra", [("whitened-svd", ()), ("d2", ()), ("rs", ()),
                                           ("rfid", ("--factorize-down",)), ("mobe", ("--factorize-down",))])
def test_cuda_run_completes_and_records_its_device(tiny_moe, calib_file, tmp_path, method, extra):
    out = compress(tiny_moe("qwen3_moe"), calib_file, tmp_path / "cuda", method, *extra, "--device", "cuda")
    assert json.loads((out / "moe_compress_stats.json").read_text())["device"] == "cuda"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert abs(qc["achieved_ratio"] - 0.1) <= 0.005
