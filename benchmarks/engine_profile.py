"""Where a vLLM CPU engine's time goes for one model: ``cProfile`` of the engine run in this process.

    VLLM_CPU_KVCACHE_SPACE=2 python -m benchmarks.engine_profile MODEL_DIR --prompts ../shared/data/brown/test.txt \
        --out runs/profile-MODEL.txt

The workload is ``benchmarks/vllm_throughput.py``'s (the first ``--num-prompts`` lines of over 80 characters, cut to
``--prompt-chars``; greedy, ``--output-tokens`` each, ``ignore_eos``): one warm-up generation, then ``--repeats``
profiled ones. ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps vLLM's engine core and worker in this process, so the
profile sees the model's forward (the compiled graph's wrapper and each op it calls, e.g. the plugin's
``torch.ops.moe_compress_cpu.*``); the throughput printed includes the profiler's overhead. Written to ``--out``: the
top functions by own time, then by cumulative time (BENCHMARKS.md §10.19).
"""

import argparse
import cProfile
import os
import pstats
import time
from pathlib import Path

from benchmarks.vllm_throughput import workload_prompts
from benchmarks.vllm_worker import workload_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--prompts", required=True, help="text file; one prompt per line of over 80 characters")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-chars", type=int, default=400)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="profiled generations after the warm-up (3)")
    parser.add_argument("--out", type=Path, required=True, help="the profile's text report")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    prompts = workload_prompts(args.prompts, args.num_prompts, args.prompt_chars)
    llm, params = workload_engine(args.model, prompts, args.output_tokens)
    llm.generate(prompts, params, use_tqdm=False)
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    for _ in range(args.repeats):
        llm.generate(prompts, params, use_tqdm=False)
    profile.disable()
    rate = args.repeats * len(prompts) * args.output_tokens / (time.perf_counter() - start)
    print(f"{args.model}: {rate:.1f} output tok/s under the profiler; report in {args.out}")
    with open(args.out, "w") as report:
        stats = pstats.Stats(profile, stream=report)
        stats.sort_stats("tottime").print_stats(45)
        stats.sort_stats("cumulative").print_stats(60)


if __name__ == "__main__":
    main()
