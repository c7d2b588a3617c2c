"""vLLM CPU throughput and resident weight bytes: original vs compressed checkpoints, measured in one run.

    python -m benchmarks.vllm_throughput --models ../shared/models/brown-qwen3-moe runs/ppl/d2-20 \
        runs/ppl/d2-40 runs/ppl/d2-60 --prompts ../shared/data/brown/test.txt --out runs/vllm-throughput.json

Offline generation (vLLM's ``LLM``) of a fixed prompt set with greedy decoding and a fixed number of
output tokens per prompt (``ignore_eos``). Models are measured in alternating rounds, each in a fresh
engine process, so machine drift spreads over all of them; each round times ``--repeats`` generations
after a warm-up. Reported: median output tokens/s, resident bytes of all parameters and of the MoE
expert parameters (summed over the loaded model's parameters, i.e. what vLLM holds in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path



def workload_prompts(path: Path, num_prompts: int, prompt_chars: int) -> list[str]:
    """The workload's prompts: the first ``num_prompts`` lines of over 80 characters of ``path``, each cut to
    ``prompt_chars`` (also what ``benchmarks/engine_profile.py`` and ``benchmarks/engine_calls.py`` run)."""
    lines = [l.strip() for l in Path(path).read_text(encoding="utf-8").splitlines() if len(l.strip()) > 80]
    return [l[:prompt_chars] for l in lines[:num_prompts]]


def measure(model: str, prompts: list[str], out_tokens: int, repeats: int) -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # apply_model ships a function to the worker
    done = subprocess.run([sys.executable, "-m", "benchmarks.vllm_worker", model, json.dumps(prompts), str(out_tokens), str(repeats)],
                          capture_output=True, text=True, env=env)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{model}: vLLM run failed\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="the first is the baseline")
    parser.add_argument("--prompts", required=True, help="text file; one prompt per non-empty line is taken")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--prompt-chars", type=int, default=400)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    prompts = workload_prompts(args.prompts, args.num_prompts, args.prompt_chars)
    results = {m: {"rates": []} for m in args.models}
    for round_index in range(args.rounds):
        for model in args.models:
            r = measure(model, prompts, args.output_tokens, args.repeats)
            results[model]["rates"] += r["rates"]
            results[model].update(weight_bytes=r["weight_bytes"], expert_bytes=r["expert_bytes"])
            print(f"round {round_index} {model}: {statistics.median(r['rates']):.1f} tok/s", file=sys.stderr, flush=True)
    base = args.models[0]
    for r in results.values():
        r["median_tokens_per_s"] = statistics.median(r["rates"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("| model | output tok/s (median) | vs original | weight MiB | expert MiB | expert bytes vs original |")
    print("|---|---|---|---|---|---|")
    for model, r in results.items():
        print(f"| {model} | {r['median_tokens_per_s']:.1f} | {r['median_tokens_per_s'] / results[base]['median_tokens_per_s']:.2f}x | "
              f"{r['weight_bytes'] / 2**20:.2f} | {r['expert_bytes'] / 2**20:.2f} | "
              f"{r['expert_bytes'] / results[base]['expert_bytes']:.3f} |")


if __name__ == "__main__":
    main()
