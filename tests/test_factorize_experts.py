"""methods.base.factorize_experts: experts factorised in parallel threads give the per-expert result."""

import torch

from vllm_moe_compress.format import PROJECTIONS
import pytest

from vllm_moe_compress.offline.calibration import ExpertGrams, ExpertStatistics, RoutedBatch
from vllm_moe_compress.offline.linalg import low_rank_factors, whitening_factor
from vllm_moe_compress.offline.methods import base
from vllm_moe_compress.offline.methods.base import (
    as_stored, expert_working_set, factorization_workers, factorize_experts, input_gram,
)


FLOAT32_ROUNDING = 1e-6
"""Relative error of a product of float32-rounded factors (eps32 = 6e-8 per factor entry, summed over the rank)."""


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
                        assert all(f.dtype == torch.float32 and f.is_contiguous() for f in got)  # as stored
                        scale = (want[0] @ want[1]).abs().max().item()
                        torch.testing.assert_close(got[0].double() @ got[1].double(), want[0] @ want[1], rtol=0,
                                                   atol=FLOAT32_ROUNDING * scale)
    finally:
        torch.set_num_threads(threads)


def test_one_worker_above_the_working_set_limit_gives_the_same_factors(monkeypatch):
    """With the limit below one expert's working set the experts run one at a time in this thread (inputs read
    when needed), and the factors are bit for bit those of the parallel workers (one thread each either way)."""
    weights, stats = random_layer(experts=5, hidden=40, inter=24, seed=9)
    ranks = [6, 0, 9, 12, 3]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        parallel = factorize_experts(weights, ranks, stats)
        assert factorization_workers(expert_working_set((24, 40), 40, 2)) == 2
        monkeypatch.setattr(base, "PARALLEL_WORKING_SET", expert_working_set((24, 40), 40, 2))
        assert factorization_workers(expert_working_set((24, 40), 40, 2)) == 1
        serial = factorize_experts(weights, ranks, stats)  # factorised on one thread, as each parallel worker
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    for p in PROJECTIONS:
        for got, want in zip(serial[p], parallel[p]):
            assert (got is None) == (want is None)
            if got is not None:
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("hidden, inter", [(32, 16), (16, 32)])  # gate/up's pass first, or down's
def test_a_group_of_projections_is_the_same_as_all(hidden, inter):
    assert base.pass_order(hidden, inter)[0] == (("gate", "up") if hidden >= inter else ("down",))
    weights, stats = random_layer(experts=4, hidden=hidden, inter=inter, seed=10)
    ranks = [5, 7, 0, 4]
    everything = factorize_experts(weights, ranks, stats)
    down = factorize_experts(weights, ranks, stats, projections=("down",))
    assert list(down) == ["down"]
    for got, want in zip(down["down"], everything["down"]):
        assert (got is None and want is None) or all(torch.equal(g, w) for g, w in zip(got, want))


def test_the_stored_cast_changes_no_stored_byte():
    """float64 → float32 → bfloat16 / float16 is bit for bit the direct cast (torch rounds through float32), on
    random values over many magnitudes and on values a tie apart that only float64 resolves."""
    g = torch.Generator().manual_seed(11)
    values = torch.randn(100_000, generator=g, dtype=torch.float64) * torch.exp(
        4 * torch.randn(100_000, generator=g, dtype=torch.float64))
    ties = torch.tensor([1 + 2**-8 + 2**-40, 1 + 3 * 2**-8 - 2**-40, 1 + 2**-11 + 2**-40, -(1 + 2**-11 - 2**-40)],
                        dtype=torch.float64)
    for x in (values, ties, ties.repeat(64)):
        rounded = as_stored((x[:, None], x[None, :]))
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            assert torch.equal(rounded[0].to(dtype), x[:, None].to(dtype))
            assert torch.equal(rounded[1].to(dtype), x[None, :].to(dtype))


@pytest.mark.parametrize("chunk", [1, 3])
def test_taken_gram_is_owned(chunk):
    """ExpertGrams.take hands over the one-expert chunk itself (no second copy, and asking again recomputes it),
    or a copy from a larger chunk: either way overwriting it leaves the Grams as computed."""
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(20, 6, generator=g)
    batch = RoutedBatch(hidden, torch.arange(20), [7, 13, 0], [0, 7, 20])
    grams = ExpertGrams("input", 3, 6, [batch], chunk)
    reference = [grams[e].clone() for e in range(3)]
    for e in range(3):
        cached = grams[e]
        taken = grams.take(e)
        assert torch.equal(taken, reference[e])
        assert (taken.data_ptr() == cached.data_ptr()) == (chunk == 1)
        taken.fill_(float("nan"))
        assert torch.equal(grams[e], reference[e])
