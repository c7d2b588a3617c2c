"""``moe-compress report``: one table and a set of plots for an original model and its compressed checkpoints.

Per model (the ``--original`` first, then every DIR): method, target and achieved ratio, parameters and tensor
bytes, perplexity per dataset and zero-shot accuracy per task. Numbers come from

- result files given with ``--results`` (what ``eval-zeroshot --out`` writes, or the JSON line of
  ``eval-ppl --json``), matched to a model by its resolved path;
- or are computed on request: ``--ppl-datasets`` (reference forward, :func:`.perplexity.checkpoint_perplexity`)
  and ``--zeroshot-tasks`` (``moe-compress eval-zeroshot`` in a subprocess per model, so every vLLM engine
  starts and ends with its own process).

Computed results are cached in ``OUT_DIR/cache/`` under a key made of the model path, its config.json
modification time and the evaluation settings, so re-running the report after adding checkpoints (e.g. new
methods) evaluates only what is new. Outputs: ``report.md``, ``report.json`` and the PNG plots of
:mod:`.plots` (routing, allocation, and singular-value energy when ``--original`` is given).
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_moe_compress.format import QUANT_METHOD, STATS_FILE, FormatError

from ..checkpoint_io import SafetensorsCheckpoint, atomic_file, read_config, write_json
from .zeroshot import TASKS

log = logging.getLogger(__name__)

TASK_LABELS = {"arc_easy": "ARC-e", "arc_challenge": "ARC-c", "hellaswag": "HellaSwag", "piqa": "PIQA",
               "winogrande": "WinoGrande", "openbookqa": "OBQA", "mathqa": "MathQA", "boolq": "BoolQ"}


@dataclass
class ReportOptions:
    out_dir: Path
    original: Path | None = None
    results: list[Path] = field(default_factory=list)
    ppl_datasets: list[str] = field(default_factory=list)
    ppl_max_tokens: int | None = 40960
    ppl_seqlen: int | None = None
    data_dir: Path | None = None
    zeroshot_tasks: list[str] = field(default_factory=list)
    zeroshot_limit: int | None = None
    tasks_source: str = "local"
    energy_layer: int | None = None
    progress: bool = True


@dataclass
class ModelRow:
    name: str
    path: str
    method: str
    target_ratio: float
    achieved_ratio: float
    params: int
    bytes: int
    ppl: dict[str, float] = field(default_factory=dict)
    ppl_tokens: dict[str, int] = field(default_factory=dict)
    accuracy: dict[str, dict] = field(default_factory=dict)
    zeroshot_limit: int | None = None
    plots: dict[str, str | int] = field(default_factory=dict)  # kind -> PNG file name (and energy_layer)
    energy_at_stored_rank: dict[str, dict[str, float]] = field(default_factory=dict)  # proj -> original/delta E(r_i)


def model_row(model_dir: Path, name: str) -> ModelRow:
    """Size and compression settings of one model directory (dense or ``moe_compress``)."""
    ckpt = SafetensorsCheckpoint(model_dir)
    params = nbytes = 0
    for key in ckpt.keys():
        n = ckpt.numel(key)
        nbytes += n * ckpt.dtype(key).itemsize
        params += n if ckpt.dtype(key).is_floating_point else 0
    qc = read_config(model_dir).get("quantization_config") or {}
    if qc.get("quant_method") == QUANT_METHOD:
        return ModelRow(name, str(model_dir), qc["method"], qc["target_ratio"], qc["achieved_ratio"], params, nbytes)
    return ModelRow(name, str(model_dir), "original", 0.0, 0.0, params, nbytes)


def unique_names(dirs: list[Path]) -> list[str]:
    """Directory names, prefixed with their parent's name where two would collide."""
    names = [d.name for d in dirs]
    return [f"{d.parent.name}-{d.name}" if names.count(d.name) > 1 else d.name for d in dirs]


def read_result_file(path: Path) -> list[dict]:
    """The JSON object(s) of a result file: one object, or one per line (JSON lines)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


def apply_result(row: ModelRow, result: dict) -> None:
    if "tasks" in result:
        row.accuracy.update(result["tasks"])
        row.zeroshot_limit = result.get("limit")
    elif "ppl" in result and "dataset" in result:
        row.ppl[result["dataset"]] = result["ppl"]
        row.ppl_tokens[result["dataset"]] = result.get("tokens")
    else:
        raise ValueError(f"result for {result.get('model')} is neither eval-zeroshot nor eval-ppl output")


def _cache_key(model_dir: Path, **settings) -> str:
    stamp = (Path(model_dir) / "config.json").stat().st_mtime_ns
    raw = json.dumps({"model": str(Path(model_dir).resolve()), "config_mtime": stamp, **settings}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def cached_perplexity(model_dir: Path, name: str, options: ReportOptions) -> list[dict]:
    """eval-ppl style results for ``options.ppl_datasets``, computed once and kept in OUT_DIR/cache."""
    from .perplexity import checkpoint_perplexity

    settings = {"datasets": options.ppl_datasets, "max_tokens": options.ppl_max_tokens, "seqlen": options.ppl_seqlen,
                "dynamic_pruning": False}
    path = options.out_dir / "cache" / f"ppl-{name}-{_cache_key(model_dir, **settings)}.json"
    if not path.is_file():
        log.info("perplexity of %s on %s", model_dir, ", ".join(options.ppl_datasets))
        results = checkpoint_perplexity(model_dir, options.ppl_datasets, options.data_dir, options.ppl_max_tokens,
                                        options.ppl_seqlen, progress=options.progress)
        write_json(path, [{"model": str(model_dir.resolve()), "dataset": d, **r.to_dict()} for d, r in results.items()])
    return read_result_file(path)


def cached_zeroshot(model_dir: Path, name: str, options: ReportOptions) -> dict:
    """eval-zeroshot results for ``options.zeroshot_tasks``; each model runs in its own process, cached."""
    settings = {"tasks": options.zeroshot_tasks, "limit": options.zeroshot_limit, "source": options.tasks_source}
    path = options.out_dir / "cache" / f"zeroshot-{name}-{_cache_key(model_dir, **settings)}.json"
    if not path.is_file():
        cmd = [sys.executable, "-m", "vllm_moe_compress.offline.cli", "eval-zeroshot", str(model_dir), "--out", str(path),
               "--tasks", *options.zeroshot_tasks, "--tasks-source", options.tasks_source]
        if options.zeroshot_limit:
            cmd += ["--limit", str(options.zeroshot_limit)]
        if options.data_dir:
            cmd += ["--data-dir", str(options.data_dir)]
        log.info("zero-shot: %s", " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"eval-zeroshot failed for {model_dir} (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return read_result_file(path)[0]


def draw_plots(row: ModelRow, model_dir: Path, options: ReportOptions) -> None:
    """Routing, allocation and (with --original) energy plots of one compressed checkpoint."""
    from . import plots

    stats_path = model_dir / STATS_FILE
    stats_layers = json.loads(stats_path.read_text())["layers"] if stats_path.is_file() else {}
    config_layers = read_config(model_dir)["quantization_config"].get("layers", {})
    if stats_layers and all("routing_counts" in v for v in stats_layers.values()):
        row.plots["routing"] = plots.plot_routing(stats_layers, row.name, options.out_dir / f"routing-{row.name}.png").name
    allocation = plots.plot_allocation(stats_layers or config_layers, row.name,
                                       options.out_dir / f"allocation-{row.name}.png")
    if allocation:
        row.plots["allocation"] = allocation.name
    if options.original is not None:
        from .spectrum import layer_spectra

        layer = options.energy_layer if options.energy_layer is not None else min(int(k) for k in config_layers)
        try:
            spectra = layer_spectra(options.original, model_dir, layer)
        except (FormatError, KeyError) as err:
            log.warning("no energy plot for %s: %s", model_dir, err)
            return
        path = plots.plot_energy(spectra, f"{row.name} layer {layer}", options.out_dir / f"energy-{row.name}.png")
        row.plots["energy"] = path.name
        row.plots["energy_layer"] = layer
        row.energy_at_stored_rank = {
            proj: {"original": round(s.retained_at_stored_rank(s.original), 4),
                   "delta": round(s.retained_at_stored_rank(s.delta), 4)} for proj, s in spectra.items()}


def build_report(dirs: list[Path], options: ReportOptions) -> list[ModelRow]:
    """Collect every row (original first), evaluate what was asked, draw the plots, write report.md/.json."""
    models = ([options.original] if options.original is not None else []) + [Path(d) for d in dirs]
    if not models:
        raise ValueError("nothing to report: give checkpoint directories and/or --original")
    names = unique_names(models)
    results: dict[str, list[dict]] = {}
    for path in options.results:
        for result in read_result_file(path):
            results.setdefault(str(Path(result["model"]).resolve()), []).append(result)
    rows = []
    for model_dir, name in zip(models, names):
        row = model_row(model_dir, name)
        found = list(results.get(str(model_dir.resolve()), []))
        if options.ppl_datasets:
            found += cached_perplexity(model_dir, name, options)
        if options.zeroshot_tasks:
            found.append(cached_zeroshot(model_dir, name, options))
        for result in found:
            apply_result(row, result)
        if row.method != "original":
            draw_plots(row, model_dir, options)
        rows.append(row)
    write_json(options.out_dir / "report.json", {"rows": [asdict(r) for r in rows]})
    with atomic_file(options.out_dir / "report.md") as tmp:
        tmp.write_text(markdown_table(rows) + "\n", encoding="utf-8")
    return rows


def _columns(rows: list[ModelRow]) -> tuple[list[str], list[str]]:
    datasets = sorted({d for r in rows for d in r.ppl})
    seen = {t for r in rows for t in r.accuracy}
    tasks = [t for t in TASKS if t in seen] + sorted(seen - set(TASKS))
    return datasets, tasks


def markdown_table(rows: list[ModelRow]) -> str:
    """One line per model; accuracy is lm-eval ``acc`` (``acc_norm`` is in report.json), mean over the tasks shown."""
    datasets, tasks = _columns(rows)
    head = ["model", "method", "target", "achieved", "params", "MiB"] + [f"PPL {d}" for d in datasets] + \
        [TASK_LABELS.get(t, t) for t in tasks] + (["mean acc", "zero-shot limit"] if tasks else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, r.method, f"{r.target_ratio:.2f}", f"{r.achieved_ratio:.4f}", f"{r.params:,}",
                 f"{r.bytes / 2**20:.2f}"]
        cells += [f"{r.ppl[d]:.2f}" if d in r.ppl else "" for d in datasets]
        accs = [r.accuracy[t]["acc"] for t in tasks if t in r.accuracy]
        cells += [f"{r.accuracy[t]['acc']:.3f}" if t in r.accuracy else "" for t in tasks]
        if tasks:
            cells += [f"{sum(accs) / len(accs):.3f}" if len(accs) == len(tasks) else "",
                      str(r.zeroshot_limit or "all") if accs else ""]
        lines.append("| " + " | ".join(cells) + " |")
    tokens = sorted({n for r in rows for n in r.ppl_tokens.values() if n})
    if datasets:
        lines.append(f"\nPPL: non-overlapping windows (GPTQ convention), {', '.join(map(str, tokens))} predicted tokens "
                     "per dataset; computed ones (--ppl-datasets) by the reference forward with D²-MoE's dynamic pruning "
                     "off, as vllm serve runs it by default.")
    if tasks:
        lines.append("Accuracy: lm-evaluation-harness, 0-shot, `acc`, vLLM backend (`quantization=moe_compress` for "
                     "compressed checkpoints); 'zero-shot limit' = first N documents per task.")
    return "\n".join(lines)
