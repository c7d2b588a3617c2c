"""RFID-MoE Fig. 4: the scaled reconstruction loss per Adam step, gate and up of one layer, for several
checkpoints (e.g. MoBE vs RFID-MoE at the same ratio), from their moe_compress_stats.json.

    python -m benchmarks.fit_curves runs/rfid-ppl/r40/mobe-40 runs/rfid-ppl/r40/rfid-40 --layer 3 \
        --out runs/rfid-ppl/fit-curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vllm_moe_compress.format import STATS_FILE  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--layer", default="0")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ckpt in args.checkpoints:
        stats = json.loads((ckpt / STATS_FILE).read_text())
        fit = stats["layers"][str(args.layer)]["fit"]
        for ax, proj in zip(axes, ("gate", "up")):
            curve = fit[proj]["loss_curve"]
            ax.plot(range(len(curve)), curve, label=f"{ckpt.name} (best {min(curve):.4f})")
    for ax, proj in zip(axes, ("gate", "up")):
        ax.set(title=f"layer {args.layer} {proj}_proj", xlabel="Adam step", ylabel="scaled MSE", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
