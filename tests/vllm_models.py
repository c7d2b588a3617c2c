"""Tiny compressed checkpoints for the tests that start vLLM, the reference they must equal, and the vLLM runner.

vLLM never runs in the pytest process: :func:`run_vllm` hands a list of jobs to one tests/vllm_generate.py
subprocess, which imports vLLM once and starts each job's engine in turn (the lever that keeps the slow tests
within the suite's time budget: an engine start there costs seconds, a fresh process tens of seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_moe_compress.format import CompressionInfo
from vllm_moe_compress.offline.checkpoint_io import SafetensorsCheckpoint, copy_side_files
from vllm_moe_compress.offline.compress import CalibrationOptions, build_method, compress_checkpoint
from vllm_moe_compress.offline.loading import load_compressed_model
from vllm_moe_compress.format.schemes import SCHEME_LAYERS

from conftest import CALIBRATION_FILE, vllm_tiny_config, write_tiny_model

HERE = Path(__file__).resolve().parent
PROMPTS = [[17, 905, 33, 2048, 7, 311], [1200, 5, 88], list(range(100, 160))]
NEW_TOKENS = 8
LOGPROB_TOLERANCE = 2e-3  # float32 on both sides; vLLM's attention kernels differ from transformers' SDPA
VLLM_TIMEOUT_S = 1200

EVERY_SCHEME = [("whitened-svd", {}), ("rs", {}), ("rfid", {"residual_fraction": 0.03})]
"""One method per scheme: base_delta (no base), sparse_lowrank, basis_residual (hashed residual)."""


def compress(source: Path, out: Path, method: str = "d2", **options) -> Path:
    """``source`` compressed by ``method`` at ratio 0.05, float32 (D²-MoE: base_prune 0.2, a pruned base)."""
    calibration = CalibrationOptions(file=CALIBRATION_FILE, samples=8, seqlen=64, batch_size=4, fisher_samples=4)
    fast = {"d2": {"base_prune": 0.2}, "rfid": {"fit_steps": 5}, "mobe": {"fit_steps": 5}}.get(method, {})
    compress_checkpoint(source, out, build_method(method, **fast, **options), 0.05, calibration, dtype="float32",
                        progress=False)
    return out


def compress_for_vllm(family: str, root: Path, method: str = "d2", **options) -> Path:
    """A tiny random ``family`` model with attention shapes vLLM's CPU backend runs, compressed by ``method``."""
    source = write_tiny_model(vllm_tiny_config(family), root / family)
    return compress(source, root / f"{family}-{method}", method, **options)


def mixed_scheme_checkpoint(root: Path, parts: list[tuple[str, dict]], family: str = "qwen3_moe") -> Path:
    """One checkpoint whose MoE layer ``i`` is layer ``i`` of the model compressed by ``parts[i]`` (method, options).

    The format gives every layer its own ``scheme`` (docs/format.md §2), so one engine runs every scheme's op. Each
    part compresses the same source; non-expert tensors are copied bit for bit by the compressor, so they are
    taken from the first part. quantization_config is the first part's with ``layers`` replaced (its ratio and
    parameter counts, which no loader reads, then describe that part alone).
    """
    config = vllm_tiny_config(family)
    config.num_hidden_layers = len(parts)
    source = write_tiny_model(config, root / f"{family}-mixed-source")
    outs = [compress(source, root / f"{family}-mixed-part{i}-{method}", method, **options)
            for i, (method, options) in enumerate(parts)]
    full = json.loads((outs[0] / "config.json").read_text())
    qc = full["quantization_config"]
    qc["layers"] = {str(i): json.loads((out / "config.json").read_text())["quantization_config"]["layers"][str(i)]
                    for i, out in enumerate(outs)}
    prefixes = [qc["layers"][str(i)]["prefix"] + "." for i in range(len(parts))]
    first = SafetensorsCheckpoint(outs[0])
    tensors = {k: first.get(k) for k in first.keys() if not k.startswith(tuple(prefixes))}
    for out, prefix in zip(outs, prefixes):
        ckpt = SafetensorsCheckpoint(out)
        tensors.update({k: ckpt.get(k) for k in ckpt.keys() if k.startswith(prefix)})
    mixed = root / f"{family}-mixed"
    mixed.mkdir(parents=True)
    save_file(tensors, str(mixed / "model.safetensors"))
    (mixed / "config.json").write_text(json.dumps(full))
    copy_side_files(outs[0], mixed)
    return mixed


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


def reference(model_dir: Path, prompts: list[list[int]] = PROMPTS, new_tokens: int = NEW_TOKENS) -> list[dict]:
    """Greedy tokens and prompt logprobs of the reference loader (transformers + offline/schemes, float32)."""
    model = load_compressed_model(model_dir, torch.float32, dynamic_pruning=False)
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            tokens = model.generate(x, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
            logp = model(x).logits[0, :-1].log_softmax(-1).gather(1, x[0, 1:, None])[:, 0].tolist()
            out.append({"tokens": tokens, "prompt_logprobs": logp})
    return out


def job(model: Path, **options) -> dict:
    """One tests/vllm_generate.py job on PROMPTS; ``options``: eager, max_num_seqs, tp, cpu_mla."""
    return {"model": str(model), "prompts": PROMPTS, **options}


def run_vllm(jobs: list[dict], env: dict | None = None) -> list[dict]:
    """Each job's result (``outputs`` and ``quantization``, or ``error``), from one vLLM subprocess."""
    done = subprocess.run([sys.executable, str(HERE / "vllm_generate.py"), json.dumps(jobs)], capture_output=True,
                          text=True, timeout=VLLM_TIMEOUT_S, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    results = [json.loads(l[len("RESULT "):]) for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    assert done.returncode == 0 and len(results) == len(jobs), done.stderr[-4000:]
    return results


def outputs(result: dict) -> list[dict]:
    """A job's outputs; fails with the job's error if its engine did not run."""
    assert "error" not in result, result["error"]
    return result["outputs"]


def assert_same(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        assert max(abs(a - b) for a, b in zip(g["prompt_logprobs"], w["prompt_logprobs"], strict=True)) < LOGPROB_TOLERANCE
