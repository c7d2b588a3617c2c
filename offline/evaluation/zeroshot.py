"""Zero-shot accuracy through lm-evaluation-harness with its vLLM backend (``moe-compress eval-zeroshot``).

The papers (D²-MoE Tab. 2, RS-MoE, RFID-MoE) report lm-eval zero-shot accuracy on ARC-e, ARC-c, HellaSwag,
PIQA, WinoGrande, OpenBookQA, MathQA and BoolQ. Scoring is lm-eval's own (log-likelihood of each choice);
nothing here re-implements it. Compressed checkpoints run through vLLM with ``quantization=moe_compress``
(this repository's plugin), dense ones as they are.

Task sources (``--tasks-source``):

- ``local`` (default): lm-eval's standard task configuration (prompt, choices, metrics, split) with the data
  source swapped for the local copies in the shared data directory. The swap is described by the override
  YAML files in ``offline/evaluation/eval_tasks/`` (package data): ``dataset_path: json`` and ``data_files`` relative to
  the data directory, plus the few field mappings a local file needs (BoolQ's gold field). Nothing touches a hub:
  ``HF_HUB_OFFLINE`` and ``HF_DATASETS_OFFLINE`` are set.
- ``hub``: the standard task names unchanged (lm-eval downloads the datasets itself).

vLLM runs inside this process through lm-eval's ``LLM`` object; vLLM starts its engine core in a spawned
subprocess, so the caller's entry point must be guarded by ``if __name__ == "__main__"`` (the ``moe-compress``
script and ``python -m vllm_moe_compress.offline.cli`` are). On CPU, ``VLLM_CPU_KVCACHE_SPACE`` (GiB) defaults to 1 here.
The engine is shut down explicitly once the scores are in (``_shut_down``), not left to the interpreter's exit. The
engine client's native threads still aborted 1 complete run of 15 (in a loop) during the interpreter's finalisation
(SIGABRT, "terminate called without an active exception"), so the command line ends eval-zeroshot without it
(``cli.entry``); a caller that runs ``evaluate_zeroshot`` in its own process meets the same teardown.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import yaml

from vllm_moe_compress.format import QUANT_METHOD

from ..checkpoint_io import read_config
from ..choices import TASK_SOURCES, ZEROSHOT_TASKS as TASKS

OVERRIDES_DIR = Path(__file__).parent / "eval_tasks"
DEFAULT_KVCACHE_GIB = "1"


@dataclass
class ZeroShotOptions:
    tasks: tuple[str, ...] = TASKS
    limit: int | None = None  # first N documents per task (lm-eval --limit); None = all
    source: str = "local"
    data_dir: Path | None = None  # required for source "local"
    dtype: str = "auto"
    max_model_len: int | None = None
    enforce_eager: bool = True  # skips torch.compile warm-up; scores do not depend on it
    seed: int = 1234


def task_override(task: str) -> dict:
    """The local-data override of lm-eval's task ``task`` (from offline/evaluation/eval_tasks/TASK.yaml)."""
    path = OVERRIDES_DIR / f"{task}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in OVERRIDES_DIR.glob("*.yaml"))
        raise ValueError(f"no local configuration for task {task!r}; local tasks: {', '.join(known)} "
                         "(use --tasks-source hub for any other lm-eval task)")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def local_task_config(task: str, data_dir: Path, task_manager) -> dict:
    """lm-eval's own configuration of ``task`` with the data source replaced by the local files.

    The standard YAML is loaded by lm-eval (its ``include`` and ``!function`` entries resolved), then the keys
    of the override file replace the standard ones; data file paths become absolute under ``data_dir``.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    override = task_override(task)
    entry = task_manager.task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise ValueError(f"lm-eval {version('lm_eval')} has no YAML task {task!r}")
    files = {}
    for split, relative in override["dataset_kwargs"]["data_files"].items():
        path = Path(data_dir) / relative
        if not path.is_file():
            raise FileNotFoundError(f"{task}: local data file {path} not found (data directory from --data-dir or "
                                    f"$MOE_COMPRESS_DATA; see its SOURCES.md)")
        files[split] = str(path)
    config = load_yaml(entry.yaml_path, resolve_func=True)
    config.update(override)
    config["dataset_kwargs"] = {**override["dataset_kwargs"], "data_files": files}
    return config


def model_args(model_dir: str | Path, options: ZeroShotOptions) -> dict:
    """Arguments of lm-eval's ``vllm`` model: the plugin's quantization method for compressed checkpoints."""
    qc = read_config(model_dir).get("quantization_config") or {}
    args = {"pretrained": str(model_dir), "dtype": options.dtype, "enforce_eager": options.enforce_eager,
            "seed": options.seed}
    if qc.get("quant_method") == QUANT_METHOD:
        args["quantization"] = QUANT_METHOD
    if options.max_model_len:
        args["max_model_len"] = options.max_model_len
    return args


def _set_environment(source: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KVCACHE_GIB)
    if source == "local":
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def summarize(results: dict, tasks: tuple[str, ...]) -> dict[str, dict]:
    """Per task: every metric lm-eval reported (``acc``, ``acc_stderr``, ``acc_norm``...) and the sample counts."""
    out = {}
    for task in tasks:
        metrics = results["results"][task]
        row = {key.split(",")[0]: value for key, value in metrics.items()
               if "," in key and key.split(",")[1] == "none"}
        counts = results.get("n-samples", {}).get(task, {})
        row["samples"], row["samples_total"] = counts.get("effective"), counts.get("original")
        out[task] = row
    return out


def _shut_down(lm) -> None:
    """Stop lm-eval's vLLM engine (its engine-core process and client threads) now, not at interpreter exit."""
    lm.model.llm_engine.engine_core.shutdown()
    del lm.model
    gc.collect()


def evaluate_zeroshot(model_dir: str | Path, options: ZeroShotOptions) -> dict:
    """Run lm-eval (0-shot, vLLM backend) on ``model_dir``; return a JSON-ready summary."""
    if options.source not in TASK_SOURCES:
        raise ValueError(f"unknown task source {options.source!r}; choose one of {', '.join(TASK_SOURCES)}")
    read_config(model_dir)  # a clear error for a missing directory before vLLM starts
    _set_environment(options.source)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager()
    if options.source == "local":
        if options.data_dir is None:
            raise ValueError("local task source needs a data directory")
        tasks = [local_task_config(t, options.data_dir, task_manager) for t in options.tasks]
    else:
        tasks = list(options.tasks)
    from lm_eval.models.vllm_causallms import VLLM

    args = model_args(model_dir, options)
    started = time.perf_counter()
    lm = VLLM(**args)
    try:
        results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, limit=options.limit,
                                  task_manager=task_manager, log_samples=False, random_seed=0,
                                  numpy_random_seed=options.seed, torch_random_seed=options.seed)
    finally:
        _shut_down(lm)
    return {
        "model": str(Path(model_dir).resolve()), "kind": "zeroshot", "source": options.source,
        "data_dir": str(options.data_dir) if options.source == "local" else None, "limit": options.limit,
        "num_fewshot": 0, "lm_eval_version": version("lm_eval"), "model_args": args,
        "wall_time_s": round(time.perf_counter() - started, 1), "tasks": summarize(results, tuple(options.tasks)),
    }
