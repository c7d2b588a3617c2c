"""Triton path of the ``basis_residual`` MoE (RFID-MoE, MoBE; GPU), with the residual hashed inside the tile.

Expert ``e`` of group ``g`` at position ``s`` of its group computes, per factorised projection
(docs/format.md §10; RFID-MoE Eq. 14–17 read as one basis per group; MoBE's mixed bases),

    W_e x = A_e (R_o(e) x) + R̂_e x,    R̂_e[r, c] = scaled_eta_g[π(s·out·in + (row_lo + r)·in + col_lo + c)],

where ``R_o`` is the right factor of the expert's *owner*: its group's ``φ(B_g)`` (one basis per group,
precomputed at load) or, for MoBE's mixed bases, the expert's own ``φ(Σ_j α_ej B_j)`` (materialised once
by ``basis_residual_torch.materialise_mixed_right``, see "MoBE" below). ``π`` is kernels/residual_hash.py's 32-bit hash,
recomputed for every tile entry (:func:`residual_bucket`); R̂_e never exists in memory. With ``T`` tokens,
``P = T·top_k`` routed pairs and the routing weight ``w`` of each pair, the forward is:

0. ``align_pairs`` (×2): pairs grouped by expert, and by owner (one launch less when owners are experts).
1. ``project_ranks``:  ``z = R_o,gate x``, ``R_o,up x`` on owner blocks (each owner's right factor read once per
   block of its pairs)                                                                  → z [owner slots, 2W]
2. ``_expand_residual_kernel`` (gated): ``h = w · silu(A_gate,e z_g + R̂_gate,e x) ⊙ (A_up,e z_u + R̂_up,e x)``,
   z rows gathered through the owner alignment, R̂ hashed in the tile                     → h [slots, I]
3. down, per pair: dense (default) ``expand_ranks``: ``y = W_down,e h``, W_down,e a rank-I block of the
   [E·H, I] view; factorised: ``project_ranks`` + ``_expand_residual_kernel``:
   ``y = A_down,e (R_o,down h) + R̂_down,e h``                                             → y [pairs, H]
4. ``reduce_pairs``:  ``out_t = Σ_k y_tk`` in a fixed order, no atomics                  → out [T, H]

- **Shared right factor.** In stage 1 the pairs are grouped by *owner* (group) rather than by expert, so a
  group's ``φ(B_g)`` is read once per block of the group's pairs instead of once per block of each member:
  at Qwen3-30B shapes (k = 4, H = 2048, I = 768) that is up to 4× fewer right-factor bytes, ~2× fewer
  gate/up bytes in all, once a batch routes tokens to several members of a group. Stage 2 reads each
  pair's z row through the owner alignment's ``slot_of_pair``. A token routed to two experts of one group
  gets ``R_g x`` computed twice (rare at top-8 of 128; keeps one row per pair). The cost is one more
  alignment launch. Down's right factor acts on per-pair ``h``, so down keeps expert blocks.
- **Residual in the tile.** Stage 2 walks ``x`` in chunks of 64 columns; for each it hashes the
  [64 × BLOCK_N] tile's positions in uint32 arithmetic (bit-exact with ``residual_hash.bucket_of``), gathers
  ``s ⊙ η`` of the gate and of the up projection at the same buckets (gate and up share positions, so one
  hash serves both) and runs two more dots. The residual size ``a`` is a compile-time constant, so ``π(t)
  mod a`` compiles to a multiply-shift; a layer with another ``a`` compiles its own variant. Cost: a dense
  GEMM's FLOPs plus ~10 integer operations and one gather per weight entry, per expert block (η is
  369 KiB per group and projection at Qwen3-30B shapes, L2-resident; 14 MiB at Mixtral's) — the price of
  RFID-MoE's residual (BENCHMARKS.md §8.2 measures the CPU path; GPU numbers pending).
- **MoBE (mixed bases).** ``φ`` acts on the mixed matrix, so ``φ(Σ_j α_ej B_j)`` cannot be split over
  tokens; mixing inside the tile would read all ``m = E/k`` bases per expert block (32 at Qwen3 shapes).
  The plugin therefore materialises every expert's right factor once, at load (``prepare_triton``; weights
  only): GPU memory of ``E·K·in`` per factorised projection — the served model is then a plain per-expert
  low-rank model (owners = experts, stage 1 on expert blocks). MoBE has no residual.
- **Tensor parallelism.** ``row_lo`` / ``col_lo`` place this rank's slice in the full matrix: gate/up
  rows start at ``intermediate_lo``, down columns do; the ranks' partial outputs sum to the layer's.
- **Routing weight** folded into ``h`` (stage 2's epilogue); the top-k reduction is stage 4's epilogue.
- **Precision, launch shapes, grouping**: as ``kernels/base_delta_triton.py`` (docs/kernels.md): fp32
  accumulation, activation-dtype intermediates, tensor-core dots for fp16/bf16, IEEE fp32 dots for fp32;
  every size from shapes and from :class:`BasisResidualLayout` (built once per layer from host lists), so
  the forward has no host sync and can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from vllm_moe_compress.kernels import residual_hash
from vllm_moe_compress.kernels.grouped import offsets
from vllm_moe_compress.kernels.lowrank_moe_triton import (
    block_pairs, round_to, segment_products, dot_config, expand_ranks, nonempty, num_warps_for, project_ranks,
    rank_chunk, reduce_pairs,
)
from vllm_moe_compress.kernels.routing import block_size_for
from vllm_moe_compress.kernels.routing_triton import align_pairs

_MIX = tl.constexpr(residual_hash.MIX)
RESIDUAL_CHUNK = 64
"""Input columns per hashed residual tile (the tile is RESIDUAL_CHUNK × 64 outputs)."""


# ------------------------------------------------------------------------------------------------ the hash


@triton.jit
def residual_bucket(position, seed_mix, SIZE: tl.constexpr):
    """π(t) of ``residual_hash.bucket_of`` for uint32 positions ``t``; ``seed_mix`` = seed·0x9E3779B9 mod 2³²."""
    h = position.to(tl.uint32) + seed_mix.to(tl.uint32)  # uint32 arithmetic wraps mod 2³², as the hash wants
    h = ((h >> 16) ^ h) * _MIX
    h = ((h >> 16) ^ h) * _MIX
    h = (h >> 16) ^ h
    return h % SIZE


def seed_mix_of(seed: int) -> int:
    """seed·0x9E3779B9 mod 2³² as a signed 32-bit value (an int32 launch argument; the kernel reads its bits)."""
    mix = (seed * residual_hash.GOLDEN) & residual_hash.MASK32
    return mix - 2**32 if mix >= 2**31 else mix


@triton.jit(do_not_specialize=["seed_mix"])
def _buckets_kernel(position_ptr, bucket_ptr, count, seed_mix, SIZE: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    position = tl.load(position_ptr + index, mask=index < count, other=0)
    tl.store(bucket_ptr + index, residual_bucket(position, seed_mix, SIZE).to(tl.int64), mask=index < count)


def residual_buckets(positions: torch.Tensor, seed: int, size: int) -> torch.Tensor:
    """``residual_hash.bucket_of`` computed by :func:`residual_bucket` on the device (int64 positions < 2³²)."""
    positions = positions.to(torch.int64).contiguous()
    buckets = torch.empty_like(positions)
    _buckets_kernel[(triton.cdiv(positions.numel(), 1024),)](positions, buckets, positions.numel(), seed_mix_of(seed),
                                                             SIZE=size, BLOCK=1024)
    return buckets


# ------------------------------------------------------------------------------------------------ metadata


class Segments(NamedTuple):
    """Where each owner's (group's or expert's) block of a packed factor starts, and its rank, per segment."""

    starts: torch.Tensor
    """int64 [segments, owners]: first packed row (right factors) or column (coefficients)."""
    ranks: torch.Tensor
    """int32 [segments, owners]."""
    width: int
    """Widest rank: the width of each segment of z."""

    @classmethod
    def packed(cls, ranks: list[list[int]], device) -> Segments:
        """Blocks of ``ranks`` (one list per segment) packed one after another, segment after segment."""
        flat = offsets([r for segment in ranks for r in segment])
        starts = [flat[i * len(ranks[0]): (i + 1) * len(ranks[0])] for i in range(len(ranks))]
        return cls(torch.tensor(starts, dtype=torch.int64, device=device),
                   torch.tensor(ranks, dtype=torch.int32, device=device), max(max(r) for r in ranks))


class ResidualPositions(NamedTuple):
    """Where a TP rank's slice sits among the hash positions (``basis_residual_torch.ResidualGeometry``)."""

    matrix_size: int
    """full_out · full_in: the positions one group member spans."""
    full_in: int
    first_offset: int
    """row_lo · full_in + col_lo: the position of the slice's entry (0, 0) in member 0."""

    @classmethod
    def of(cls, full_out: int, full_in: int, row_lo: int, col_lo: int) -> ResidualPositions:
        return cls(full_out * full_in, full_in, row_lo * full_in + col_lo)


@dataclass(frozen=True)
class BasisResidualLayout:
    """Per-layer metadata the kernels read, built once from the config's host lists (no sync when serving)."""

    owner_of_expert: torch.Tensor
    """int32 [E]: whose right factor each expert uses (its group; itself when mixed bases are materialised)."""
    owners_are_experts: bool
    gate_up_right: Segments
    """[2, owners] rows of the packed gate/up right factors."""
    gate_up_coef: Segments
    """[2, E] columns of the packed gate/up coefficients."""
    down_right: Segments | None
    """[1, E]: rows of each expert's owner in the down right factors; None when down is dense."""
    down_coef: Segments
    """[1, E]: columns of the down coefficients; for dense down, expert e's matrix as a rank-I block at e·H·I."""
    expert_group: torch.Tensor
    """int32 [E]: η row of each expert."""
    expert_slot: torch.Tensor
    """int32 [E]: position of each expert in its group (the hash's member offset)."""
    residual_size: int
    seed_mix: int
    gate_up_positions: ResidualPositions
    down_positions: ResidualPositions

    @classmethod
    def from_lists(cls, expert_ranks: list[list[int]], basis_ranks: list[list[int]], groups: list[int],
                   slots: list[int], mixed: bool, hidden: int, part: int, full_intermediate: int, intermediate_lo: int,
                   residual_size: int, seed: int, device) -> BasisResidualLayout:
        """``expert_ranks`` / ``basis_ranks``: [gate, up, down] lists (down all zeros when dense);
        ``groups`` / ``slots``: each expert's group and position; ``part`` this rank's slice of I."""
        if residual_size >= 2**31:  # the η gather indexes with 32-bit bucket offsets
            raise ValueError(f"residual size {residual_size} exceeds the Triton path's 2^31 - 1")
        num_experts = len(groups)
        owner_ranks = expert_ranks if mixed else basis_ranks
        owner = list(range(num_experts)) if mixed else list(groups)

        def per_expert(values, dtype):
            return torch.tensor([values], dtype=dtype, device=device)

        if any(expert_ranks[2]):  # factorised down: each expert reads its owner's rows of the right factor
            owner_start = offsets(owner_ranks[2])
            down_right = Segments(per_expert([owner_start[o] for o in owner], torch.int64),
                                  per_expert([owner_ranks[2][o] for o in owner], torch.int32), max(owner_ranks[2]))
            down_coef = Segments.packed(expert_ranks[2:3], device)
        else:  # dense down: expert e's [H, I/tp] matrix is a rank-I/tp block at row e·H of the [E·H, I/tp] view
            down_right = None
            down_coef = Segments(per_expert([e * hidden * part for e in range(num_experts)], torch.int64),
                                 per_expert([part] * num_experts, torch.int32), part)
        return cls(
            owner_of_expert=torch.tensor(owner, dtype=torch.int32, device=device),
            owners_are_experts=mixed,
            gate_up_right=Segments.packed(owner_ranks[:2], device),
            gate_up_coef=Segments.packed(expert_ranks[:2], device),
            down_right=down_right,
            down_coef=down_coef,
            expert_group=torch.tensor(groups, dtype=torch.int32, device=device),
            expert_slot=torch.tensor(slots, dtype=torch.int32, device=device),
            residual_size=residual_size,
            seed_mix=seed_mix_of(seed),
            gate_up_positions=ResidualPositions.of(full_intermediate, hidden, intermediate_lo, 0),
            down_positions=ResidualPositions.of(hidden, full_intermediate, 0, intermediate_lo),
        )


class BasisResidualWeights(NamedTuple):
    """One TP rank's tensors (the plugin's parameters, vllm_moe_compress/basis_residual.py); unused ones empty."""

    gate_up_coef: torch.Tensor
    """[I/tp, Σ K_gate + Σ K_up]: A_e, gate experts then up experts."""
    gate_up_right: torch.Tensor
    """[Σ owner K_gate + Σ owner K_up, H]: φ(B_g) per group, or each expert's materialised mixed factor."""
    gate_up_eta: torch.Tensor
    """[2m, a]: s ⊙ η_g, gate groups then up groups (empty: no residual)."""
    down: torch.Tensor
    """[E, H, I/tp]: dense down (empty when factorised)."""
    down_coef: torch.Tensor
    """[H, Σ K_down]."""
    down_right: torch.Tensor
    """[Σ owner K_down, I/tp]."""
    down_eta: torch.Tensor
    """[m, a]."""


# ------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _residual_products(a_ptr, stride_a, rows, valid, reduce_dim, eta_ptr, second_eta_offset, row_positions, seed_mix,
                       SIZE: tl.constexpr, TWO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Σ_c a[rows, c] · η[π(row_positions[n] + c)], float32 [BLOCK_M, BLOCK_N]; with ``TWO`` also the same
    with the η vector ``second_eta_offset`` further on (gate and up share the positions, so one hash)."""
    first = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    second = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, reduce_dim, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * stride_a + cols[None, :],
                    mask=valid[:, None] & (cols < reduce_dim)[None, :], other=0.0).to(DOT_DTYPE)
        # Every bucket is < SIZE, so the η loads need no mask; tile entries past the matrix meet zeros of a
        # (columns) or are never stored (rows).
        buckets = residual_bucket(row_positions[None, :] + cols.to(tl.uint32)[:, None], seed_mix, SIZE)
        first = tl.dot(a, tl.load(eta_ptr + buckets).to(DOT_DTYPE), first, input_precision=PRECISION)
        if TWO:
            second = tl.dot(a, tl.load(eta_ptr + second_eta_offset + buckets).to(DOT_DTYPE), second,
                            input_precision=PRECISION)
    return first, second


@triton.jit(do_not_specialize=["seed_mix", "full_in", "first_offset"])
def _expand_residual_kernel(
    z_ptr, stride_z, z_row_ptr,
    coef_ptr, stride_coef_out, stride_coef_rank, seg_start_ptr, seg_rank_ptr, stride_seg,
    a_ptr, stride_a, reduce_dim,
    eta_ptr, stride_eta, second_eta_offset, expert_group_ptr, expert_slot_ptr, seed_mix,
    matrix_size, full_in, first_offset,
    out_ptr, stride_out, out_dim, weight_ptr,
    sorted_pair_ptr, block_expert_ptr, num_pairs, num_experts,
    TOP_K: tl.constexpr, SEG_WIDTH: tl.constexpr, GATED: tl.constexpr, RESIDUAL_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= num_experts:
        return
    slots, pairs, valid = block_pairs(block, sorted_pair_ptr, num_pairs, BLOCK_M)
    z_rows = tl.load(z_row_ptr + pairs, mask=valid, other=0).to(tl.int64)
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ok = outs < out_dim
    first, second = segment_products(z_ptr, stride_z, z_rows, coef_ptr, stride_coef_out, stride_coef_rank,
                                      seg_start_ptr, seg_rank_ptr, stride_seg, expert, valid, outs, out_ok, SEG_WIDTH,
                                      GATED, BLOCK_M, BLOCK_N, BLOCK_R, DOT_DTYPE, PRECISION)
    if RESIDUAL_SIZE > 0:  # R̂_e a: positions t = slot·out·in + (row_lo + n)·in + col_lo + c, hashed per tile
        member = tl.load(expert_slot_ptr + expert).to(tl.int64)
        first_position = (member * matrix_size + first_offset).to(tl.uint32)
        row_positions = first_position + outs.to(tl.uint32) * full_in.to(tl.uint32)
        group_eta = eta_ptr + tl.load(expert_group_ptr + expert).to(tl.int64) * stride_eta
        a_rows = pairs // TOP_K if GATED else slots  # gate/up act on the token's x, down on the slot's h
        residual_first, residual_second = _residual_products(
            a_ptr, stride_a, a_rows, valid, reduce_dim, group_eta, second_eta_offset, row_positions, seed_mix,
            RESIDUAL_SIZE, GATED, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
        first += residual_first
        second += residual_second  # zero unless GATED
    if GATED:  # h = w · silu(gate) · up: the routing weight folded in, so down and the reduction are linear
        weight = tl.load(weight_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
        result = weight[:, None] * first * tl.sigmoid(first) * second
        rows = slots
    else:
        result = first
        rows = pairs
    tl.store(out_ptr + rows[:, None] * stride_out + outs[None, :], round_to(result, out_ptr.dtype.element_ty),
             mask=valid[:, None] & out_ok[None, :])


def expand_residual(z: torch.Tensor, z_row_of_pair: torch.Tensor, coef: torch.Tensor, segments: Segments,
                    a: torch.Tensor, eta: torch.Tensor, positions: ResidualPositions, layout: BasisResidualLayout,
                    blocks, top_k: int, out: torch.Tensor, weights: torch.Tensor, gated: bool) -> torch.Tensor:
    """Stage 2 (gated: ``out[slot] = w·silu(g)·u`` from x) or the factorised down's second half (``out[pair]``
    from h): A_e z plus the hashed residual R̂_e a when ``eta`` is not empty (module doc)."""
    residual_size = layout.residual_size if eta.numel() else 0
    grid = (blocks.block_expert.numel(), triton.cdiv(out.shape[1], 64))
    _expand_residual_kernel[grid](
        z, z.stride(0), z_row_of_pair,
        coef, coef.stride(0), coef.stride(1), segments.starts, segments.ranks, segments.ranks.stride(0),
        a, a.stride(0), a.shape[1],
        nonempty(eta), eta.stride(0) if eta.numel() else 0, (eta.shape[0] // 2) * eta.stride(0) if gated else 0,
        layout.expert_group, layout.expert_slot, layout.seed_mix, *positions,
        out, out.stride(0), out.shape[1], weights,
        blocks.sorted_pair, blocks.block_expert, blocks.num_pairs, layout.expert_slot.numel(),
        TOP_K=top_k, SEG_WIDTH=segments.width, GATED=gated, RESIDUAL_SIZE=residual_size,
        BLOCK_M=blocks.block_m, BLOCK_N=64, BLOCK_R=rank_chunk(blocks), BLOCK_K=RESIDUAL_CHUNK,
        **dot_config(z.dtype), num_warps=num_warps_for(blocks.block_m),
    )
    return out


# ------------------------------------------------------------------------------------------------ forward


def basis_residual_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       weights: BasisResidualWeights, layout: BasisResidualLayout) -> torch.Tensor:
    """Σ_k w_k · expert_{id_k}(x) for one TP rank's slice; x [T, H], topk_* [T, k] → [T, H] in x's dtype."""
    x = x.contiguous()
    top_k = topk_ids.shape[1]
    num_experts = layout.expert_slot.numel()
    intermediate = weights.gate_up_coef.shape[0]
    blocks = align_pairs(topk_ids, num_experts, block_size_for(topk_ids.numel(), num_experts))
    pair_weights = topk_weights.reshape(-1).to(torch.float32).contiguous()

    if layout.owners_are_experts:
        owner_blocks = blocks
    else:
        num_owners = layout.gate_up_right.ranks.shape[1]
        owner_ids = layout.owner_of_expert[topk_ids.long()]
        owner_blocks = align_pairs(owner_ids, num_owners, block_size_for(owner_ids.numel(), num_owners))
    right = layout.gate_up_right
    z = project_ranks(x, weights.gate_up_right, right.starts, right.ranks, right.width, owner_blocks, top_k,
                      a_rows_are_tokens=True)
    h = torch.empty(blocks.sorted_pair.numel(), intermediate, dtype=x.dtype, device=x.device)
    expand_residual(z, owner_blocks.slot_of_pair, weights.gate_up_coef, layout.gate_up_coef, x, weights.gate_up_eta,
                    layout.gate_up_positions, layout, blocks, top_k, h, pair_weights, gated=True)

    pair_outputs = torch.empty(blocks.num_pairs, x.shape[1], dtype=x.dtype, device=x.device)
    down = layout.down_coef
    if layout.down_right is None:  # dense W_down,e: a rank-I block of the [E·H, I] view
        dense = weights.down.reshape(-1, intermediate)
        expand_ranks(h, dense, down.starts, down.ranks, down.width, blocks, top_k, pair_outputs, gated=False)
    else:
        right = layout.down_right
        z_down = project_ranks(h, weights.down_right, right.starts, right.ranks, right.width, blocks, top_k,
                               a_rows_are_tokens=False)
        expand_residual(z_down, blocks.slot_of_pair, weights.down_coef, down, h, weights.down_eta,
                        layout.down_positions, layout, blocks, top_k, pair_outputs, pair_weights, gated=False)
    no_columns = x.new_empty(x.shape[1], 0)  # nothing to gather: only the top-k sum of pair_outputs
    return reduce_pairs(torch.empty_like(x), pair_outputs, h, layout.expert_slot[:0], no_columns, blocks,
                        pair_weights, top_k)
