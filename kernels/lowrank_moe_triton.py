"""Triton building blocks for MoE experts stored as ragged low-rank factors (any scheme can reuse them).

Three kernels, all reading routed pairs grouped by expert (``kernels.routing.align_pairs_by_expert``):

- ``project_ranks`` (the V stage): for each slot ``s`` holding pair ``p`` of expert ``e`` and each segment
  ``g`` (e.g. gate and up), ``z[s, g·W + j] = Σ_c a[row, c] · V[start_ge + j, c]`` for ``j < rank_ge``, where
  ``row`` is the pair's token (input ``x``) or the slot itself (a per-slot intermediate), optionally times
  the pair's routing weight. One program: one expert block × one ``BLOCK_R`` chunk of one segment, so V_e
  is read once per block; chunks past the expert's rank exit at once (ragged ranks, rank 0 included).
- ``expand_ranks`` (the U stage): ``Σ_j z[s, g·W + j] · U[n, start_ge + j]`` for one output tile; either one
  segment written per pair (a down projection, before the reduction over top-k), or, gated, two segments
  plus an optional dense per-token addend scattered onto some channels, then ``silu(gate)·up`` written
  per slot (the activation fused into the GEMM epilogue).
- ``token_gemm``: a GEMM once per token, ``out[t] = a_t · Wᵀ``, whose A operand is either a plain row or the
  routing-weighted sum over the token's pairs of gathered slot rows, ``Σ_k w_tk · h[slot(t,k), cols]``
  (``cols`` one map for all pairs, or one per expert: each pair's row scattered onto shared channels),
  and which can add the token's per-pair rows ``Σ_k y[t·top_k + k]``: the routing-weighted reduction of
  the MoE, deterministic (no atomics).

Their inner loops are jit helpers a scheme's own kernels can call: ``rows_product`` (gathered rows of an
activation times gathered rows of a packed weight, over a full reduction dimension) and ``ragged_product``
(per-slot ``z`` times one expert's U columns, over its ragged rank).

Precision: every load is converted to float32 (or to the dot's operand dtype) before arithmetic, and
every product accumulates in float32; intermediates are stored in the activation dtype. Dots take
bf16/fp16 operands on GPUs (tensor cores, exact products) and IEEE float32 for float32 activations. The
Triton interpreter (``TRITON_INTERPRET=1``, CPU tests) stores bfloat16 as raw uint16 bits and computes
garbage for arithmetic on them, while its bf16 → float32 conversion is exact: there every dot runs on
float32 operands converted from the stored values, which gives the same products as a bf16 tensor-core
dot. Its float32 → bf16 conversion truncates where GPUs round to nearest even (a bias of ~1 % over the
five roundings of a forward); ``round_to`` rounds by hand there, so the CPU tests see GPU rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_moe_compress.kernels.routing import ExpertBlocks

INTERPRETED = bool(triton.knobs.runtime.interpret)
"""Whether the kernels below were built for the Triton interpreter (decided when ``triton.jit`` ran)."""

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def rank_chunk(blocks: ExpertBlocks) -> int:
    """Ranks are ragged, so each expert's factors are walked in chunks of this many ranks: 32 for decode
    blocks (more programs over few pairs), 64 for prefill blocks (fewer re-reads of each block's rows)."""
    return 32 if blocks.block_m <= 16 else 64


def num_warps_for(block_rows: int) -> int:
    """Warps per program: 8 for 64-row tiles (at 4 their fp32 accumulators and gathered pointers spill
    registers on sm_90: checked on the ahead-of-time compiled cubins), 4 for the 16-row decode tiles."""
    return 8 if block_rows >= 64 else 4


def dot_config(dtype: torch.dtype) -> dict:
    """Operand dtype and precision of every ``tl.dot`` for activations of ``dtype`` (see module doc)."""
    if dtype not in TL_DTYPE:
        raise TypeError(f"moe_compress Triton kernels take float32, float16 or bfloat16 activations, not {dtype}")
    if INTERPRETED or dtype == torch.float32:
        return {"DOT_DTYPE": tl.float32, "PRECISION": "ieee"}
    return {"DOT_DTYPE": TL_DTYPE[dtype], "PRECISION": "tf32"}


_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRETED)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """float32 ``x`` as ``dtype``, rounded to nearest even (by hand for bf16 under the interpreter)."""
    if _ROUND_BF16_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def nonempty(t: torch.Tensor) -> torch.Tensor:
    """A tensor Triton may take a pointer to: a zero-size one (rank-0 or no-base layers) becomes one element."""
    return t if t.numel() else t.new_zeros((1,) * t.dim())


@triton.jit
def block_pairs(block, sorted_pair_ptr, num_pairs, BLOCK_M: tl.constexpr):
    """Slots of block ``block``, the pair in each, and which slots hold a pair (the others are padding)."""
    slots = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pair_ptr + slots)
    return slots.to(tl.int64), pairs.to(tl.int64), pairs < num_pairs


@triton.jit
def rows_product(a_ptr, stride_a_row, stride_a_col, rows, row_ok, reduce_dim,
                  w_ptr, stride_w_out, stride_w_in, outs, out_ok,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Σ_{c<reduce_dim} a[rows, c] · W[outs, c], float32 [BLOCK_M, BLOCK_N]: gathered rows of a (tokens or
    slots) times gathered rows of W (one expert's block of a packed matrix), reduced in BLOCK_K chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, reduce_dim, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < reduce_dim
        a = tl.load(a_ptr + rows[:, None] * stride_a_row + cols[None, :] * stride_a_col,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(w_ptr + outs[None, :].to(tl.int64) * stride_w_out + cols[:, None] * stride_w_in,
                    mask=out_ok[None, :] & col_ok[:, None], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _project_ranks_kernel(
    a_ptr, stride_a_row, stride_a_col, reduce_dim,
    v_ptr, stride_v_rank, stride_v_col,
    seg_start_ptr, seg_rank_ptr, stride_seg,
    z_ptr, stride_z,
    weight_ptr, sorted_pair_ptr, block_expert_ptr, num_pairs, num_experts,
    TOP_K: tl.constexpr, SEG_WIDTH: tl.constexpr, A_ROWS_ARE_TOKENS: tl.constexpr, SCALE_BY_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    chunks_per_segment = tl.cdiv(SEG_WIDTH, BLOCK_R)
    segment = tl.program_id(1) // chunks_per_segment
    first_rank = (tl.program_id(1) % chunks_per_segment) * BLOCK_R
    expert = tl.load(block_expert_ptr + block)
    if expert >= num_experts:
        return
    rank = tl.load(seg_rank_ptr + segment * stride_seg + expert)
    if first_rank >= rank:
        return
    start = tl.load(seg_start_ptr + segment * stride_seg + expert)
    slots, pairs, valid = block_pairs(block, sorted_pair_ptr, num_pairs, BLOCK_M)
    rows = pairs // TOP_K if A_ROWS_ARE_TOKENS else slots
    ranks = first_rank + tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    acc = rows_product(a_ptr, stride_a_row, stride_a_col, rows, valid, reduce_dim,
                        v_ptr, stride_v_rank, stride_v_col, start + ranks, rank_ok,
                        BLOCK_M, BLOCK_R, BLOCK_K, DOT_DTYPE, PRECISION)
    if SCALE_BY_WEIGHT:
        acc = acc * tl.load(weight_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(z_ptr + slots[:, None] * stride_z + (segment * SEG_WIDTH + ranks)[None, :],
             round_to(acc, z_ptr.dtype.element_ty), mask=valid[:, None] & rank_ok[None, :])


def project_ranks(a: torch.Tensor, v: torch.Tensor, seg_start: torch.Tensor, seg_rank: torch.Tensor, seg_width: int,
                  blocks: ExpertBlocks, top_k: int, a_rows_are_tokens: bool,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """The V stage (module doc): z [slots, segments·seg_width] in a's dtype; ``weights`` [pairs] fp32 scale z."""
    segments, num_experts = seg_rank.shape
    z = torch.empty(blocks.sorted_pair.numel(), max(segments * seg_width, 1), dtype=a.dtype, device=a.device)
    if seg_width == 0:
        return z
    block_r = rank_chunk(blocks)
    grid = (blocks.block_expert.numel(), segments * triton.cdiv(seg_width, block_r))
    _project_ranks_kernel[grid](
        a, a.stride(0), a.stride(1), a.shape[1],
        nonempty(v), v.stride(0), v.stride(1),
        seg_start, seg_rank, seg_rank.stride(0),
        z, z.stride(0),
        weights if weights is not None else z, blocks.sorted_pair, blocks.block_expert, blocks.num_pairs, num_experts,
        TOP_K=top_k, SEG_WIDTH=seg_width, A_ROWS_ARE_TOKENS=a_rows_are_tokens, SCALE_BY_WEIGHT=weights is not None,
        BLOCK_M=blocks.block_m, BLOCK_R=block_r, BLOCK_K=64, **dot_config(a.dtype),
        num_warps=num_warps_for(blocks.block_m),
    )
    return z


@triton.jit
def ragged_product(z_ptr, stride_z, z_col0, u_ptr, stride_u_out, stride_u_rank, start, rank,
                    slots, valid, outs, out_ok,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Σ_{j<rank} z[slots, z_col0 + j] · U[outs, start + j], float32 [BLOCK_M, BLOCK_N]."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < rank
        z = tl.load(z_ptr + slots[:, None] * stride_z + (z_col0 + ranks)[None, :],
                    mask=valid[:, None] & rank_ok[None, :], other=0.0)
        u = tl.load(u_ptr + outs[None, :] * stride_u_out + (start + ranks)[:, None].to(tl.int64) * stride_u_rank,
                    mask=rank_ok[:, None] & out_ok[None, :], other=0.0)
        acc = tl.dot(z.to(DOT_DTYPE), u.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def segment_products(z_ptr, stride_z, z_rows, u_ptr, stride_u_out, stride_u_rank, seg_start_ptr, seg_rank_ptr,
                      stride_seg, expert, valid, outs, out_ok, SEG_WIDTH: tl.constexpr, TWO: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Expert ``expert``'s U times z for segment 0 (z columns from 0) and, with ``TWO``, segment 1 (from
    SEG_WIDTH): two float32 [BLOCK_M, BLOCK_N] tiles (the second zero without ``TWO``)."""
    first = ragged_product(z_ptr, stride_z, 0, u_ptr, stride_u_out, stride_u_rank,
                            tl.load(seg_start_ptr + expert), tl.load(seg_rank_ptr + expert),
                            z_rows, valid, outs, out_ok, BLOCK_M, BLOCK_N, BLOCK_R, DOT_DTYPE, PRECISION)
    second = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TWO:
        second = ragged_product(z_ptr, stride_z, SEG_WIDTH, u_ptr, stride_u_out, stride_u_rank,
                                 tl.load(seg_start_ptr + stride_seg + expert),
                                 tl.load(seg_rank_ptr + stride_seg + expert),
                                 z_rows, valid, outs, out_ok, BLOCK_M, BLOCK_N, BLOCK_R, DOT_DTYPE, PRECISION)
    return first, second


@triton.jit
def _expand_ranks_kernel(
    z_ptr, stride_z, u_ptr, stride_u_out, stride_u_rank,
    seg_start_ptr, seg_rank_ptr, stride_seg,
    out_ptr, stride_out, out_dim,
    addend_ptr, stride_addend, addend_col_ptr, addend_half,
    sorted_pair_ptr, block_expert_ptr, num_pairs, num_experts,
    TOP_K: tl.constexpr, SEG_WIDTH: tl.constexpr, GATED: tl.constexpr, HAS_ADDEND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= num_experts:
        return
    slots, pairs, valid = block_pairs(block, sorted_pair_ptr, num_pairs, BLOCK_M)
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ok = outs < out_dim
    first, second = segment_products(z_ptr, stride_z, slots, u_ptr, stride_u_out, stride_u_rank, seg_start_ptr,
                                      seg_rank_ptr, stride_seg, expert, valid, outs, out_ok, SEG_WIDTH, GATED,
                                      BLOCK_M, BLOCK_N, BLOCK_R, DOT_DTYPE, PRECISION)
    if GATED:
        if HAS_ADDEND:
            addend_col = tl.load(addend_col_ptr + outs, mask=out_ok, other=-1)
            mask = valid[:, None] & (addend_col >= 0)[None, :]
            addend = addend_ptr + (pairs // TOP_K)[:, None] * stride_addend + addend_col[None, :]
            first += tl.load(addend, mask=mask, other=0.0).to(tl.float32)
            second += tl.load(addend + addend_half, mask=mask, other=0.0).to(tl.float32)
        result = first * tl.sigmoid(first) * second
        rows = slots
    else:
        result = first
        rows = pairs
    tl.store(out_ptr + rows[:, None] * stride_out + outs[None, :], round_to(result, out_ptr.dtype.element_ty),
             mask=valid[:, None] & out_ok[None, :])


def expand_ranks(z: torch.Tensor, u: torch.Tensor, seg_start: torch.Tensor, seg_rank: torch.Tensor, seg_width: int,
                 blocks: ExpertBlocks, top_k: int, out: torch.Tensor, gated: bool,
                 addend: torch.Tensor | None = None, addend_col: torch.Tensor | None = None) -> torch.Tensor:
    """The U stage (module doc) into ``out``: gated → ``out[slot] = silu(g)·u`` with g, u from segments 0, 1
    plus ``addend[token, addend_col[n]]`` / ``addend[token, C + addend_col[n]]`` where ``addend_col[n] ≥ 0``
    (C = addend width / 2); not gated → ``out[pair]`` = segment 0's product."""
    has_addend = addend is not None and addend.numel() > 0
    grid = (blocks.block_expert.numel(), triton.cdiv(out.shape[1], 64))
    _expand_ranks_kernel[grid](
        z, z.stride(0), nonempty(u), u.stride(0), u.stride(1),
        seg_start, seg_rank, seg_rank.stride(0),
        out, out.stride(0), out.shape[1],
        addend if has_addend else z, addend.stride(0) if has_addend else 0,
        addend_col if has_addend else seg_start, addend.shape[1] // 2 if has_addend else 0,
        blocks.sorted_pair, blocks.block_expert, blocks.num_pairs, seg_rank.shape[1],
        TOP_K=top_k, SEG_WIDTH=seg_width, GATED=gated, HAS_ADDEND=has_addend,
        BLOCK_M=blocks.block_m, BLOCK_N=64, BLOCK_R=rank_chunk(blocks), **dot_config(z.dtype),
        num_warps=num_warps_for(blocks.block_m),
    )
    return out


@triton.jit
def _token_gemm_kernel(
    a_ptr, stride_a, a_col_ptr, reduce_dim,
    w_ptr, stride_w_out, stride_w_in,
    out_ptr, stride_out, out_dim, num_tokens,
    pair_rows_ptr, stride_pair_rows, slot_of_pair_ptr, weight_ptr, pair_expert_ptr, stride_col_expert,
    TOP_K: tl.constexpr, GATHER_PAIRS: tl.constexpr, COLS_PER_EXPERT: tl.constexpr, ADD_PAIR_ROWS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    token_ok = tokens < num_tokens
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ok = outs < out_dim
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, reduce_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < reduce_dim
        if GATHER_PAIRS:  # Σ_k w_tk · a[slot(t, k), cols]: the routing-weighted sum, formed in the A operand
            shared_cols = tl.load(a_col_ptr + ks, mask=k_ok, other=0)
            a = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
            for j in range(TOP_K):  # a loop, not unrolled: one gathered tile live at a time (no spills)
                pair = tokens * TOP_K + j
                slot = tl.load(slot_of_pair_ptr + pair, mask=token_ok, other=0).to(tl.int64)
                weight = tl.load(weight_ptr + pair, mask=token_ok, other=0.0).to(tl.float32)
                if COLS_PER_EXPERT:  # the pair's expert's own column map; -1: no column (contributes 0)
                    expert = tl.load(pair_expert_ptr + pair, mask=token_ok, other=0)
                    cols = tl.load(a_col_ptr + expert[:, None] * stride_col_expert + ks[None, :],
                                   mask=token_ok[:, None] & k_ok[None, :], other=-1)
                    col_ok = cols >= 0
                else:
                    cols = shared_cols[None, :]
                    col_ok = token_ok[:, None] & k_ok[None, :]
                rows = tl.load(a_ptr + slot[:, None] * stride_a + cols, mask=col_ok, other=0.0)
                a += weight[:, None] * rows.to(tl.float32)
            a = round_to(a, a_ptr.dtype.element_ty)
        else:
            a = tl.load(a_ptr + tokens[:, None] * stride_a + ks[None, :], mask=token_ok[:, None] & k_ok[None, :],
                        other=0.0)
        w = tl.load(w_ptr + outs[None, :] * stride_w_out + ks[:, None] * stride_w_in,
                    mask=out_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if ADD_PAIR_ROWS:  # Σ_k y[t·top_k + k]: the per-pair outputs reduced over top-k, in a fixed order
        for j in range(TOP_K):
            acc += tl.load(pair_rows_ptr + (tokens * TOP_K + j)[:, None] * stride_pair_rows + outs[None, :],
                           mask=token_ok[:, None] & out_ok[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + tokens[:, None] * stride_out + outs[None, :], round_to(acc, out_ptr.dtype.element_ty),
             mask=token_ok[:, None] & out_ok[None, :])


def _launch_token_gemm(a, a_col, reduce_dim, w, out, pair_rows, slot_of_pair, weights, top_k, gather,
                       pair_experts=None):
    num_tokens = out.shape[0]
    # Decode-sized batches: narrow output tiles, so more programs share the weight reads.
    block_t, block_n = (16, 32) if num_tokens <= 16 else (64, 64)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(out.shape[1], block_n))
    w = nonempty(w)
    _token_gemm_kernel[grid](
        a, a.stride(0), a_col, reduce_dim,
        w, w.stride(0), w.stride(1),
        out, out.stride(0), out.shape[1], num_tokens,
        pair_rows if pair_rows is not None else out, pair_rows.stride(0) if pair_rows is not None else 0,
        slot_of_pair, weights, pair_experts if pair_experts is not None else slot_of_pair, a_col.stride(0),
        TOP_K=top_k, GATHER_PAIRS=gather, COLS_PER_EXPERT=pair_experts is not None, ADD_PAIR_ROWS=pair_rows is not None,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=64, **dot_config(out.dtype), num_warps=num_warps_for(block_t),
    )
    return out


def token_gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` once per token, float32 accumulation, in x's dtype: x [T, K], w [N, K] → [T, N]."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    return _launch_token_gemm(x, x, x.shape[1], w, out, None, x, x, 1, gather=False)


def reduce_pairs(out: torch.Tensor, pair_rows: torch.Tensor | None, slot_rows: torch.Tensor, cols: torch.Tensor,
                 w: torch.Tensor, blocks: ExpertBlocks, weights: torch.Tensor, top_k: int,
                 pair_experts: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE reduction into ``out`` [T, N]: ``out[t] = (Σ_k w_tk · slot_rows[slot(t,k), cols]) · wᵀ
    + Σ_k pair_rows[t·top_k + k]``; ``w`` [N, C] may have zero columns, ``pair_rows`` may be None. ``cols``
    [C] is one column map for every pair, or, with ``pair_experts`` (int32 [pairs], each pair's expert),
    one map per expert, [E, C], where -1 marks a column the expert's rows do not have (it adds 0)."""
    return _launch_token_gemm(slot_rows, nonempty(cols), w.shape[1], w, out, pair_rows, blocks.slot_of_pair,
                              weights, top_k, gather=True, pair_experts=pair_experts)
