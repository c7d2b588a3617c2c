"""Random compressed layers shared by the kernel tests (the C++ CPU op's and the Triton interpreter's)."""

import torch

from vllm_moe_compress.format import PROJECTIONS
from vllm_moe_compress.offline.schemes.sparse_lowrank import ExpertUnits, SparseLowRankLayer


def random_sparse_lowrank_layer(gen, hidden, intermediate, plan, with_base) -> SparseLowRankLayer:
    """``plan``: per expert (sparse units s, low-rank units m, (gate, up, down) rank); float64 weights scaled so
    every stage is O(1)."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) / max(shape[-1], 1) ** 0.5

    experts = []
    for s, m, ranks in plan:
        channels = torch.randperm(intermediate, generator=gen)
        sparse = {p: randn(hidden, s) if p == "down" else randn(s, hidden) for p in PROJECTIONS}
        lowrank = {p: None if not k else (randn(hidden, k), randn(k, m)) if p == "down" else (randn(m, k), randn(k, hidden))
                   for p, k in zip(PROJECTIONS, ranks)}
        experts.append(ExpertUnits(channels[:s].sort().values, sparse, channels[s: s + m].sort().values, lowrank))
    return SparseLowRankLayer(hidden, intermediate, experts, randn(hidden, intermediate) if with_base else None)
