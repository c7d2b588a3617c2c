"""The vLLM plugin against the reference forward: greedy tokens and prompt logprobs, every architecture.

Each vLLM run is a subprocess (tests/vllm_generate.py): vLLM spawns its engine and workers, and one
pytest process cannot host several engines. Dynamic base pruning is off on both sides (the plugin's
default), so outputs must not depend on batching.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safetensors.torch import save_file

from vllm_moe_compress.format import CompressionInfo
from vllm_moe_compress.offline.checkpoint_io import SafetensorsCheckpoint, copy_side_files
from vllm_moe_compress.offline.compress import CalibrationOptions, build_method, compress_checkpoint
from vllm_moe_compress.offline.loading import load_compressed_model
from vllm_moe_compress.offline.schemes import SCHEME_LAYERS

from conftest import CALIBRATION_FILE, FAMILIES, vllm_tiny_config, write_tiny_model

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
PROMPTS = [[17, 905, 33, 2048, 7, 311], [1200, 5, 88], list(range(100, 160))]
LOGPROB_TOLERANCE = 2e-3  # float32 on both sides; vLLM's attention kernels differ from transformers' SDPA


def compress_for_vllm(family: str, root: Path, method: str = "d2", **options) -> Path:
    source = write_tiny_model(vllm_tiny_config(family), root / family)
    out = root / f"{family}-{method}"
    calibration = CalibrationOptions(file=CALIBRATION_FILE, samples=8, seqlen=64, batch_size=4, fisher_samples=4)
    fast = {"d2": {"base_prune": 0.2}, "rfid": {"fit_steps": 5}, "mobe": {"fit_steps": 5}}.get(method, {})
    compress_checkpoint(source, out, build_method(method, **fast, **options), 0.05, calibration, dtype="float32",
                        progress=False)
    return out


def run_vllm(model: Path, *flags: str, env: dict | None = None) -> list[dict]:
    done = subprocess.run([sys.executable, str(HERE / "vllm_generate.py"), str(model), json.dumps(PROMPTS), *flags],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def reference(model_dir: Path) -> list[dict]:
    model = load_compressed_model(model_dir, torch.float32, dynamic_pruning=False)
    out = []
    with torch.no_grad():
        for ids in PROMPTS:
            x = torch.tensor([ids])
            tokens = model.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
            logp = model(x).logits[0, :-1].log_softmax(-1).gather(1, x[0, 1:, None])[:, 0].tolist()
            out.append({"tokens": tokens, "prompt_logprobs": logp})
    return out


def assert_same(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        assert max(abs(a - b) for a, b in zip(g["prompt_logprobs"], w["prompt_logprobs"], strict=True)) < LOGPROB_TOLERANCE


def materialize_dense(compressed: Path, out: Path) -> Path:
    """The compressed model as a plain checkpoint: every expert weight replaced by its dense reconstruction."""
    out.mkdir()
    config = json.loads((compressed / "config.json").read_text())
    info = CompressionInfo.from_config(config.pop("quantization_config"))
    ckpt = SafetensorsCheckpoint(compressed)
    tensors = {k: ckpt.get(k) for k in ckpt.keys() if not k.startswith(tuple(s.prefix + "." for s in info.layers))}
    for spec in info.layers:
        layer = SCHEME_LAYERS[spec.scheme].from_tensors(spec, info.proj_names, ckpt.get)
        for e in range(spec.num_experts):
            for proj, name in info.proj_names.items():
                tensors[f"{spec.prefix}.{e}.{name}.weight"] = layer.dense_weight(e, proj).float().contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    copy_side_files(compressed, out)
    return out


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "deepseek_v2"])
def test_greedy_equals_reference(family, tmp_path):
    model = compress_for_vllm(family, tmp_path)
    assert_same(run_vllm(model, "--eager"), reference(model))


def test_deepseek_equals_vllm_dense_reconstruction(tmp_path):
    """vLLM's DeepSeek-V2 differs from transformers' even uncompressed (MLA), so the oracle here is vLLM's
    own dense path on the materialised experts; one sequence at a time (batched MLA on CPU is not
    deterministic), reference MLA backend in float32."""
    model = compress_for_vllm("deepseek_v2", tmp_path)
    flags = ["--eager", "--max-num-seqs", "1", "--cpu-mla"]
    assert_same(run_vllm(model, *flags), run_vllm(materialize_dense(model, tmp_path / "dense"), *flags))


@pytest.mark.parametrize("method", ["whitened-svd", "rs"])
def test_compiled_mode_svd_baseline_and_rs(method, tmp_path):
    """vLLM's default CPU mode compiles the model (Dynamo fullgraph): the custom ops must hold there too
    (``rs`` writes the sparse_lowrank scheme, with its own op)."""
    model = compress_for_vllm("qwen3_moe", tmp_path, method=method)
    assert_same(run_vllm(model), reference(model))


@pytest.mark.parametrize("method,options,flags", [("rfid", {"residual_fraction": 0.03}, ()),
                                                  ("rfid", {"factorize_down": True, "residual_fraction": 0.03}, ("--eager",)),
                                                  ("mobe", {}, ("--eager",))], ids=["rfid-compiled", "rfid-down", "mobe"])
def test_basis_residual_greedy_equals_reference(method, options, flags, tmp_path):
    """RFID-MoE (hashed residual, dense or factorised down) and MoBE (mixed bases); the first in vLLM's default
    compiled mode (the C++ CPU op under Dynamo), the others eager."""
    model = compress_for_vllm("qwen3_moe", tmp_path, method, **options)
    assert_same(run_vllm(model, *flags), reference(model))


def test_tensor_parallel_2_equals_tp_1(tmp_path):
    """Compressed factors sharded on the intermediate dimension: TP=2 on the CPU backend (one core per rank)."""
    model = compress_for_vllm("mixtral", tmp_path)
    tp2 = run_vllm(model, "--eager", "--tp", "2",
                   env={"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    assert_same(tp2, run_vllm(model, "--eager"))
