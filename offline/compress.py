"""The compression job: validate, calibrate layer by layer, compress each MoE layer, write atomically.

Every input is checked before anything is written or the model is loaded (architecture, tensors, ratio
reachable, calibration text long enough). Each compressed layer is journaled in a work directory
(offline/workdir.py), so a killed run started again with the same arguments resumes from the last finished
layer; the output directory appears only when the whole checkpoint is written, and is assembled from the
journal in every run, so interrupted and uninterrupted runs write identical bytes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from vllm_moe_compress.format import PROJECTIONS, matrix_shape

from .architectures import MoEArchitecture, architecture_for
from .budget import BudgetPlan, BudgetPlanner, LayerShape
from .calibration import (calibration_windows, clock, elapsed, peak_rss_bytes, read_calibration_text, release_freed_memory,
                          run_layerwise)
from .checkpoint_io import (
    CheckpointError, DiskFullError, SafetensorsCheckpoint, ShardedWriter, atomic_output_dir, copy_side_files, read_config,
)
from .fisher import expert_fisher
from .memory_model import check_memory, estimate_peak
from .source_model import StreamedModel
from vllm_moe_compress.format import STATS_FILE, CompressionInfo, LayerSpec
from .methods import method_class, options_for
from .methods.base import CompressionMethod, LayerInputs
from .options import MethodOptions
from .output_safety import check_output_path
from .workdir import WorkDir, crash_point, run_arguments

log = logging.getLogger(__name__)

RATIO_TOLERANCE = 0.005
"""Achieved total ratio must be within ±0.5 percentage points of the target."""

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class CalibrationOptions:
    file: Path
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    fisher_samples: int = 32
    fisher_labels: str = "sampled"
    fisher_granularity: str = "expert"
    fisher_batch_size: int | None = None  # None: fisher.fisher_batch_size(seqlen)


@dataclass
class MoELayout:
    """Where the routed experts are in a checkpoint: per MoE layer its prefix and shape; the experts a token is
    routed to (``top_k``)."""

    prefixes: dict[int, str]
    shapes: dict[int, LayerShape]
    top_k: int
    expert_keys: set[str] = field(default_factory=set)


def find_moe_layers(ckpt: SafetensorsCheckpoint, arch: MoEArchitecture, config) -> MoELayout:
    """Locate every routed-expert tensor and check the layer is complete and consistently shaped."""
    pattern = arch.expert_key_pattern
    found: dict[int, dict[int, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    prefixes: dict[int, str] = {}
    for key in ckpt.keys():
        m = pattern.match(key)
        if m:
            layer = int(m["layer"])
            prefixes[layer] = m["prefix"]
            found[layer][int(m["expert"])][arch.canonical_proj(m["proj"])] = key
    if not found:
        raise CheckpointError(
            f"no routed-expert tensors (…{arch.block_name}.experts.N.{arch.proj_names['gate']}.weight) in "
            f"{ckpt.model_dir}: the checkpoint has no MoE layers to compress"
        )
    try:
        num_experts, intermediate = arch.num_experts(config), arch.intermediate_size(config)
        hidden, top_k = int(config.hidden_size), int(config.num_experts_per_tok)
    except (AttributeError, TypeError, ValueError) as err:
        raise CheckpointError(f"config.json of {ckpt.model_dir} lacks a valid {arch.model_type} MoE field: {err}") from err
    layout = MoELayout(prefixes, {}, top_k)
    for layer, experts in sorted(found.items()):
        if sorted(experts) != list(range(num_experts)):
            raise CheckpointError(f"layer {layer}: expected experts 0..{num_experts - 1}, found {len(experts)}")
        for e, projs in experts.items():
            for p in PROJECTIONS:
                if p not in projs:
                    raise CheckpointError(f"layer {layer} expert {e}: tensor for {arch.proj_names[p]} missing")
                expected = list(matrix_shape(p, hidden, intermediate))
                if ckpt.shape(projs[p]) != expected:
                    raise CheckpointError(f"tensor {projs[p]} has shape {ckpt.shape(projs[p])}, expected {expected}")
                layout.expert_keys.add(projs[p])
        layout.shapes[layer] = LayerShape(num_experts, hidden, intermediate)
    return layout


def compress_checkpoint(
    model_dir: str | Path, out_dir: str | Path, method: CompressionMethod, ratio: float,
    calibration: CalibrationOptions, dtype: str = "bfloat16", overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3, progress: bool = True, expert_chunk: int | None = 16,
    device: torch.device | str = "cpu",
) -> CompressionInfo:
    """Compress ``model_dir`` into ``out_dir``, resuming from the work directory of an interrupted run with the
    same arguments (offline/workdir.py). Every input is validated before anything is written. ``expert_chunk``:
    experts whose Grams are computed at once (calibration.ExpertGrams; None = a whole layer), a memory/time
    trade-off that does not change the result (so it is not part of the work directory's key). ``device``: where
    the calibration forward, the Grams and the methods' decompositions run (:func:`_compress_layers`); not part of
    the key either (a run resumed on another device is the same run), nor of the checkpoint's config."""
    started = time.perf_counter()
    device = torch.device(device)
    check_output_path(model_dir, out_dir, overwrite)
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    arch = architecture_for(config)
    ckpt = SafetensorsCheckpoint(model_dir)
    layout = find_moe_layers(ckpt, arch, AutoConfig.from_pretrained(model_dir))
    total = sum(ckpt.numel(k) for k in ckpt.keys())
    planner = BudgetPlanner.for_method(total, layout.shapes, ratio, method)
    plan = planner.plan()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = read_calibration_text(calibration.file)
    samples = calibration_windows(tokenizer, text, calibration.samples, calibration.seqlen, calibration.seed)
    # logs the expected peak; refuses before anything is written when it cannot fit the available memory
    check_memory(estimate_peak(ckpt, layout, int(config.get("num_hidden_layers", 0)), method, calibration,
                               expert_chunk, ratio, dtype))
    work = WorkDir(out_dir, run_arguments(model_dir, method, ratio, calibration, dtype))
    job = _Job(model_dir, Path(out_dir), config, arch, ckpt, layout, method, plan, planner, ratio, calibration, dtype,
               work, expert_chunk, device)
    try:
        with work, _log_to(work.log_path):
            log.info("%s: %d MoE layers, %s parameters; calibration %d x %d tokens from %s",
                     model_dir, len(layout.shapes), f"{total:,}", *samples.shape, calibration.file)
            log.info("method %s %s, target ratio %s, calibration %s, device %s", method.name, method.options(), ratio,
                     calibration, device)
            resumed = _compress_layers(job, samples, progress)
            info = _write_checkpoint(job, overwrite, max_shard_bytes, started, resumed)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DiskFullError(
                f"disk full (no space left on device) while writing {err.filename or work.path.parent}: "
                f"nothing was written to {out_dir}; finished layers are kept in {work.path}, free some space and "
                "run the same command again to resume"
            ) from err
        raise OutputWriteError(f"{err.strerror or err}: {err.filename or work.path}; nothing was written to "
                               f"{out_dir}{_kept(job)}") from err
    except KeyboardInterrupt:
        raise CompressionInterrupted(f"nothing was written to {out_dir}{_kept(job)}") from None
    work.remove()
    return info


def resolve_device(name: str) -> torch.device:
    """The device ``compress --device NAME`` runs on: ``auto`` is cuda when a GPU is visible, else cpu; ``cuda``
    without a visible GPU is refused (a ValueError: one line and exit 2 from the command line)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
                         "use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


class OutputWriteError(OSError):
    """Writing the work directory or the output failed (read-only file system, permission denied...)."""


class CompressionInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what was kept and how to resume."""


def _kept(job: "_Job") -> str:
    """What an interrupted or failed run leaves for the next one, as the tail of a one-line message."""
    layers = sorted(job.layout.shapes)
    finished = job.work.finished_layers(layers) if job.work.path.is_dir() else []
    if not finished:
        return ""
    return (f"; {len(finished)} of {len(layers)} MoE layers are kept in {job.work.path}: run the same command "
            "again to resume")


@dataclass
class _Job:
    """What the two stages of a compression run share (validated inputs, the plan, the work directory)."""

    model_dir: Path
    out_dir: Path
    config: dict
    arch: MoEArchitecture
    ckpt: SafetensorsCheckpoint
    layout: MoELayout
    method: CompressionMethod
    plan: BudgetPlan
    planner: BudgetPlanner  # re-plans once the method's per-layer budget weights are known
    ratio: float
    calibration: CalibrationOptions
    dtype: str
    work: WorkDir
    expert_chunk: int | None
    device: torch.device


def _compress_layers(job: _Job, samples: torch.Tensor, progress: bool) -> bool:
    """Calibrate and compress every MoE layer not yet in the work directory; True if an earlier attempt had
    done some. The calibration forward, the Grams and the decompositions of the methods that use
    methods.base.factorize_experts (svd, whitened-svd, d2's deltas), of rs's low-rank units and mobe's and rfid's
    group SVDs and fits run on ``job.device``; the Fisher pass, the per-layer budget pass and rs's ridge base run
    on the CPU. What is journaled is on the CPU."""
    layout, method, calibration, work = job.layout, job.method, job.calibration, job.work
    moe_layers = sorted(layout.shapes)
    finished = work.finished_layers(moe_layers)
    todo = moe_layers[len(finished):]
    source = StreamedModel(job.model_dir, job.ckpt, job.arch)  # one decoder layer in memory at a time
    # The per-layer budgets are journaled before any layer; a resumed run reads them back (and hands them to
    # the per-layer records) even when every layer is already finished.
    layer_weights = work.layer_weights(lambda: method.layer_budget_weights(
        source, samples, layout.shapes, job.plan.kept_fraction, calibration.batch_size))
    if layer_weights:
        job.plan = job.planner.plan(layer_weights)
    if not todo:
        log.info("resuming: all %d MoE layers already compressed in %s", len(moe_layers), work.path)
        return True
    if finished:
        log.info("resuming from layer %d: %d of %d MoE layers already compressed in %s",
                 todo[0], len(finished), len(moe_layers), work.path)
    fisher = {}
    if method.needs_fisher:
        fisher = work.fisher(lambda: expert_fisher(
            source, moe_layers, samples[: calibration.fisher_samples], calibration.fisher_labels,
            calibration.fisher_granularity, calibration.seed, progress, calibration.fisher_batch_size,
        ))

    def on_moe_layer(layer: int, stats, hidden) -> None:
        shape, prefix = layout.shapes[layer], layout.prefixes[layer]
        started = clock()
        weights = source.expert_weights(layer)
        following = [l for l in moe_layers if l > layer]
        next_weights = source.expert_weights(following[0]) if method.needs_next_layer and following else None
        result = method.compress_layer(LayerInputs(weights, stats, fisher.get(layer), job.plan.layer_budgets[layer],
                                                   shape, next_weights, job.device))
        compressed = result.layer
        compression, statistics = elapsed(started), stats.gram_seconds
        keep = {"keep_fraction": round(layer_weights[layer], 6)} if layer_weights else {}
        record = {
            "spec": compressed.spec(layer, prefix).to_json(),
            "params_by_projection": compressed.params_by_projection(),
            "stats": {"routing_counts": stats.counts.tolist(), "routing_weight_sums": stats.weight_sums.tolist(),
                      **keep, **compressed.allocation(), **result.log},
        }
        tensors = compressed.to_tensors(prefix, job.arch.proj_names, DTYPES[job.dtype])
        # Before the layer is serialised: the method's layer (float32 factors) and the last Gram chunks are freed,
        # and the heap they leave is given back to the OS; serialising allocates its buffers elsewhere (mmap), so
        # kept, it would count on top of them (BENCHMARKS.md §12.10).
        del compressed, result
        stats.drop_cached_grams()
        source.ckpt.release_mapped_pages()  # the pages the method's reads of this (and the next) layer mapped
        release_freed_memory()
        # (wall, CPU) seconds per phase; the Grams are computed on demand inside the method: counted as statistics
        seconds = {"calibration": stats.calibration_seconds, "statistics": statistics,
                   "factorisation": tuple(c - s for c, s in zip(compression, statistics))}
        record["seconds"] = {phase: {"wall": round(w, 2), "cpu": round(c, 2)} for phase, (w, c) in seconds.items()}
        write_started = clock()
        work.commit_layer(layer, tensors, record, [h.cpu() for h in hidden])
        seconds["write"] = elapsed(write_started)
        log.info("layer %d, seconds wall (CPU): %s", layer,
                 ", ".join(f"{phase} {w:.1f} ({c:.1f})" for phase, (w, c) in seconds.items()))

    run_layerwise(
        source, {l: (layout.shapes[l].num_experts, layout.shapes[l].hidden_size, layout.shapes[l].intermediate_size)
                for l in todo},
        samples, calibration.batch_size, on_moe_layer, progress, method.moment_samples,
        start_layer=finished[-1] + 1 if finished else 0,
        start_hidden=work.hidden_after(finished[-1]) if finished else None, expert_chunk=job.expert_chunk,
        device=job.device,
    )
    work.drop_hidden_states()
    return bool(finished)


def _write_checkpoint(job: _Job, overwrite: bool, max_shard_bytes: int, started: float,
                      resumed: bool) -> CompressionInfo:
    """Assemble the output from the source's non-expert tensors and the journaled layers, atomically."""
    layout, method, plan, ratio, work = job.layout, job.method, job.plan, job.ratio, job.work
    records = {layer: work.layer_record(layer) for layer in sorted(layout.shapes)}
    stored = {p: sum(r["params_by_projection"][p] for r in records.values()) for p in PROJECTIONS}
    compressed_params = sum(stored.values())
    achieved = plan.achieved_ratio(compressed_params)
    if abs(achieved - ratio) > RATIO_TOLERANCE:
        raise RuntimeError(f"achieved ratio {achieved:.4f} is more than {RATIO_TOLERANCE} from target {ratio}")
    expert_total = sum(s.dense_expert_params for s in layout.shapes.values())
    removed = projection_ratios(stored, expert_total)
    info = CompressionInfo(
        method=method.name, target_ratio=ratio, achieved_ratio=round(achieved, 6),
        expert_ratio=round(1 - compressed_params / expert_total, 6), original_params=plan.total_params,
        compressed_params=plan.non_expert_params + compressed_params, dtype=job.dtype, proj_names=job.arch.proj_names,
        layers=[LayerSpec.from_json(r["spec"]) for r in records.values()], dynamic_prune_ratio=method.dynamic_prune_ratio,
        method_options={**method.options(), "gate_up_ratio": removed["gate_up"]},
    )
    with atomic_output_dir(job.out_dir, overwrite, staging_dir=work.path) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        for key in job.ckpt.keys():
            if key not in layout.expert_keys:
                writer.add(key, job.ckpt.get(key))
        for layer in records:
            for name, tensor in work.layer_tensors(layer).items():
                writer.add(name, tensor)
        writer.finish()
        config = {**job.config, "quantization_config": info.to_config()}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(job.model_dir, tmp)
        calib = {k: str(v) if isinstance(v, Path) else v for k, v in vars(job.calibration).items()}
        (tmp / STATS_FILE).write_text(json.dumps({
            "method": method.name, "device": str(job.device), "calibration": calib, "projection_ratios": removed,
            "layers": {str(l): r["stats"] for l, r in records.items()},
            "wall_time_s": round(time.perf_counter() - started, 2), "peak_rss_bytes": peak_rss_bytes(),
            "layer_seconds": {str(l): r.get("seconds") for l, r in records.items()},  # as journaled
            "resumed": resumed,
        }, indent=1) + "\n")
        log.info("wrote %s: ratio %.4f (target %.4f), expert ratio %.4f, peak RSS %.1f MiB",
                 job.out_dir, achieved, ratio, info.expert_ratio, peak_rss_bytes() / 2**20)
        shutil.copyfile(work.log_path, tmp / "compress.log")
        crash_point("assembled")
    return info


def projection_ratios(stored: dict[str, int], expert_total: int) -> dict[str, float]:
    """Fraction of each projection's routed-expert parameters removed, and of gate+up together (the
    RFID-MoE / MoBE papers' probable definition of their compression ratio)."""
    dense = expert_total // 3  # gate, up and down have the same number of parameters
    ratios = {p: round(1 - n / dense, 6) for p, n in stored.items()}
    ratios["gate_up"] = round(1 - (stored["gate"] + stored["up"]) / (2 * dense), 6)
    return ratios


@contextlib.contextmanager
def _log_to(path: Path):
    """Also write this package's log records to ``path`` (the output directory's compress.log)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger(__package__)  # vllm_moe_compress.offline
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(min(previous or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        handler.close()


def build_method(name: str, options: MethodOptions | None = None, **fields) -> CompressionMethod:
    """The method called ``name`` (``--method``) with its ``options``, or with options built from ``fields``
    (methods.options_for: a field of another method is refused)."""
    method = method_class(name)  # ValueError for an unknown name
    if options is not None and fields:
        raise TypeError("pass options or fields, not both")
    return method(options_for(name, **fields) if options is None else options)
