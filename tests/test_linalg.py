"""Whitened (truncation-aware) SVD, D²-MoE Eq. 6–8 / SVD-LLM."""

import torch

from vllm_moe_compress.offline.linalg import low_rank_factors, output_error, whitening_factor


def correlated_inputs(tokens: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g, dtype=torch.float64) * torch.logspace(0, -3, dim, dtype=torch.float64)
    return torch.randn(tokens, dim, generator=g, dtype=torch.float64) @ mixing


def test_full_rank_reconstructs_exactly_with_and_without_whitening():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 40, generator=g, dtype=torch.float64)
    x = correlated_inputs(500, 40, seed=2)
    for whitening in (None, whitening_factor(x.T @ x)):
        u, v = low_rank_factors(w, 24, whitening)
        assert u.shape == (24, 24) and v.shape == (24, 40)
        torch.testing.assert_close(u @ v, w, rtol=1e-9, atol=1e-9)


def test_whitened_svd_beats_plain_svd_on_correlated_inputs():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 48, generator=g, dtype=torch.float64)
    x = correlated_inputs(1000, 48, seed=4)
    gram = x.T @ x
    for rank in (2, 8, 16):
        plain = output_error(w, torch.matmul(*low_rank_factors(w, rank)), gram)
        whitened = output_error(w, torch.matmul(*low_rank_factors(w, rank, whitening_factor(gram))), gram)
        assert whitened < 0.9 * plain
        # and it equals the direct measurement ‖(W − Ŵ) Xᵀ‖_F
        approx = torch.matmul(*low_rank_factors(w, rank, whitening_factor(gram)))
        assert abs(whitened - torch.linalg.norm((w - approx) @ x.T).item()) < 1e-6 * whitened


def test_whitening_damps_singular_gram_and_skips_empty():
    x = correlated_inputs(5, 16, seed=5)  # 5 tokens: rank-5 Gram of a 16-dim input
    s = whitening_factor(x.T @ x)
    assert s is not None and torch.isfinite(s).all()
    torch.testing.assert_close(s @ s.T, x.T @ x, rtol=0, atol=1e-3 * (x.T @ x).diagonal().mean().item())
    assert whitening_factor(torch.zeros(16, 16, dtype=torch.float64)) is None
