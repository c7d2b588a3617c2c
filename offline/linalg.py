"""Low-rank factorisation with activation whitening (SVD-LLM, used by D²-MoE Eq. 6–8).

For a weight W [out, in] whose inputs have Gram matrix G = XᵀX [in, in] (X: tokens × in), the output
error of an approximation Ŵ is ‖(W − Ŵ)Xᵀ‖²_F = ‖(W − Ŵ)S‖²_F with S the lower Cholesky factor of G
(G = S Sᵀ). Truncating the SVD of W·S is therefore optimal for that error (truncation-aware SVD):

    W S = U Σ Vᵀ,   ΔU = U_k √Σ_k,   ΔV = √Σ_k V_kᵀ S⁻¹            (D²-MoE Eq. 6–8)

All arithmetic here is float64: the Grams are sums of many rank-one terms whose small eigenvalues decide the
whitening, and the whitened factors come from the eigendecomposition of (W S)(W S)ᵀ or (W S)ᵀ(W S), whose
eigenvalues are the squared singular values (float32 would keep only the largest few digits of them). The
factors returned are float64 too; methods.base.factorize_experts casts each expert's to float32 as soon as they
are formed (what is stored is float32 at most).
"""

from __future__ import annotations

import torch

DAMPING_START = 1e-6
"""First relative ridge added to a Gram matrix that is not positive definite (times its mean diagonal)."""


def whitening_factor(gram: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor | None:
    """Lower Cholesky factor S of the symmetrised ``gram`` (float64), with damping when it is not positive definite.

    Damping follows SVD-LLM's retry (a ridge on the diagonal) but grows geometrically from
    ``DAMPING_START · mean(diag)`` until the factorisation succeeds. Returns ``None`` for an all-zero
    Gram (an expert that received no calibration tokens): callers then use plain SVD, the only
    choice that does not depend on data the expert never saw.

    Memory: the factor plus one n × n float64 matrix that is symmetrised and damped in place: a copy of
    ``gram``, or with ``overwrite`` (a float64 Gram the caller owns and no longer needs) ``gram`` itself, which
    then holds the damped symmetrised Gram. At n = 14336 (Mixtral-8x7B's intermediate width) each is 1.5 GiB.
    """
    if overwrite and gram.dtype == torch.float64:
        gram = symmetrise_(gram)
    else:
        gram = (gram + gram.T).to(torch.float64).mul_(0.5)
    scale = gram.diagonal().mean().item()
    if scale <= 0.0:
        return None
    factor, info = torch.linalg.cholesky_ex(gram)
    damping, diagonal = DAMPING_START, gram.diagonal().clone()
    while info.item() != 0:
        del factor  # the failed factor goes before the next is allocated
        gram.diagonal().copy_(diagonal + damping * scale)  # gram + damping · scale · I, in place
        factor, info = torch.linalg.cholesky_ex(gram)
        damping *= 10.0
    return factor


SYMMETRISE_BLOCK = 1024
"""Rows and columns of the blocks :func:`symmetrise_` averages at a time (an 8 MiB float64 temporary)."""


def symmetrise_(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` replaced in place by (M + Mᵀ) / 2, block pair by block pair, and returned.

    Element (i, j) becomes (M[i, j] + M[j, i]) · 0.5, bit for bit what ``(M + M.T) * 0.5`` computes (the sum is
    commutative in IEEE arithmetic), without that n × n temporary."""
    n = matrix.shape[0]
    for a in range(0, n, SYMMETRISE_BLOCK):
        for b in range(a, n, SYMMETRISE_BLOCK):
            upper = matrix[a : a + SYMMETRISE_BLOCK, b : b + SYMMETRISE_BLOCK]
            lower = matrix[b : b + SYMMETRISE_BLOCK, a : a + SYMMETRISE_BLOCK]
            mean = (upper + lower.T).mul_(0.5)
            upper.copy_(mean)
            lower.copy_(mean.T)
    return matrix


def low_rank_factors(
    weight: torch.Tensor, rank: int, whitening: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors (U [out, r], V [r, in]) with U V ≈ ``weight``.

    Without ``whitening`` this is the plain truncated SVD (Eckart–Young in the Frobenius norm); with
    the Cholesky factor S of the input Gram it minimises the output error on the calibration inputs
    (:func:`whitened_factors`).
    """
    weight = weight.to(torch.float64)
    if whitening is not None:
        return whitened_factors(weight, rank, whitening)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def whitened_factors(weight: torch.Tensor, rank: int, whitening: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The truncation-aware factors ΔU = U_k √Σ_k, ΔV = √Σ_k V_kᵀ S⁻¹ of A = W S (module docstring), float64.

    The top-k singular triplets come from the eigendecomposition of the smaller of A Aᵀ and Aᵀ A rather than
    from an SVD of A: LAPACK's SVD of A took 20–40× longer when S comes from a rank-deficient Gram (an expert
    with fewer routed calibration tokens than input channels: its singular values fall into one large cluster
    at the damping level), measured on one Qwen3-30B-A3B-shaped expert. The result is the same truncation
    (same singular values and subspaces, to float64 rounding; within a cluster of equal singular values any
    basis is optimal), but a singular vector's sign is LAPACK's choice in the SVD and ours here: the largest
    entry of each vector of U is made positive. For a wide A (out ≤ in): ΔV = Σ_k^{-1/2} U_kᵀ W, because
    V_kᵀ = Σ_k⁻¹ U_kᵀ A; no inverse of S is needed. Singular values below the float64 noise of the largest
    (A rank-deficient, rank above its rank) get zero factors instead of noise.
    """
    scaled = times_lower_triangular(weight, whitening)
    wide = scaled.shape[0] <= scaled.shape[1]
    evals, evecs = torch.linalg.eigh(scaled @ scaled.T if wide else scaled.T @ scaled)
    evals, evecs = evals.flip(0)[:rank], evecs.flip(1)[:, :rank]  # descending
    noise = evals[:1].clamp_min(0) * max(scaled.shape) * torch.finfo(torch.float64).eps
    sigma = torch.where(evals > noise, evals, torch.zeros_like(evals)).sqrt()
    root = sigma.sqrt()
    inv_root = torch.where(root > 0, 1 / root, torch.zeros_like(root))
    if wide:
        u = evecs * _positive_peak_signs(evecs)
        return u * root, inv_root[:, None] * (u.T @ weight)
    left = (scaled @ evecs) * inv_root  # A V_k Σ_k^{-1/2} = U_k √Σ_k
    signs = _positive_peak_signs(left)
    left, right = left * signs, (root * signs)[:, None] * evecs.T
    # right · S⁻¹ without forming the inverse: solve Sᵀ Xᵀ = rightᵀ (Sᵀ is upper triangular).
    return left, torch.linalg.solve_triangular(whitening.T, right.T, upper=True).T


TRIANGLE_BLOCKS = 4
"""Column blocks :func:`times_lower_triangular` splits a triangular factor into (BENCHMARKS.md §12.3)."""


def times_lower_triangular(matrix: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """``matrix @ lower`` for a lower-triangular ``lower`` [n, n], skipping its zero upper blocks.

    Column block [a, b) of the product is ``matrix[:, a:] @ lower[a:, a:b]`` (rows of ``lower`` above a are zero
    there), so with ``TRIANGLE_BLOCKS`` blocks the multiply-adds drop to (blocks + 1) / (2 · blocks) of the dense
    product: 62.5 % for 4 (27 % less CPU time than the dense product at 768 × 2048 · 2048², one thread; 8 and 16
    smaller blocks saved less). The skipped terms are exact zeros: the result is the dense product up to the
    order of float64 summation.
    """
    n = lower.shape[0]
    edges = [n * i // TRIANGLE_BLOCKS for i in range(TRIANGLE_BLOCKS + 1)]
    return torch.cat([matrix[:, a:] @ lower[a:, a:b] for a, b in zip(edges, edges[1:]) if b > a], dim=1)


def _positive_peak_signs(vectors: torch.Tensor) -> torch.Tensor:
    """±1 per column of ``vectors`` making each column's largest-magnitude entry positive (a canonical sign)."""
    peak = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))[0]
    return torch.where(peak < 0, -1.0, 1.0).to(vectors.dtype)


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(W − Ŵ)Xᵀ‖_F computed from the Gram matrix: sqrt(tr((W−Ŵ) G (W−Ŵ)ᵀ))."""
    diff = (weight - approx).to(torch.float64)
    return float(torch.einsum("oi,ij,oj->", diff, gram.to(torch.float64), diff).clamp_min(0).sqrt())


EIGEN_FLOOR = 1e-10
"""Eigenvalues of a Gram below this fraction of its largest are raised to it before E^{-1/2} (rank-deficient
activations: directions never seen cost nothing to get wrong, but must not blow up the inverse)."""


def gram_eigen(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E, V = EVD(G) of the symmetrised Gram ``gram`` (float64, eigenvalues ascending): the whitening
    :func:`eigen_whitened_factors` applies, computed once for the projections that share a Gram (RS-MoE's gate
    and up rows of one expert)."""
    return torch.linalg.eigh(0.5 * (gram + gram.T).to(torch.float64))


def eigen_whitened_factors(weight: torch.Tensor, eigen: tuple[torch.Tensor, torch.Tensor],
                           rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware SVD through the eigendecomposition of the input Gram (RS-MoE §3.4, SVD-LLM V2).

        E, V = EVD(XᵀX);   U_w S_w V_wᵀ = SVD(W V E^{1/2});   W_com = U_k S_k,   W_rec = V_kᵀ E^{-1/2} Vᵀ

    ``eigen`` is (E, V) from :func:`gram_eigen` of the Gram XᵀX. Returns (W_com [out, k], W_rec [k, in]);
    W_com W_rec minimises ‖(W − Ŵ)Xᵀ‖_F over rank-k Ŵ. An all-zero Gram (an expert that saw no calibration
    token) gives the plain truncated SVD.
    """
    weight = weight.to(torch.float64)
    evals, evecs = eigen
    top = evals.max().item() if evals.numel() else 0.0
    if top <= 0.0:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return u[:, :rank] * s[:rank], vh[:rank]
    root = evals.clamp_min(EIGEN_FLOOR * top).sqrt()
    u, s, vh = torch.linalg.svd(weight @ (evecs * root), full_matrices=False)
    return u[:, :rank] * s[:rank], (vh[:rank] / root) @ evecs.T
