"""The compression job: validate, calibrate layer by layer, compress each MoE layer, write atomically.

Every input is checked before the model is loaded (architecture, tensors, ratio reachable, calibration
text long enough), and the output directory appears only when the whole checkpoint is written.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .architectures import PROJECTIONS, MoEArchitecture, architecture_for, moe_block
from .budget import LayerShape, plan_budget
from .calibration import calibration_windows, peak_rss_bytes, read_calibration_text, run_layerwise
from .checkpoint_io import (
    CheckpointError, SafetensorsCheckpoint, ShardedWriter, atomic_output_dir, copy_side_files, read_config,
)
from .fisher import expert_fisher
from .format import STATS_FILE, CompressionInfo
from .methods import METHODS, CompressionMethod
from .methods.base import expert_weights

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


@dataclass
class MoELayout:
    """Where the routed experts are in a checkpoint: per MoE layer its prefix and shape."""

    prefixes: dict[int, str]
    shapes: dict[int, LayerShape]
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
    num_experts, intermediate = arch.num_experts(config), arch.intermediate_size(config)
    hidden = int(config.hidden_size)
    layout = MoELayout(prefixes, {})
    for layer, experts in sorted(found.items()):
        if sorted(experts) != list(range(num_experts)):
            raise CheckpointError(f"layer {layer}: expected experts 0..{num_experts - 1}, found {len(experts)}")
        for e, projs in experts.items():
            for p in PROJECTIONS:
                if p not in projs:
                    raise CheckpointError(f"layer {layer} expert {e}: tensor for {arch.proj_names[p]} missing")
                expected = [hidden, intermediate] if p == "down" else [intermediate, hidden]
                if ckpt.shape(projs[p]) != expected:
                    raise CheckpointError(f"tensor {projs[p]} has shape {ckpt.shape(projs[p])}, expected {expected}")
                layout.expert_keys.add(projs[p])
        layout.shapes[layer] = LayerShape(num_experts, hidden, intermediate)
    return layout


def compress_checkpoint(
    model_dir: str | Path, out_dir: str | Path, method: CompressionMethod, ratio: float,
    calibration: CalibrationOptions, dtype: str = "bfloat16", overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3, progress: bool = True,
) -> CompressionInfo:
    started = time.perf_counter()
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    arch = architecture_for(config)
    ckpt = SafetensorsCheckpoint(model_dir)
    layout = find_moe_layers(ckpt, arch, AutoConfig.from_pretrained(model_dir))
    total = sum(ckpt.numel(k) for k in ckpt.keys())
    plan = plan_budget(
        total, layout.shapes, ratio,
        fixed_params={l: method.fixed_params(s) for l, s in layout.shapes.items()},
        capacity={l: method.capacity(s) for l, s in layout.shapes.items()},
        method=method.name, hint=method.unreachable_hint(),
    )
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists (use --overwrite to replace it)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = read_calibration_text(calibration.file)
    samples = calibration_windows(tokenizer, text, calibration.samples, calibration.seqlen, calibration.seed)
    log.info("%s: %d MoE layers, %s parameters; calibration %d x %d tokens from %s",
             model_dir, len(layout.shapes), f"{total:,}", *samples.shape, calibration.file)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    fisher = {}
    if method.needs_fisher:
        fisher = expert_fisher(
            model, sorted(layout.shapes), samples[: calibration.fisher_samples], calibration.fisher_labels,
            calibration.fisher_granularity, calibration.seed, progress,
        )
    out_dtype = DTYPES[dtype]
    specs, layer_stats, compressed_params = [], {}, 0
    projection_params = dict.fromkeys(PROJECTIONS, 0)
    with atomic_output_dir(out_dir, overwrite) as tmp, _log_to(tmp / "compress.log"):
        log.info("method %s %s, target ratio %s, calibration %s", method.name, method.options(), ratio, calibration)
        writer = ShardedWriter(tmp, max_shard_bytes)
        for key in ckpt.keys():
            if key not in layout.expert_keys:
                writer.add(key, ckpt.get(key))

        def on_moe_layer(layer: int, stats) -> None:
            nonlocal compressed_params
            shape, prefix = layout.shapes[layer], layout.prefixes[layer]
            weights = expert_weights(moe_block(model, layer).experts)
            compressed = method.compress_layer(weights, stats, fisher.get(layer), plan.layer_budgets[layer], shape)
            for name, tensor in compressed.to_tensors(prefix, arch.proj_names, out_dtype).items():
                writer.add(name, tensor)
            compressed_params += compressed.num_params()
            for p, n in compressed.params_by_projection().items():
                projection_params[p] += n
            specs.append(compressed.spec(layer, prefix))
            layer_stats[str(layer)] = {
                "routing_counts": stats.counts.tolist(),
                "routing_weight_sums": stats.weight_sums.tolist(),
                **compressed.allocation(),
                **method.layer_log(),
            }

        run_layerwise(
            model, {l: (s.num_experts, s.hidden_size, s.intermediate_size) for l, s in layout.shapes.items()},
            samples, calibration.batch_size, on_moe_layer, progress,
        )
        achieved = plan.achieved_ratio(compressed_params)
        if abs(achieved - ratio) > RATIO_TOLERANCE:
            raise RuntimeError(f"achieved ratio {achieved:.4f} is more than {RATIO_TOLERANCE} from target {ratio}")
        expert_total = sum(s.dense_expert_params for s in layout.shapes.values())
        removed = projection_ratios(projection_params, expert_total)
        info = CompressionInfo(
            method=method.name, target_ratio=ratio, achieved_ratio=round(achieved, 6),
            expert_ratio=round(1 - compressed_params / expert_total, 6), original_params=total,
            compressed_params=plan.non_expert_params + compressed_params, dtype=dtype, proj_names=arch.proj_names,
            layers=specs, dynamic_prune_ratio=method.dynamic_prune_ratio,
            method_options={**method.options(), "gate_up_ratio": removed["gate_up"]},
        )
        writer.finish()
        log.info("wrote %s: ratio %.4f (target %.4f), expert ratio %.4f, peak RSS %.1f MiB",
                 out_dir, achieved, ratio, info.expert_ratio, peak_rss_bytes() / 2**20)
        (tmp / "config.json").write_text(json.dumps({**config, "quantization_config": info.to_config()}, indent=2) + "\n")
        copy_side_files(model_dir, tmp)
        calib = {k: str(v) if isinstance(v, Path) else v for k, v in vars(calibration).items()}
        (tmp / STATS_FILE).write_text(json.dumps({
            "method": method.name, "calibration": calib, "projection_ratios": removed, "layers": layer_stats,
            "wall_time_s": round(time.perf_counter() - started, 2), "peak_rss_bytes": peak_rss_bytes(),
        }, indent=1) + "\n")
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
    logger = logging.getLogger("offline")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(min(previous or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        handler.close()


def build_method(name: str, **options) -> CompressionMethod:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    cls = METHODS[name]
    accepted = {p for c in cls.__mro__ if "__init__" in vars(c) for p in inspect.signature(c.__init__).parameters}
    return cls(**{k: v for k, v in options.items() if k in accepted})
