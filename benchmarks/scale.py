"""Memory and time of ``moe-compress compress`` at real layer shapes (random weights: no quality is measured).

    python -m benchmarks.scale qwen3-30b-a3b --layers 2 8 --methods d2 rs rfid whitened-svd --ratio 0.6 \
        --out runs/scale --rss-limit-gib 20 -- --calib-samples 16 --calib-seqlen 256

For each depth, writes (once) a random-weight checkpoint with the published model's layer shapes
(``benchmarks/random_checkpoint.py``), then runs ``moe-compress compress`` on it with each method in a
subprocess, sampling the resident memory of the whole process tree every 0.2 s. A run whose memory passes
``--rss-limit-gib`` is stopped (so that the benchmark cannot take the machine down) and reported as such.
Arguments after ``--`` go to every ``compress`` call.

Each row: wall time, peak RSS, the target peak ``3 GiB + 1.5 × one decoder layer's stored size`` (the
scale issue's bound), and how the run ended. ``results.json`` and ``table.md`` are written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks.kernels import MODELS
from benchmarks.random_checkpoint import write_random_checkpoint
from loadtests.server import tree_rss_bytes

GIB = 2**30


def layer_stored_bytes(checkpoint: Path) -> int:
    """Bytes of decoder layer 0 as stored (its shard; benchmarks/random_checkpoint writes one per layer)."""
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.0.input_layernorm.weight"]
    return (checkpoint / shard).stat().st_size


def run_measured(command: list[str], log_path: Path, rss_limit: int) -> dict:
    """Run ``command``; wall time, peak tree RSS and how it ended ("ok", "exit N", "stopped at the limit")."""
    started = time.perf_counter()
    with log_path.open("w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        process, peak, ended = psutil.Process(child.pid), 0, None
        while child.poll() is None:
            peak = max(peak, tree_rss_bytes(process))
            if peak > rss_limit:
                for p in [*process.children(recursive=True), process]:
                    p.kill()
                child.wait()
                ended = f"stopped at the {rss_limit / GIB:.0f} GiB limit"
                break
            time.sleep(0.2)
    wall = time.perf_counter() - started
    if ended is None:
        ended = "ok" if child.returncode == 0 else f"exit {child.returncode}"
    return {"wall_s": round(wall, 1), "peak_rss_bytes": peak, "ended": ended,
            "last_line": (log_path.read_text().strip().splitlines() or [""])[-1][-200:]}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(MODELS), help="whose published layer shapes to use")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8], help="depths to measure (default 2 8)")
    parser.add_argument("--methods", nargs="+", default=["d2", "rs", "rfid", "whitened-svd"])
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--out", type=Path, required=True, help="checkpoints, logs and results go here")
    parser.add_argument("--rss-limit-gib", type=float, default=20.0,
                        help="stop a run whose memory passes this (default 20)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in args.layers:
        source = args.out / f"{args.model}-{layers}-layers"
        if not source.exists():
            write_random_checkpoint(args.model, layers, source)
        target = 3 * GIB + 1.5 * layer_stored_bytes(source)
        for method in args.methods:
            name = f"{args.model}-{layers}-{method}-{args.ratio}"
            command = ["moe-compress", "compress", str(source), "-o", str(args.out / name), "--method", method,
                       "--ratio", str(args.ratio), "--no-progress", *extra]
            result = run_measured(command, args.out / f"{name}.log", int(args.rss_limit_gib * GIB))
            rows.append({"model": args.model, "layers": layers, "method": method, "ratio": args.ratio,
                         "target_peak_bytes": int(target), "command": " ".join(command), **result})
            print(f"{name}: {result['ended']}, {result['wall_s']} s, peak {result['peak_rss_bytes'] / GIB:.2f} GiB "
                  f"(target {target / GIB:.2f} GiB)", flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count(),
               "memory_gib": round(psutil.virtual_memory().total / GIB, 1)}
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    lines = ["| layers | method | ended | wall s | peak RSS GiB | target GiB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['layers']} | {r['method']} | {r['ended']} | {r['wall_s']} | {r['peak_rss_bytes'] / GIB:.2f} | "
              f"{r['target_peak_bytes'] / GIB:.2f} |" for r in rows]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
