"""Perplexity of the original model and of every method × ratio, with compression wall time and peak RSS.

    python -m benchmarks.ppl_table --model ../shared/models/brown-qwen3-moe \
        --calib-file ../shared/data/brown/train.txt --data-dir ../shared/data --out runs/ppl

Each compression and evaluation runs as its own ``moe-compress`` process (so peak RSS is per job);
results go to OUT/results.json and a Markdown table to stdout. Perplexity is scored at ``--seqlen`` (default
256: the reference models were trained on 256-token sequences, ../shared/models/README.md) and every cell
carries the paired standard error of its change against the original (same windows, so most of the
text's variance cancels); a change smaller than twice it is marked ``≈``. Every finished row is kept in
OUT/NAME.result.json and reused when the same command runs again (resume after an interruption). A method may carry extra ``compress`` flags
after a colon, comma-separated, for ablations: ``--methods rs rs:--rs-score=peak rs:--rs-base=mean``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from vllm_moe_compress.offline.evaluation.perplexity import paired_delta

DATASETS = ("brown", "wikitext2", "ptb")


def moe_compress(*args: str) -> str:
    cmd = [sys.executable, "-m", "vllm_moe_compress.offline.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def evaluate(model_dir: Path, args) -> dict[str, dict]:
    """eval-ppl's JSON per dataset: ppl, nll, nll_se, window_nll, ..."""
    out = {}
    for dataset in args.datasets:
        stdout = moe_compress("eval-ppl", str(model_dir), "--dataset", dataset, "--data-dir", args.data_dir,
                              "--max-tokens", str(args.max_tokens), "--seqlen", str(args.seqlen), "--json",
                              "--no-progress")
        out[dataset] = json.loads(stdout.strip().splitlines()[-1])
    return out


def cached(path: Path, make) -> dict:
    """The row stored at `path`, or `make()` stored there (atomically) first."""
    if path.exists():
        return json.loads(path.read_text())
    row = make()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row) + "\n")
    tmp.replace(path)
    return row


def delta_cell(result: dict, base: dict) -> str:
    """'PPL (Δ% ± SE)', the SE paired over the windows both models scored; '≈' when |Δ| < 2 SE."""
    delta, se = paired_delta(base["window_nll"], result["window_nll"])
    pct, pct_se = 100 * math.expm1(delta), 100 * math.exp(delta) * se
    mark = "≈" if abs(pct) < 2 * pct_se else ""
    return f"{result['ppl']:.1f} ({mark}{pct:+.2f} ± {pct_se:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib-file", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=["d2", "svd", "whitened-svd"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    parser.add_argument("--max-tokens", type=int, default=40960, help="tokens scored per dataset (default 40960)")
    parser.add_argument("--seqlen", type=int, default=256,
                        help="perplexity window (default 256, the reference models' training context)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--compress-args", default="",
                        help="extra options for every compression; give it with '=' since it starts with a dash, e.g. "
                             "--compress-args='--xi 0.5 --fit-steps 100'. Every listed method must take them (compress "
                             "refuses another method's option); METHOD:--flag=value sets one method's")
    parser.add_argument("--label", default="", help="appended to each row's method name and output directory (--label=-xi0.5)")
    parser.add_argument("--no-original", action="store_true",
                        help="leave the original's row out of the table (it is still scored once, for the Δ column)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"s{args.seqlen}-t{args.max_tokens}-{'-'.join(args.datasets)}"
    rows = [cached(args.out / f"original-{tag}.result.json",
                   lambda: {"method": "original", "ratio": 0.0, "ppl": evaluate(Path(args.model), args)})]
    print(json.dumps({"method": "original", "ppl": {d: r["ppl"] for d, r in rows[0]["ppl"].items()}}), flush=True)
    for entry in args.methods:
        method, _, flags = entry.partition(":")
        name = entry + args.label
        for ratio in args.ratios:
            out_dir = args.out / f"{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}-{int(round(ratio * 100))}"
            extra = [*(flags.split(",") if flags else []), *shlex.split(args.compress_args)]

            def compress_and_evaluate() -> dict:
                started = time.perf_counter()
                moe_compress("compress", args.model, "-o", str(out_dir), "--method", method, "--ratio", str(ratio),
                             "--calib-file", args.calib_file, "--overwrite", "--no-progress", *extra)
                wall = time.perf_counter() - started
                qc = json.loads((out_dir / "config.json").read_text())["quantization_config"]
                stats = json.loads((out_dir / "moe_compress_stats.json").read_text())
                return {"method": name, "ratio": ratio, "achieved_ratio": qc["achieved_ratio"],
                        "gate_up_ratio": stats.get("projection_ratios", {}).get("gate_up"),
                        "compress_wall_s": round(wall, 1), "peak_rss_mib": round(stats["peak_rss_bytes"] / 2**20),
                        "compress_args": extra, "ppl": evaluate(out_dir, args)}

            rows.append(cached(out_dir.with_name(f"{out_dir.name}-{tag}.result.json"), compress_and_evaluate))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "ppl"}
                             | {"ppl": {d: r["ppl"] for d, r in rows[-1]["ppl"].items()}}), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    base = rows[0]["ppl"]
    print(f"\n| method | target | achieved | " + " | ".join(f"{d} PPL (Δ% ± SE)" for d in args.datasets)
          + " | compress wall s | peak RSS MiB |")
    print("|---" * (5 + len(args.datasets)) + "|")
    for r in rows[0 if not args.no_original else 1:]:
        cells = " | ".join(delta_cell(r["ppl"][d], base[d]) for d in args.datasets)
        print(f"| {r['method']} | {r['ratio']:.2f} | {r.get('achieved_ratio', 0):.4f} | {cells} | "
              f"{r.get('compress_wall_s', '')} | {r.get('peak_rss_mib', '')} |")


if __name__ == "__main__":
    main()
