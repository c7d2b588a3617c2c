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

At run time on the CPU, the bucket indices π(t) of a (seed, size) pair are computed once and kept as an int32
table (``bucket_table``), shared by every layer, projection, group and expert with that pair: positions do not
depend on the layer, and every full group of a model has the same residual size a. The table holds indices
only (4 bytes per group-matrix entry: 2 MiB for the reference model, 25 MiB per distinct a for Qwen3-30B-A3B),
never a per-expert value; above ``TABLE_MAX_ENTRIES`` the indices are regenerated chunk by chunk on every call.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MIX = 0x045D9F3B
MAX_POSITIONS = 2**32
CHUNK_ELEMENTS = 2**20
"""Entries of P regenerated at a time (bounded memory whatever D is)."""
TABLE_MAX_ENTRIES = 2**25
"""Largest cached index table (int32: 128 MiB); group matrices beyond it regenerate π on every call."""

_tables: dict[tuple[int, int, str], torch.Tensor] = {}


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


def bucket_table(seed: int, size: int, num_positions: int, device) -> torch.Tensor | None:
    """π(t) as int32 for t < at least ``num_positions``, computed once per (seed, size, device) and grown on
    demand (doubling, so an expert of a later slot rarely triggers a recomputation); None above
    TABLE_MAX_ENTRIES, where callers regenerate π chunk by chunk instead."""
    if num_positions > TABLE_MAX_ENTRIES:
        return None
    key = (seed, size, str(device))
    table = _tables.get(key)
    if table is None or table.numel() < num_positions:
        length = min(TABLE_MAX_ENTRIES, max(num_positions, 2 * (0 if table is None else table.numel())))
        table = torch.empty(length, dtype=torch.int32, device=device)
        for start in range(0, length, CHUNK_ELEMENTS):
            t = torch.arange(start, min(start + CHUNK_ELEMENTS, length), dtype=torch.int64, device=device)
            table[start : start + t.numel()] = bucket_of(t, seed, size)
        _tables[key] = table
    return table


def residual_matmul(x: torch.Tensor, scaled_eta: torch.Tensor, seed: int, offset: int, full_in: int,
                    rows: range, cols: range) -> torch.Tensor:
    """x @ R̂[rows, cols]ᵀ without materialising more than CHUNK_ELEMENTS of R̂ at a time: x [N, len(cols)].

    The indices come from the cached ``bucket_table`` when it fits, else from the hash, chunk by chunk."""
    out = x.new_empty(x.shape[0], len(rows))
    values = scaled_eta.to(x.dtype)
    table = bucket_table(seed, scaled_eta.numel(), offset + rows.stop * full_in, x.device)
    step = max(1, CHUNK_ELEMENTS // max(1, len(cols)))
    for start in range(rows.start, rows.stop, step):
        chunk = range(start, min(start + step, rows.stop))
        if table is None:
            block = residual_block(values, seed, offset, full_in, chunk, cols)
        else:
            first = offset + chunk.start * full_in
            indices = table[first : first + len(chunk) * full_in].view(len(chunk), full_in)[:, cols.start : cols.stop]
            block = values[indices]
        out[:, start - rows.start : chunk.stop - rows.start] = x @ block.T
    return out


def project_onto_buckets(vec: torch.Tensor, seed: int, size: int, counts: torch.Tensor) -> torch.Tensor:
    """η* = Pᵀ vec(R) = argmin_η ‖vec(R) − P η‖ (closed form, App. C.1, since Pᵀ P = I): ``vec`` is [D]."""
    total = torch.zeros(size, dtype=vec.dtype)
    for start in range(0, vec.numel(), CHUNK_ELEMENTS):
        t = torch.arange(start, min(start + CHUNK_ELEMENTS, vec.numel()), dtype=torch.int64)
        total.index_add_(0, bucket_of(t, seed, size), vec[start : start + t.numel()])
    return total * bucket_scales(counts, vec.dtype)
