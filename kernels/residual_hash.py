"""The shared one-hot projection P of RFID-MoE's residual reconstruction (§3.4, Eq. 15–17), from a seed.

P ∈ R^{D×a} maps a per-group vector η ∈ R^a onto the D = k·out·in entries of a vectorised group matrix:
row t of P has a single non-zero, 1/√n_q in column q = π(t), where n_q = |{t : π(t) = q}|. Hence
Pᵀ P = I_a (for every bucket q that some row hits) and

    vec(R̂)_t = s_{π(t)} · η_{π(t)},        s_q = 1/√n_q.

π is not drawn with a random-number generator but computed by a 32-bit integer hash of (seed, t), so any
kernel can regenerate it inside its tile without a table (docs/format.md gives the exact arithmetic):

    x = (t + seed·0x9E3779B9) mod 2³²
    x = ((x >> 16) xor x)·0x045D9F3B mod 2³²      (twice)
    x = (x >> 16) xor x
    π(t) = x mod a

Entry t of a group matrix stacked from its k members (member j, row r, column c of an out×in matrix) is
t = j·out·in + r·in + c. Only the seed and the per-bucket counts n_q are stored; never P.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MIX = 0x045D9F3B
MAX_POSITIONS = 2**32
CHUNK_ELEMENTS = 2**20
"""Entries of P regenerated at a time (bounded memory whatever D is)."""


def bucket_of(positions: torch.Tensor, seed: int, size: int) -> torch.Tensor:
    """π(t) for int64 ``positions`` t < 2³² (int64 arithmetic, no overflow: products stay below 2⁶⁰)."""
    x = (positions + (seed * GOLDEN)) & MASK32
    x = (((x >> 16) ^ x) * MIX) & MASK32
    x = (((x >> 16) ^ x) * MIX) & MASK32
    x = (x >> 16) ^ x
    return x % size


def check_size(num_positions: int, size: int) -> None:
    if not 0 < size <= num_positions:
        raise ValueError(f"residual size {size} must be in [1, {num_positions}] (the group matrix's entries)")
    if num_positions > MAX_POSITIONS:
        raise ValueError(f"group matrix of {num_positions} entries exceeds the hash's 2^32 positions")


def bucket_counts(num_positions: int, seed: int, size: int) -> torch.Tensor:
    """n_q for q < ``size``: how many of the D = ``num_positions`` rows of P hit column q (int64 [size])."""
    check_size(num_positions, size)
    counts = torch.zeros(size, dtype=torch.int64)
    for start in range(0, num_positions, CHUNK_ELEMENTS):
        t = torch.arange(start, min(start + CHUNK_ELEMENTS, num_positions), dtype=torch.int64)
        counts += torch.bincount(bucket_of(t, seed, size), minlength=size)
    return counts


def bucket_scales(counts: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """s_q = 1/√n_q, and 0 for a bucket no row hits (its η entry then has no effect)."""
    counts = counts.to(dtype)
    return torch.where(counts > 0, counts.clamp_min(1).rsqrt(), torch.zeros_like(counts))


def block_positions(offset: int, full_in: int, rows: range, cols: range, device=None) -> torch.Tensor:
    """Positions t of the block ``rows × cols`` of a matrix whose entry (0, 0) is position ``offset``."""
    r = torch.arange(rows.start, rows.stop, dtype=torch.int64, device=device)
    c = torch.arange(cols.start, cols.stop, dtype=torch.int64, device=device)
    return offset + r[:, None] * full_in + c[None, :]


def residual_block(scaled_eta: torch.Tensor, seed: int, offset: int, full_in: int, rows: range,
                   cols: range) -> torch.Tensor:
    """The block ``rows × cols`` of R̂ = reshape(P η): ``scaled_eta`` is s ⊙ η (one group's, [a])."""
    t = block_positions(offset, full_in, rows, cols, scaled_eta.device)
    return scaled_eta[bucket_of(t, seed, scaled_eta.numel())]


def residual_matmul(x: torch.Tensor, scaled_eta: torch.Tensor, seed: int, offset: int, full_in: int,
                    rows: range, cols: range) -> torch.Tensor:
    """x @ R̂[rows, cols]ᵀ without materialising more than CHUNK_ELEMENTS of R̂ at a time: x [N, len(cols)]."""
    out = x.new_empty(x.shape[0], len(rows))
    step = max(1, CHUNK_ELEMENTS // max(1, len(cols)))
    for start in range(rows.start, rows.stop, step):
        chunk = range(start, min(start + step, rows.stop))
        block = residual_block(scaled_eta, seed, offset, full_in, chunk, cols).to(x.dtype)
        out[:, start - rows.start : chunk.stop - rows.start] = x @ block.T
    return out


def project_onto_buckets(vec: torch.Tensor, seed: int, size: int, counts: torch.Tensor) -> torch.Tensor:
    """η* = Pᵀ vec(R) = argmin_η ‖vec(R) − P η‖ (closed form, App. C.1, since Pᵀ P = I): ``vec`` is [D]."""
    total = torch.zeros(size, dtype=vec.dtype)
    for start in range(0, vec.numel(), CHUNK_ELEMENTS):
        t = torch.arange(start, min(start + CHUNK_ELEMENTS, vec.numel()), dtype=torch.int64)
        total.index_add_(0, bucket_of(t, seed, size), vec[start : start + t.numel()])
    return total * bucket_scales(counts, vec.dtype)
