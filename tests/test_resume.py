"""Resumable compression: SIGKILLed at several points and started again, the result is byte-identical.

One uninterrupted in-process run is the reference. A chain of subprocess runs of the same command is
killed (SIGKILL, through offline/workdir.py's fault-injection hook) mid-write of layer 0's tensors, right
after layer 0 is committed, and after the output is assembled but before its rename; each next run resumes
from what the last one left, and the last run completes. Every output file must equal the reference
byte for byte, except compress.log (timestamps) and moe_compress_stats.json, whose informational keys
(wall time, peak RSS, per-layer times, whether the run resumed) may differ.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from vllm_moe_compress.offline.compress import CalibrationOptions, build_method, compress_checkpoint
from vllm_moe_compress.offline.workdir import CRASH_ENV, WorkDir, run_arguments, run_key

from conftest import CALIBRATION_FILE, REPO

ARGS = ["--method", "d2", "--ratio", "0.05", "--calib-samples", "8", "--calib-seqlen", "64",
        "--calib-batch-size", "4", "--fisher-samples", "4", "--seed", "3", "--dtype", "float32", "--no-progress"]
INFORMATIONAL_STATS = ("wall_time_s", "peak_rss_bytes", "layer_seconds", "resumed")


def cli_run(model: Path, out: Path, crash_at: str | None, args: list[str] = ARGS) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([sys.executable, "-m", "vllm_moe_compress.offline.cli", "compress", str(model), "-o", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=600)


def work_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.work-*"))


def assert_same_checkpoint(got: Path, want: Path) -> None:
    names = sorted(p.name for p in want.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    assert any(n.endswith(".safetensors") for n in names)
    for name in names:
        if name == "compress.log":
            continue
        a, b = (got / name).read_bytes(), (want / name).read_bytes()
        if name == "moe_compress_stats.json":
            a, b = ({k: v for k, v in json.loads(x).items() if k not in INFORMATIONAL_STATS} for x in (a, b))
        assert a == b, f"{name} differs"


@pytest.fixture(scope="module")
def reference(tiny_moe, tmp_path_factory) -> Path:
    """The uninterrupted run (in-process) with the arguments of ARGS."""
    out = tmp_path_factory.mktemp("resume-ref") / "ref"
    calibration = CalibrationOptions(file=CALIBRATION_FILE, samples=8, seqlen=64, seed=3, batch_size=4,
                                     fisher_samples=4)
    compress_checkpoint(tiny_moe("qwen3_moe"), out, build_method("d2"), 0.05, calibration, dtype="float32",
                        progress=False)
    assert work_dirs(out) == []  # removed after success
    return out


def test_killed_runs_resume_to_identical_checkpoint(tiny_moe, reference, tmp_path):
    model, out = tiny_moe("qwen3_moe"), tmp_path / "out"

    # 1. killed half-way through writing layer 0's tensors: Fisher cached, layer 0 not finished
    run = cli_run(model, out, "write:layer-0.safetensors")
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert not out.exists()
    (work,) = work_dirs(out)
    assert (work / "fisher.safetensors").is_file() and not (work / "layer-0.json").exists()
    assert list(work.glob(".layer-0.safetensors.*.tmp"))  # the half-written file, never renamed

    # 2. killed right after layer 0 is committed
    run = cli_run(model, out, "committed:0")
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert "reusing the Fisher estimate" in run.stderr and "resuming from layer" not in run.stderr
    assert not out.exists() and (work / "layer-0.json").is_file() and (work / "hidden-0.safetensors").is_file()

    # 3. resumes at layer 1, assembles the output, killed before the final rename
    run = cli_run(model, out, "assembled")
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert "resuming from layer 1: 1 of 2 MoE layers already compressed" in run.stderr
    assert not out.exists() and work_dirs(out) == [work] and list(work.glob("output.partial-*"))

    # 4. all layers finished: only the assembly is redone
    run = cli_run(model, out, None)
    assert run.returncode == 0, run.stderr
    assert "resuming: all 2 MoE layers already compressed" in run.stderr
    assert work_dirs(out) == []
    assert json.loads((out / "moe_compress_stats.json").read_text())["resumed"] is True
    log = (out / "compress.log").read_text()
    assert log.count("method d2") == 4  # the log of every attempt is kept
    assert_same_checkpoint(out, reference)


@pytest.mark.parametrize("method", [
    # MI layer budgets: journaled once, read back on resume (and recorded per layer as keep_fraction)
    ["--method", "rs", "--rs-mine-steps", "20"],
    ["--method", "rfid", "--fit-steps", "10"],
])
def test_rs_and_rfid_resume_to_identical_checkpoint(tiny_moe, tmp_path, method):
    model = tiny_moe("qwen3_moe")
    args = [*method, *ARGS[ARGS.index("--ratio"):]]
    run = cli_run(model, tmp_path / "ref", None, args)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "out"
    for crash_at in ("committed:0", "assembled"):
        run = cli_run(model, out, crash_at, args)
        assert run.returncode == -signal.SIGKILL, run.stderr
    run = cli_run(model, out, None, args)
    assert run.returncode == 0, run.stderr
    assert "resuming: all 2 MoE layers already compressed" in run.stderr
    assert_same_checkpoint(out, tmp_path / "ref")
    if method[1] == "rs":
        def keep(path):
            layers = json.loads((path / "moe_compress_stats.json").read_text())["layers"]
            return [layers[layer]["keep_fraction"] for layer in ("0", "1")]
        assert keep(out) == keep(tmp_path / "ref")


def test_different_arguments_never_share_work(tiny_moe, tmp_path):
    model = tiny_moe("qwen3_moe")
    calibration = CalibrationOptions(file=CALIBRATION_FILE, samples=8, seqlen=64)
    base = run_arguments(model, build_method("d2"), 0.05, calibration, "bfloat16")
    other_text = tmp_path / "calib.txt"
    other_text.write_text(CALIBRATION_FILE.read_text() + " more")
    variants = [
        run_arguments(model, build_method("d2"), 0.06, calibration, "bfloat16"),
        run_arguments(model, build_method("svd"), 0.05, calibration, "bfloat16"),
        run_arguments(model, build_method("d2", merge="mean"), 0.05, calibration, "bfloat16"),
        run_arguments(model, build_method("d2", base_prune=0.2), 0.05, calibration, "bfloat16"),
        run_arguments(model, build_method("d2"), 0.05, calibration, "float32"),
        run_arguments(model, build_method("d2"), 0.05, replace(calibration, seed=1), "bfloat16"),
        run_arguments(model, build_method("d2"), 0.05, replace(calibration, samples=9), "bfloat16"),
        run_arguments(model, build_method("d2"), 0.05, replace(calibration, fisher_labels="empirical"), "bfloat16"),
        run_arguments(model, build_method("d2"), 0.05, replace(calibration, file=other_text), "bfloat16"),
        run_arguments(tiny_moe("qwen3_moe", seed=1), build_method("d2"), 0.05, calibration, "bfloat16"),
    ]
    keys = {run_key(base)} | {run_key(v) for v in variants}
    assert len(keys) == 1 + len(variants)
    assert run_key(run_arguments(model, build_method("d2"), 0.05, calibration, "bfloat16")) == run_key(base)


def test_second_run_with_same_arguments_is_locked_out(tmp_path):
    arguments = {"any": "thing"}
    with WorkDir(tmp_path / "out", arguments):
        with pytest.raises(RuntimeError, match="another moe-compress run with the same arguments"):
            WorkDir(tmp_path / "out", arguments).__enter__()
