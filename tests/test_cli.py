"""The moe-compress command line: the happy path on the bundled model and clear errors on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_moe_compress.offline.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "tiny-qwen3-moe-demo"
FAST = ["--calib-samples", "8", "--calib-seqlen", "64", "--fisher-samples", "4", "--no-progress"]


def leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


def test_compress_inspect_eval(tmp_path, capsys):
    out = tmp_path / "demo-d2"
    assert main(["compress", str(DEMO), "-o", str(out), "--method", "d2", "--ratio", "0.4", *FAST]) == 0
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    assert "layer 1 done; peak RSS" in (out / "compress.log").read_text()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "moe_compress" and qc["method"] == "d2" and abs(qc["achieved_ratio"] - 0.4) <= 0.005
    assert list(qc["method_options"].items())[:4] == [("merge", "fisher"), ("base_prune", 0.0),
                                                      ("static_prune_ratio", 0.0), ("trim_experts", 0)]
    assert list(qc["method_options"])[4:] == ["gate_up_ratio"]
    stats = json.loads((out / "moe_compress_stats.json").read_text())
    assert set(stats["layers"]) == {"0", "1"} and sum(stats["layers"]["0"]["routing_counts"]) == 8 * 64 * 2

    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "d2" and set(summary["layers"]) == {"0", "1"}

    text = tmp_path / "eval" / "brown" / "test.txt"
    text.parent.mkdir(parents=True)
    text.write_text((REPO / "offline" / "data" / "brown-calibration-sample.txt").read_text()[:20000])
    assert main(["eval-ppl", str(out), "--dataset", "brown", "--data-dir", str(tmp_path / "eval"),
                 "--seqlen", "256", "--max-tokens", "1024", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"ppl", "dataset", "tokens"} <= set(result) and result["tokens"] == 4 * 255 and result["ppl"] > 1
    assert result["dynamic_pruning"] is False  # as vllm serve runs it by default


def test_console_script_help():
    done = subprocess.run([sys.executable, "-m", "vllm_moe_compress.offline.cli", "compress", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--ratio" in done.stdout and "TOTAL model parameters" in done.stdout


@pytest.mark.parametrize("command, fails, returncode", [("eval-zeroshot", False, 0), ("eval-zeroshot", True, 1),
                                                       ("inspect", False, -6)])
def test_entry_ends_in_process_engine_commands_without_finalisation(command, fails, returncode):
    """eval-zeroshot ends with os._exit once main returns or raises (its output flushed, a traceback and status 1 for
    an exception); other commands exit normally. The atexit abort stands for the vLLM client threads whose
    destruction at interpreter exit aborted complete runs: where finalisation runs, it kills the child (-6)."""
    child = f"""
import atexit, os, sys
from vllm_moe_compress.offline import cli
atexit.register(os.abort)
def main(argv):
    print("result written", argv)
    if {fails}:
        raise RuntimeError("engine failed")
    return 0
cli.main = main
sys.argv = ["moe-compress", "-v", "{command}", "--flag"]
cli.entry()
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert done.returncode == returncode, done.stderr[-2000:]
    if returncode >= 0:
        assert done.stdout == f"result written ['-v', '{command}', '--flag']\n"
        assert ("RuntimeError: engine failed" in done.stderr) == fails


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2"])
def test_ratio_outside_open_interval_is_rejected(tmp_path, ratio, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", str(DEMO), "-o", str(tmp_path / "x"), "--method", "svd", "--ratio", ratio])
    assert exc.value.code == 2 and "strictly between 0 and 1" in capsys.readouterr().err
    assert leftovers(tmp_path, "x") == []


def bad_run(tmp_path, capsys, model, *extra):
    code = main(["compress", str(model), "-o", str(tmp_path / "out"), "--method", "d2", "--ratio", "0.4", *FAST, *extra])
    assert code == 2
    assert leftovers(tmp_path, "out") == []
    return capsys.readouterr().err


def test_missing_model_dir(tmp_path, capsys):
    assert "does not exist" in bad_run(tmp_path, capsys, tmp_path / "nope")


def test_missing_safetensors_and_pickle_refused(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((DEMO / "config.json").read_text())
    (model / "pytorch_model.bin").write_bytes(b"not loaded")
    err = bad_run(tmp_path, capsys, model)
    assert "no *.safetensors" in err and "pickle" in err


def test_corrupt_safetensors(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for f in DEMO.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    (model / "model.safetensors").write_bytes(b"\x00" * 100)
    assert "not a readable safetensors file" in bad_run(tmp_path, capsys, model)


def test_unreachable_ratio_names_range(tmp_path, capsys):
    err = bad_run(tmp_path, capsys, DEMO, "--ratio", "0.95")
    assert "reachable ratios are [" in err


def test_calibration_text_too_short_or_not_utf8(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    assert "calibration text too short" in bad_run(tmp_path, capsys, DEMO, "--calib-file", str(short))
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 ".encode("latin-1") * 1000)
    assert "not UTF-8" in bad_run(tmp_path, capsys, DEMO, "--calib-file", str(binary))
    assert "does not exist" in bad_run(tmp_path, capsys, DEMO, "--calib-file", str(tmp_path / "missing.txt"))


def test_existing_output_needs_overwrite(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code = main(["compress", str(DEMO), "-o", str(tmp_path / "out"), "--method", "svd", "--ratio", "0.4", *FAST])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    from vllm_moe_compress.offline import compress

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(compress.ShardedWriter, "finish", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["compress", str(DEMO), "-o", str(tmp_path / "out"), "--method", "svd", "--ratio", "0.4", *FAST])
    (work,) = leftovers(tmp_path, "out")  # only the work directory of finished layers, kept for a resume
    assert work.name.startswith(".out.work-") and not list(work.glob("output.partial-*"))
