"""Paired perplexity differences between rows of ``benchmarks/ppl_table.py`` results.

    python -m benchmarks.compare_ppl runs/t256/rfid-40-*.result.json runs/t256/mobe-40-*.result.json

Prints, per dataset both rows scored, ``ppl(B) / ppl(A) − 1`` in % with its standard error paired over the
windows (vllm_moe_compress.offline.evaluation.perplexity.paired_delta), and ``≈`` when the difference is below twice that SE (noise).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from vllm_moe_compress.offline.evaluation.perplexity import paired_delta


def compare(a: dict, b: dict) -> dict[str, tuple[float, float]]:
    out = {}
    for dataset in a["ppl"].keys() & b["ppl"].keys():
        delta, se = paired_delta(a["ppl"][dataset]["window_nll"], b["ppl"][dataset]["window_nll"])
        out[dataset] = (100 * math.expm1(delta), 100 * math.exp(delta) * se)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="row A (the reference of the comparison)")
    parser.add_argument("b", type=Path, help="row B")
    args = parser.parse_args()
    a, b = json.loads(args.a.read_text()), json.loads(args.b.read_text())
    for dataset, (pct, se) in sorted(compare(a, b).items()):
        mark = "≈ " if abs(pct) < 2 * se else ""
        print(f"{dataset}: {b['method']}@{b['ratio']} vs {a['method']}@{a['ratio']}: {mark}{pct:+.2f} % ± {se:.2f}")


if __name__ == "__main__":
    main()
