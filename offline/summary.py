"""``moe-compress inspect``: what a compressed checkpoint holds (method, ratios, ranks, parameters)."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_moe_compress.format import STATS_FILE, CompressionInfo, SparseLowRankSpec

from .checkpoint_io import read_config


def summarize(model_dir: str | Path) -> dict:
    info = CompressionInfo.from_config(read_config(model_dir).get("quantization_config"))
    layers = {}
    for spec in info.layers:
        layers[spec.layer] = {
            "scheme": spec.scheme,
            "experts": spec.num_experts,
            "base_channels": spec.to_json()["base_channels"],
            "ranks": {p: {"min": min(r), "mean": round(sum(r) / len(r), 2), "max": max(r)} for p, r in spec.ranks.items()},
            "params": spec.num_params(),
            **({"units": {k: sum(v) for k, v in spec.to_json()["details"].items()}}
               if isinstance(spec, SparseLowRankSpec) else {}),
        }
    stats_path = Path(model_dir) / STATS_FILE
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    return {
        "method": info.method, "method_options": info.method_options, "target_ratio": info.target_ratio,
        "achieved_ratio": info.achieved_ratio, "expert_ratio": info.expert_ratio,
        "original_params": info.original_params, "compressed_params": info.compressed_params,
        "dtype": info.dtype, "dynamic_prune_ratio": info.dynamic_prune_ratio, "layers": layers,
        "calibration": stats.get("calibration"), "wall_time_s": stats.get("wall_time_s"),
        "peak_rss_bytes": stats.get("peak_rss_bytes"),
    }


def format_summary(s: dict) -> str:
    lines = [
        f"method            {s['method']}  {s['method_options']}",
        f"ratio             target {s['target_ratio']:.4f}  achieved {s['achieved_ratio']:.4f} of total parameters"
        f"  ({s['expert_ratio']:.4f} of routed-expert parameters)",
        f"parameters        {s['original_params']:,} -> {s['compressed_params']:,}  (stored as {s['dtype']})",
        f"dynamic pruning   {s['dynamic_prune_ratio']:.4f} of base channels per batch, stored; off by default in vllm "
        "serve and eval-ppl (VLLM_MOE_COMPRESS_DYNAMIC_PRUNE=1, eval-ppl --dynamic-prune turn it on)",
    ]
    if "checked" in s:
        values = "; values finite (no NaN/Inf)" if s["checked"] == "headers and values" else " (--verify: values too)"
        lines.append(f"checks            passed: files, tensor names/shapes/dtypes, format_version, schemes{values}")
    if s["calibration"]:
        c = s["calibration"]
        lines.append(f"calibration       {c['samples']} x {c['seqlen']} tokens from {c['file']} (seed {c['seed']})")
    lines.append("layer  experts  base_ch  rank gate/up/down (min/mean/max)                 params")
    for layer, d in s["layers"].items():
        r = "  ".join(f"{v['min']}/{v['mean']}/{v['max']}" for v in d["ranks"].values())
        lines.append(f"{layer:>5}  {d['experts']:>7}  {d['base_channels']:>7}  {r:<47} {d['params']:>10,}")
    return "\n".join(lines)
