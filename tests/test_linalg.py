"""Whitened (truncation-aware) SVD, D²-MoE Eq. 6–8 / SVD-LLM."""

import torch

from vllm_moe_compress.offline import linalg

from vllm_moe_compress.offline.linalg import (
    low_rank_factors, output_error, times_lower_triangular, whitened_factors, whitening_factor,
)


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


def previous_whitening_factor(gram: torch.Tensor) -> torch.Tensor | None:
    """whitening_factor as it was before the damping was added in place (a3b0189): the reference."""
    gram = 0.5 * (gram + gram.T)
    scale = gram.diagonal().mean().item()
    if scale <= 0.0:
        return None
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(gram)
    damping = 1e-6
    while info.item() != 0:
        factor, info = torch.linalg.cholesky_ex(gram + damping * scale * eye)
        damping *= 10.0
    return factor


def test_times_lower_triangular_is_the_dense_product():
    g = torch.Generator().manual_seed(6)
    for rows, n in ((7, 1), (5, 3), (33, 40), (40, 129)):  # fewer and more columns than TRIANGLE_BLOCKS
        lower = torch.randn(n, n, generator=g, dtype=torch.float64).tril()
        matrix = torch.randn(rows, n, generator=g, dtype=torch.float64)
        torch.testing.assert_close(times_lower_triangular(matrix, lower), matrix @ lower, rtol=1e-12, atol=1e-12)


def test_factors_equal_the_previous_formula_on_rank_deficient_and_full_grams(monkeypatch):
    """whitened_factors and whitening_factor against the dense formula of a3b0189 (W @ S, damping with an identity
    matrix), wide and tall weights, Grams from fewer tokens than channels (damped) and from more. The reference
    factors are whitened_factors with the dense product W @ S in place of times_lower_triangular (the only change
    to that function since)."""
    g = torch.Generator().manual_seed(7)
    for out, dim, tokens, rank in ((48, 96, 12, 20), (96, 48, 10, 20), (40, 64, 400, 16), (64, 40, 400, 16)):
        w = torch.randn(out, dim, generator=g, dtype=torch.float64)
        x = torch.randn(tokens, dim, generator=g, dtype=torch.float64)
        gram = x.T @ x
        original = gram.clone()
        s, reference_s = whitening_factor(gram), previous_whitening_factor(gram)
        assert torch.equal(gram, original)  # the damping is added to a copy
        torch.testing.assert_close(s, reference_s, rtol=1e-12, atol=1e-12 * reference_s.abs().max().item())
        u, v = whitened_factors(w, rank, s)
        with monkeypatch.context() as dense:
            dense.setattr(linalg, "times_lower_triangular", lambda weight, lower: weight @ lower)
            ru, rv = whitened_factors(w, rank, reference_s)
        scale = (ru @ rv).abs().max().item()
        torch.testing.assert_close(u @ v, ru @ rv, rtol=0, atol=1e-9 * scale)
        torch.testing.assert_close(u, ru, rtol=0, atol=1e-7 * ru.abs().max().item())  # same canonical signs



def test_symmetrise_in_place_is_bit_for_bit_the_mean_with_the_transpose(monkeypatch):
    g = torch.Generator().manual_seed(13)
    monkeypatch.setattr(linalg, "SYMMETRISE_BLOCK", 7)  # several block pairs, a ragged last block
    for n in (1, 7, 30):
        m = torch.randn(n, n, generator=g, dtype=torch.float64)
        expected = (m + m.T) * 0.5
        assert linalg.symmetrise_(m) is m
        assert torch.equal(m, expected)


def test_whitening_factor_overwriting_the_gram_is_the_same_factor():
    """overwrite=True symmetrises and damps the caller's Gram in place: the factor is bit for bit the one formed
    from a copy, for a rank-deficient (damped) Gram, a full-rank one and a slightly asymmetric one."""
    g = torch.Generator().manual_seed(14)
    for tokens, dim in ((6, 40), (90, 40)):
        x = torch.randn(tokens, dim, generator=g, dtype=torch.float64)
        asymmetric = x.T @ x + 1e-9 * torch.randn(dim, dim, generator=g, dtype=torch.float64)
        for gram, overwritten in ((x.T @ x, tokens < dim), (asymmetric, True)):
            original = gram.clone()
            from_copy = whitening_factor(gram)
            assert torch.equal(gram, original)
            assert torch.equal(whitening_factor(gram, overwrite=True), from_copy)
            if overwritten:  # damped (rank-deficient) or symmetrised in place
                assert not torch.equal(gram, original)
