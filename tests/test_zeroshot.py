"""Zero-shot evaluation: the local task configurations load in lm-eval as the standard tasks do, and the whole
path (lm-eval's vLLM backend, quantization=moe_compress, CPU) runs on a tiny compressed model with --limit 5."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_moe_compress.offline.compress import CalibrationOptions, build_method, compress_checkpoint
from vllm_moe_compress.offline.evaluation.zeroshot import TASKS, local_task_config, task_override

from conftest import CALIBRATION_FILE, vllm_tiny_config, write_tiny_model

DATA = Path(os.environ.get("MOE_COMPRESS_DATA", "/nonexistent"))
needs_data = pytest.mark.skipif(not (DATA / "SOURCES.md").is_file(), reason="shared data directory not found")


def raw_rows(path: Path) -> list[dict]:
    if path.suffix == ".json":
        return json.loads(path.read_text())
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@needs_data
def test_local_tasks_match_lm_eval_standard_tasks():
    """Each local task scores the standard split with lm-eval's own prompt and choices, over every local row."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    for task_name in TASKS:
        config = local_task_config(task_name, DATA, manager)
        task = manager.load([config])["tasks"][task_name]
        scored_split = "test" if task.has_test_docs() else "validation"
        files = task_override(task_name)["dataset_kwargs"]["data_files"]
        rows = raw_rows(DATA / files[scored_split])
        docs = list(task.eval_docs)
        assert len(docs) == len(rows), task_name
        for doc, row in zip(docs[:50], rows):
            choices = task.doc_to_choice(doc)
            if task_name == "winogrande":  # partial scoring: the choices are the contexts, the text is the gold index
                assert task.doc_to_text(doc) == int(row["answer"]) - 1 and len(choices) == 2
                continue
            target = task.doc_to_target(doc)
            assert len(choices) >= 2 and isinstance(target, int) and 0 <= target < len(choices), task_name
            assert task.doc_to_text(doc), task_name
        if task_name == "boolq":  # the one field the local copy names differently (HF boolq `answer`, bool)
            assert [task.doc_to_target(d) for d in docs] == [int(r["answer"]) for r in rows]
            assert task.doc_to_choice(docs[0]) == ["no", "yes"]
        if task_name == "arc_easy":
            assert [task.doc_to_target(d) for d in docs[:50]] == [
                r["choices"]["label"].index(r["answerKey"]) for r in rows[:50]]


def test_unknown_local_task_names_the_known_ones():
    with pytest.raises(ValueError, match="local tasks: .*arc_easy"):
        task_override("lambada_openai")


@pytest.mark.slow
@needs_data
def test_eval_zeroshot_cli_on_tiny_compressed_model(tmp_path):
    source = write_tiny_model(vllm_tiny_config("qwen3_moe"), tmp_path / "tiny")
    model = tmp_path / "tiny-d2"
    calibration = CalibrationOptions(file=CALIBRATION_FILE, samples=8, seqlen=64, batch_size=4, fisher_samples=4)
    compress_checkpoint(source, model, build_method("d2"), 0.05, calibration, dtype="float32", progress=False)
    out = tmp_path / "zs.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "vllm_moe_compress.offline.cli", "eval-zeroshot", str(model), "--tasks", "arc_easy,boolq", "--limit", "5",
         "--out", str(out), "--data-dir", str(DATA)],
        capture_output=True, text=True, timeout=1800, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["model_args"]["quantization"] == "moe_compress" and result["limit"] == 5
    assert result["source"] == "local"
    assert set(result["tasks"]) == {"arc_easy", "boolq"}
    for metrics in result["tasks"].values():
        assert metrics["samples"] == 5 and 0.0 <= metrics["acc"] <= 1.0
    assert result["tasks"]["arc_easy"]["samples_total"] == 2376
    assert "arc_easy" in done.stdout and "wrote" in done.stdout
