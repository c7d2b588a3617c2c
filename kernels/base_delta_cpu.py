"""CPU path of the ``base_delta`` MoE: per-expert contiguous factor blocks prepared once at load, and one C++
op per layer (``kernels/csrc/lowrank_moe_cpu.cpp``) that loops over the experts that received tokens.

For expert e with routed tokens X_e (rows of x) and routing weights w_e, with S the scatter of the C base
channels onto the I intermediate channels:

    g = U_g,e (V_g,e X_e) + S B_g X_e        u = U_u,e (V_u,e X_e) + S B_u X_e        h = silu(g) ⊙ u
    out += U_d,e (w_e ⊙ V_d,e h)             (routing weight applied on the rank side: r_d values per pair)
    out += B_down (Σ_pairs w h[channels])    (base down once per token on the weighted sum, D²-MoE §3.5)

``B_gu x`` runs once per token for the whole batch. Every product reads a prepared block in place (the op's
small-row loops for an expert's few tokens, ``at::mm`` for many; no copy of factors per call, no multiply by
another expert's factors), so a call reads the base once plus each routed expert's factors once: at decode
that is ~2–3× fewer bytes than the dense experts. Activations and intermediates are fp32 in the op (fp64 for
fp64 factors) whatever the factors' dtype.

Prepared layout (``BaseDeltaCpuLayout``, built by ``prepare`` from the packed tensors of
``kernels/base_delta_torch.py``):

    meta         int64 [E, 7]    per expert: first row of its block in gu_v, r_g, r_u, first row of its
                                 block in d_v, r_d, first row of its block in gu_ut, first row in d_ut
    gu_v         [Rg + Ru, H]    expert e's gate V rows then its up V rows, experts in order
    gu_ut        [Rg + Ru, I]    the matching rows of U_gateᵀ, U_upᵀ
    d_v          [Rd, I]         as packed (already one row block per expert)
    d_ut         [Rd, H]         U_downᵀ, rows as d_v
    base_gu      [2C, H]         as packed
    base_down    [C, H]          B_downᵀ; or B_down [H, C] where ``cpu_extension.base_down_projected`` (bf16,
                                 not in the pair layout, an op built with AVX512-BF16 dot products)
    base_down_norms [C]          ‖B_down[:, j]‖₂ of the stored values, fp32 (fp64 for fp64 factors): D²-MoE's
                                 dynamic pruning scores C_j = ‖B_down[:, j]‖·‖h[:, j]‖ per batch (Eq. 9)
                                 without a pass over the base down per call
    base_channels int64 [C]
    pairs        int64 [1]       1: gu_ut, d_ut and base_down in the pair layout (below)

The expand-side tensors (gu_ut, d_ut, base_down as Bᵀ) are row-major, or, for bf16 where the op's prefill products
run on AMX (``cpu_extension.pair_layout``), in the pair layout AMX's brgemm reads in place
(``cpu_extension.pair_rows``: per block — an expert's gate Uᵀ, its up Uᵀ, its down Uᵀ, the base down — rows 2p
and 2p + 1 interleaved, an odd block padded with a zero row; meta's first rows count the pad rows).

Products into the ranks read V [r, in] (``x Vᵀ``), products out of them read Uᵀ [r, out] (``z Uᵀ``): at
decode both are GEMVs over rows of ≥ 768 contiguous values, where the packed U [out, r] gives rows of r
(~200) values and measured ~2–3× slower per byte on one core.

Compute dtype: the loaded dtype, except bf16/fp16 on CPUs without native support (no AVX512-BF16 / AMX):
there a bf16 GEMV is ~100× slower than fp32 (measured: BENCHMARKS.md §10), so ``prepare`` converts the factors
to fp32 and logs it; activations are converted per call and the output returned in x's dtype.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import torch

from .base_delta_torch import rank_offsets
from .cpu_extension import base_down_layout, cpu_ops, on_huge_pages, pair_layout, pairs_flag, row_blocks

logger = logging.getLogger(__name__)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU path multiplies in: ``dtype`` if this CPU has native matmul for it, else fp32."""
    native = {torch.bfloat16: torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported(),
              torch.float16: torch.cpu._is_amx_fp16_supported()}
    if native.get(dtype, True):
        return dtype
    _log_conversion(dtype)
    return torch.float32


@functools.cache
def _log_conversion(dtype: torch.dtype) -> None:
    """Once per process and dtype, not once per layer."""
    logger.info("moe_compress: this CPU has no native %s matmul (no AVX512-BF16/AMX); the CPU MoE path "
                "converts the expert weights to float32 once at load (2x their %s bytes; the loaded %s copies "
                "are freed)", dtype, dtype, dtype)


class BaseDeltaCpuLayout(NamedTuple):
    meta: torch.Tensor
    gu_v: torch.Tensor
    gu_ut: torch.Tensor
    d_v: torch.Tensor
    d_ut: torch.Tensor
    base_gu: torch.Tensor
    base_down: torch.Tensor
    base_down_norms: torch.Tensor
    base_channels: torch.Tensor
    pairs: torch.Tensor


def prepare(ranks: torch.Tensor, gate_up_u: torch.Tensor, gate_up_v: torch.Tensor, down_u: torch.Tensor,
            down_v: torch.Tensor, base_gate_up: torch.Tensor | None = None, base_down: torch.Tensor | None = None,
            base_channels: torch.Tensor | None = None) -> BaseDeltaCpuLayout:
    """The per-expert contiguous layout (module docstring) of one layer's packed tensors; builds the C++ op."""
    cpu_ops()
    dtype = compute_dtype(gate_up_v.dtype)
    (gate, up, down), starts = ranks.tolist(), rank_offsets(ranks)
    hidden = gate_up_v.shape[1]
    pairs = pair_layout(dtype)
    meta, rows, v_row = [], [], 0
    for e, (rg, ru, rd) in enumerate(zip(gate, up, down)):
        (gs, us, ds) = (s[e] for s in starts)
        meta.append([v_row, rg, ru, ds, rd])
        rows += [torch.arange(gs, gs + rg), torch.arange(us, us + ru)]
        v_row += rg + ru
    order = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
    gu_ut, gu_starts = row_blocks(gate_up_u.T[order], [r for rg_ru in zip(gate, up) for r in rg_ru], pairs)
    d_ut, d_starts = row_blocks(down_u.T, down, pairs)
    for e, row in enumerate(meta):
        row += [gu_starts[2 * e], d_starts[e]]

    def prepared(t):
        return on_huge_pages(t, dtype)

    has_base = base_gate_up is not None and base_gate_up.numel() > 0
    norms_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return BaseDeltaCpuLayout(
        torch.tensor(meta, dtype=torch.int64).reshape(len(gate), 7),
        prepared(gate_up_v[order]), prepared(gu_ut), prepared(down_v), prepared(d_ut),
        prepared(base_gate_up) if has_base else gate_up_v.new_zeros(0, hidden, dtype=dtype),
        prepared(base_down_layout(base_down, dtype, pairs)) if has_base
        else gate_up_v.new_zeros(0, hidden, dtype=dtype),
        base_down.to(dtype).to(norms_dtype).norm(dim=0) if has_base else torch.zeros(0, dtype=norms_dtype),
        base_channels.long().contiguous() if has_base else torch.zeros(0, dtype=torch.int64), pairs_flag(pairs))


def base_delta_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layout: BaseDeltaCpuLayout,
                   num_dynamic_drop: int = 0) -> torch.Tensor:
    """Σ_k w_k · expert_{id_k}(x) for every token; x [T, H], topk_* [T, k] → [T, H] in x's dtype."""
    return cpu_ops().base_delta(x, topk_ids, topk_weights, *layout, num_dynamic_drop)
