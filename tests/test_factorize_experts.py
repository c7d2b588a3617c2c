"""methods.base.factorize_experts: experts factorised in parallel threads give the per-expert result."""

import torch

from vllm_moe_compress.format import PROJECTIONS
from vllm_moe_compress.offline.calibration import ExpertStatistics
from vllm_moe_compress.offline.linalg import low_rank_factors, whitening_factor
from vllm_moe_compress.offline.methods.base import factorize_experts, input_gram


def random_layer(experts: int, hidden: int, inter: int, seed: int):
    """Random expert weights and Grams: expert 0 saw no token (zero Grams), the others fewer tokens than
    channels (rank-deficient, damped) or more."""
    g = torch.Generator().manual_seed(seed)
    weights = {"gate": torch.randn(experts, inter, hidden, generator=g, dtype=torch.float64),
               "up": torch.randn(experts, inter, hidden, generator=g, dtype=torch.float64),
               "down": torch.randn(experts, hidden, inter, generator=g, dtype=torch.float64)}
    stats = ExpertStatistics.zeros(experts, hidden, inter)
    for e in range(1, experts):
        tokens = 5 + 4 * e if e % 2 else 3 * hidden
        x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
        h = torch.randn(tokens, inter, generator=g, dtype=torch.float64)
        stats.input_gram[e], stats.inter_gram[e], stats.counts[e] = x.T @ x, h.T @ h, tokens
    return weights, stats


def serial_reference(weights, ranks, stats):
    """The expert-by-expert loop of a3b0189, in this thread."""
    factors = {p: [] for p in PROJECTIONS}
    for e, rank in enumerate(ranks):
        whitening = {}
        if stats is not None:
            whitening["gate"] = whitening["up"] = whitening_factor(input_gram(stats, "gate")[e])
            whitening["down"] = whitening_factor(input_gram(stats, "down")[e])
        for p in PROJECTIONS:
            factors[p].append(None if rank == 0 else low_rank_factors(weights[p][e], rank, whitening.get(p)))
    return factors


def test_parallel_experts_equal_the_serial_loop_and_keep_the_thread_setting():
    weights, stats = random_layer(experts=7, hidden=40, inter=24, seed=8)
    ranks = [6, 0, 9, 9, 12, 6, 3]
    threads = torch.get_num_threads()
    try:
        for workers in (1, 2, 3):
            torch.set_num_threads(workers)
            for with_stats in (stats, None):
                result = factorize_experts(weights, ranks, with_stats)
                assert torch.get_num_threads() == workers
                reference = serial_reference(weights, ranks, with_stats)
                for p in PROJECTIONS:
                    assert len(result[p]) == len(ranks)
                    for got, want in zip(result[p], reference[p]):
                        if want is None:
                            assert got is None
                            continue
                        scale = (want[0] @ want[1]).abs().max().item()
                        torch.testing.assert_close(got[0] @ got[1], want[0] @ want[1], rtol=0, atol=1e-9 * scale)
    finally:
        torch.set_num_threads(threads)
