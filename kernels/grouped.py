"""What every torch MoE path shares: routed (token, expert) pairs sorted by expert, and packed-block offsets."""

from __future__ import annotations

from itertools import accumulate
from typing import NamedTuple

import torch


def offsets(sizes: list[int]) -> list[int]:
    """Start of every block when blocks of ``sizes`` are concatenated."""
    return [0, *accumulate(sizes)][: len(sizes)]


class PairsByExpert(NamedTuple):
    token_of: torch.Tensor
    """int64 [T·k]: the token of each routed pair, pairs sorted by expert (stable)."""
    weight_of: torch.Tensor
    """[T·k, 1]: each pair's routing weight, in the activation dtype."""
    counts: list[int]
    """pairs per expert: expert e's pairs are the run of ``counts[e]`` after ``sum(counts[:e])``."""


def pairs_by_expert(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                    dtype: torch.dtype) -> PairsByExpert:
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    token_of = torch.arange(num_tokens, device=topk_ids.device).repeat_interleave(top_k)[order]
    weight_of = topk_weights.reshape(-1)[order].to(dtype)[:, None]
    return PairsByExpert(token_of, weight_of, torch.bincount(flat, minlength=num_experts).tolist())
