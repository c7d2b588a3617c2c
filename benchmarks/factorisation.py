"""CPU time of the whitened factorisation of Qwen3-30B-A3B-shaped experts (BENCHMARKS.md §12.3).

    python -m benchmarks.factorisation --experts 4 --rounds 2

Random weights (gate/up [768, 2048], down [2048, 768]) and Grams from ``--tokens`` random routed tokens per
expert (64: a layer's average with 8 × 128 calibration tokens, top-8 of 128 experts, so both Grams are
rank-deficient and damped, as in the real run). Compares, in alternating rounds of the same process, a3b0189's
expert-by-expert loop (dense W·S, damping through an identity matrix: the reference formulas of
tests/test_linalg.py) on ``torch.get_num_threads()`` intra-op threads, with ``methods.base.factorize_experts``
(that many experts at once, one thread each). Prints wall and process CPU seconds per expert, the load average,
and the largest relative difference of the products U·V between the two.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from tests.test_linalg import previous_whitening_factor
from vllm_moe_compress.format import PROJECTIONS
from vllm_moe_compress.offline import linalg
from vllm_moe_compress.offline.calibration import ExpertStatistics
from vllm_moe_compress.offline.methods.base import factorize_experts, input_gram

HIDDEN, INTERMEDIATE = 2048, 768


def random_experts(experts: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weights = {p: 0.02 * torch.randn(experts, *shape, generator=g, dtype=torch.float64) for p, shape in
               (("gate", (INTERMEDIATE, HIDDEN)), ("up", (INTERMEDIATE, HIDDEN)), ("down", (HIDDEN, INTERMEDIATE)))}
    stats = ExpertStatistics.zeros(experts, HIDDEN, INTERMEDIATE)
    for e in range(experts):
        x = torch.randn(tokens, HIDDEN, generator=g).double()
        h = torch.randn(tokens, INTERMEDIATE, generator=g).double()
        stats.input_gram[e], stats.inter_gram[e], stats.counts[e] = x.T @ x, h.T @ h, tokens
    return weights, stats


def previous_loop(weights, ranks, stats):
    """a3b0189's factorize_experts: expert after expert, on the caller's intra-op threads, with its whitening
    (tests/test_linalg.py's reference) and its dense W·S product (as that test swaps it in)."""
    factors = {p: [] for p in PROJECTIONS}
    with mock.patch.object(linalg, "times_lower_triangular", lambda weight, lower: weight @ lower):
        for e, rank in enumerate(ranks):
            whitening = {"gate": previous_whitening_factor(input_gram(stats, "gate")[e])}
            whitening["up"] = whitening["gate"]
            whitening["down"] = previous_whitening_factor(input_gram(stats, "down")[e])
            for p in PROJECTIONS:
                factors[p].append(linalg.whitened_factors(weights[p][e].double(), rank, whitening[p]))
    return factors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="routed tokens per expert (the Grams' rank)")
    parser.add_argument("--rank", type=int, default=217)
    args = parser.parse_args()
    weights, stats = random_experts(args.experts, args.tokens)
    ranks = [args.rank] * args.experts
    runs = {f"a3b0189 loop ({torch.get_num_threads()} intra-op threads)": previous_loop,
            f"factorize_experts ({torch.get_num_threads()} experts x 1 thread)": factorize_experts}
    outputs = {}
    for round_ in range(args.rounds):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            outputs[name] = run(weights, ranks, stats)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            load = open("/proc/loadavg").read().split()[0]
            print(f"round {round_} {name}: per expert wall {wall / args.experts:.3f} s, "
                  f"CPU {cpu / args.experts:.3f} s; load average {load}", flush=True)
    before, after = outputs.values()
    worst = max(((b[0] @ b[1] - a[0] @ a[1]).norm() / b[0].matmul(b[1]).norm()).item()
                for p in PROJECTIONS for b, a in zip(before[p], after[p]))
    print(f"largest relative Frobenius difference of U·V: {worst:.2e}")


if __name__ == "__main__":
    main()
