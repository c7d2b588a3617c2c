"""The C++ CPU MoE paths (kernels/base_delta_cpu.py, kernels/sparse_lowrank_cpu.py, kernels/basis_residual_cpu.py)
against float64 dense math on the materialised experts, with fresh random inputs: ragged ranks including 0, idle
experts, no base, top-1 and top-k, a single token, dynamic base pruning; basis_residual's shared and MoBE-mixed
bases, hashed residual, dense and factorised down, TP 2; fp64, fp32 and bf16 factors (bf16 computed in fp32 on
CPUs without native bf16). Every op test runs three times: with the small-row loops (products of ≤ 8 activation
rows, kernels/csrc/lowrank_moe_cpu.cpp) on a layout copied onto huge pages, the loops with the active experts split
over 2 threads, and with at::mm everywhere (limit 0, AMX off); on CPUs with AMX-BF16 a fourth time with every even-K
bf16 product on AMX tiles (limit 0, ``set_amx_gemm(1)``), and the loops' runs use AMX above the limit as the plugin
does; the "~10 tokens per expert" cases put experts over the limit (GEMM) in the loops' runs, the "18 experts" /
"16 experts" cases at ~67–75 tokens each put experts over 64 rows, split over the threads for their number alone.
Where the op is built for AVX512-BF16, the loops' runs take bf16 projects of 5–32 rows on its dot products
(bf16_dots: K not a multiple of 32, rows of B not a multiple of 4, more than 8 rows of a all occur in these cases).
``test_amx_pair_layout_matches_float64_dense_math``:
the pair layout of the AMX path at ≥ 16 rows per expert (brgemm) and at 1–4 (the loops), factor blocks over its
chunk sizes, odd ranks and intermediate sizes, per scheme."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vllm_moe_compress.base_delta import BaseDeltaScheme
from vllm_moe_compress.kernels import (base_delta_cpu, base_delta_torch, basis_residual_cpu, cpu_extension,
                                      sparse_lowrank_cpu)
from vllm_moe_compress.kernels.base_delta_torch import rank_offsets
from vllm_moe_compress.format.names import base_channels_name, unit_channels_name
from vllm_moe_compress.format.schemes.base_delta import BaseDeltaLayer
from vllm_moe_compress.format.schemes.basis_residual import BasisResidualLayer
from vllm_moe_compress.sparse_lowrank import SparseLowRankScheme

from random_layers import (NAMES, PREFIX, basis_residual_dense_float64, basis_residual_shard, load_scheme,
                           random_basis_residual_layer, random_sparse_lowrank_layer)

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def amx_usable() -> bool:
    """Whether the op's AMX path runs here: AMX-BF16, the tile state granted and ATen's brgemm packing available
    (``set_amx_gemm(1)`` keeps 0 otherwise)."""
    ops = cpu_extension.cpu_ops()
    previous = ops.set_amx_gemm(1)
    usable = bool(ops.set_amx_gemm(previous))
    return usable


@pytest.fixture(params=[(8, False, True, None), (8, True, False, None), (0, False, False, 0), (0, False, False, 1)],
                ids=["small-row loops, layout on huge pages", "small-row loops, experts split over 2 threads",
                     "at::mm only", "AMX tiles for every bf16 product"])
def small_row_limit(request, monkeypatch):
    """The C++ ops' products of ≤ limit activation rows use the single-pass loops; 0 sends all to at::mm, or with
    ``set_amx_gemm(1)`` every bf16 one of even K to the AMX path (skipped on CPUs without it; None: as
    ``cpu_ops`` set it, i.e. AMX above the limit where the CPU has it). With the split (set_expert_parallel(1),
    the default; the other cases set 0), two threads share the active experts when every expert has ≤ 64 rows or
    there are ≥ 8 active experts per thread (each writing its experts' rows of the per-pair outputs); without it the
    experts run in turn, each product's column blocks split over torch's threads. With huge pages, every tensor of the prepared layout is a ``huge_page_copy`` (at these sizes
    ``on_huge_pages`` would keep torch's allocation)."""
    ops = cpu_extension.cpu_ops()
    limit, split, huge, amx = request.param
    if amx and not amx_usable():
        pytest.skip("no AMX-BF16 (or no brgemm packing in this torch)")
    if huge:
        monkeypatch.setattr(cpu_extension, "HUGE_PAGE_MIN_BYTES", 0)
    previous, previous_split, threads = ops.set_small_row_limit(limit), ops.set_expert_parallel(int(split)), \
        torch.get_num_threads()
    previous_amx = ops.set_amx_gemm(amx) if amx is not None else None
    if split:
        torch.set_num_threads(2)
    yield limit
    ops.set_small_row_limit(previous)
    ops.set_expert_parallel(previous_split)
    if previous_amx is not None:
        ops.set_amx_gemm(previous_amx)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 17, 300])
def test_small_product_matches_float64(rows, dtype):
    """The loops alone (``torch.ops.moe_compress_cpu.product``: a b for b = Wᵀ of a row-major W, or a row-major
    b) against float64 matmul: lengths with vector tails, row counts off the row block, more columns than one
    column block, a strided a; 9 and 17 rows stay on the loops for blocks under 128 KiB (on_loops), whose expands
    from 8 rows (4 on AVX2) take the register tiles (on_tiles: 37 × 48 with an odd inner size and a column tail of one
    vector, 20 × 256 a reference-model expand); the 300 × 257 block
    is over it in every dtype (a block the size of real layers': rows longer than the prefetch distance), on the
    loops up to the row limit (4 rows in bf16, 8 else; at::mm above); 300 rows take at::mm everywhere, in bf16 with
    the rows rounded up to 320 (gemm_extent). at::mm is also covered by the op tests' "at::mm only" runs. AMX off:
    with it, bf16 products amx_product takes (projects of even inner size) leave the loops from 16 rows
    (kAmxCachedBlockRows)."""
    ops = cpu_extension.cpu_ops()
    previous_amx = ops.set_amx_gemm(0)
    try:
        check_small_products(ops, rows, dtype)
    finally:
        ops.set_amx_gemm(previous_amx)


def check_small_products(ops, rows: int, dtype) -> None:
    gen = torch.Generator().manual_seed(rows)
    for inner, outer in ((70, 13), (2048, 6), (37, 300), (1, 5), (16, 1), (300, 257), (37, 48), (20, 256)):
        wide = torch.randn(rows, inner + 3, generator=gen, dtype=torch.float64)
        a = wide[:, 2:2 + inner]  # row stride inner + 3
        w = torch.randn(outer, inner, generator=gen, dtype=torch.float64)
        for b in (w.t(), w.t().contiguous()):  # dot form, axpy form
            expected = a.to(dtype).double() @ b.to(dtype).double()  # only the product's rounding is measured
            got = ops.product(a.to(dtype), b.to(dtype) if b.is_contiguous() else w.to(dtype).t())
            assert got.dtype == dtype and got.shape == expected.shape
            error = float((got.double() - expected).norm() / expected.norm())
            assert error <= TOLERANCE[dtype] / 4, (inner, outer, b.is_contiguous(), error)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_huge_page_copy_is_an_exact_contiguous_copy(dtype):
    """``huge_page_copy`` (the prepared layouts' memory): the values of a strided source converted to ``dtype``,
    contiguous, 2 MiB-aligned, sizes off and on whole 2 MiB pages and empty; freeing it leaves the source alone."""
    gen = torch.Generator().manual_seed(7)
    for rows, cols in ((3, 5), (512, 1024), (0, 7), (1, 1)):  # 512 × 1024 fp32: 2 MiB exactly
        source = torch.randn(cols, rows, generator=gen, dtype=torch.float64).T
        copy = cpu_extension.cpu_ops().huge_page_copy(source, dtype)
        assert copy.dtype == dtype and copy.shape == source.shape and copy.is_contiguous()
        assert copy.data_ptr() % (2 << 20) == 0
        assert torch.equal(copy, source.to(dtype))
        del copy
        assert torch.isfinite(source).all()
    small = cpu_extension.on_huge_pages(source, dtype)  # under HUGE_PAGE_MIN_BYTES: torch's allocation
    assert torch.equal(small, source.to(dtype)) and small.is_contiguous()


def packed_layer(ranks: list[list[int]], hidden: int, inter: int, channels: int, gen: torch.Generator):
    """Random packed base_delta tensors (kernels/base_delta_torch.py layout), float64."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) / shape[-1] ** 0.5

    table = torch.tensor(ranks)
    rgu, rd = sum(ranks[0]) + sum(ranks[1]), sum(ranks[2])
    base_channels = torch.randperm(inter, generator=gen)[:channels].sort().values
    return (table, randn(inter, max(rgu, 1))[:, :rgu], randn(rgu, hidden), randn(hidden, max(rd, 1))[:, :rd],
            randn(rd, inter), randn(2 * channels, hidden), randn(hidden, channels), base_channels)


def dense_experts(table, gate_up_u, gate_up_v, down_u, down_v, base_gate_up, base_down, base_channels):
    """W_gate, W_up [E, I, H] and W_down [E, H, I] in float64: scatter(B) + U V per expert."""
    (gate, up, down), starts = table.tolist(), rank_offsets(table)
    inter, hidden = gate_up_u.shape[0], gate_up_v.shape[1]
    c = base_channels.numel()
    full = [torch.zeros(inter, hidden, dtype=torch.float64) for _ in range(2)] + [torch.zeros(hidden, inter, dtype=torch.float64)]
    full[0][base_channels], full[1][base_channels] = base_gate_up[:c], base_gate_up[c:]
    full[2][:, base_channels] = base_down
    weights = []
    for e in range(len(gate)):
        (gs, us, ds), (rg, ru, rd) = (s[e] for s in starts), (gate[e], up[e], down[e])
        weights.append((full[0] + gate_up_u[:, gs:gs + rg] @ gate_up_v[gs:gs + rg],
                        full[1] + gate_up_u[:, us:us + ru] @ gate_up_v[us:us + ru],
                        full[2] + down_u[:, ds:ds + rd] @ down_v[ds:ds + rd]))
    return weights


def dense_moe(x, ids, weights, experts):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t].tolist(), weights[t].tolist()):
            g, u, d = experts[e]
            out[t] += w * (d @ (F.silu(g @ x[t]) * (u @ x[t])))
    return out


def routing(tokens, num_experts, top_k, gen, idle=()):
    allowed = torch.tensor([e for e in range(num_experts) if e not in idle])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:top_k]] for _ in range(tokens)])
    return ids.to(torch.int32), torch.rand(tokens, top_k, generator=gen).softmax(1)


CASES = {  # name: (ranks [gate, up, down] per expert, base channels, tokens, top_k, idle experts)
    "ragged ranks with zeros, idle expert": ([[5, 0, 3, 7, 2], [4, 6, 0, 7, 1], [3, 0, 5, 0, 8]], 13, 9, 2, {4}),
    "no base": ([[5, 2, 3, 7, 2], [5, 2, 3, 7, 2], [4, 4, 4, 4, 4]], 0, 7, 3, set()),
    "single token, top-k over all experts": ([[3, 4, 5, 6, 0], [3, 4, 5, 6, 0], [1, 2, 3, 0, 4]], 10, 1, 5, set()),
    "top-1": ([[2, 8, 1, 3, 4], [2, 8, 1, 3, 4], [2, 8, 1, 3, 4]], 16, 11, 1, {0, 2}),
    "all ranks zero (base only)": ([[0] * 5, [0] * 5, [0] * 5], 12, 6, 2, set()),
    # every channel in the base (D²-MoE's default): its product read as the experts' addend, no scatter or gather
    "every channel in the base": ([[5, 0, 3, 7, 2], [4, 6, 0, 7, 1], [3, 0, 5, 0, 8]], 20, 12, 2, set()),
    "2-8 tokens per expert": ([[9, 4, 17, 6, 11], [5, 12, 3, 8, 16], [7, 2, 13, 19, 4]], 9, 16, 2, set()),
    "~10 tokens per expert (GEMM)": ([[6, 3, 8, 2], [4, 7, 1, 5], [3, 6, 2, 9]], 11, 40, 1, set()),
    # ≥ 8 active experts per thread with GEMM-sized experts: split over the threads too (split_experts)
    "18 experts, ~10 tokens each (GEMMs, experts split)": ([[(3 * e) % 7 for e in range(18)],
                                                          [(5 * e + 2) % 9 for e in range(18)],
                                                          [(e + 4) % 6 for e in range(18)]], 7, 90, 2, set()),
    # experts over 64 rows: split only for their number (≥ 8 per thread), GEMMs / AMX panels inside the region
    "18 experts, ~67 tokens each (split for the expert count)": ([[(3 * e) % 7 for e in range(18)],
                                                                [(5 * e + 2) % 9 for e in range(18)],
                                                                [(e + 4) % 6 for e in range(18)]], 7, 600, 2, set()),
}


@pytest.mark.parametrize("case", CASES)
def test_cpu_path_matches_float64_dense_math(case, small_row_limit):
    ranks, channels, tokens, top_k, idle = CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    hidden, inter = 24, 20
    tensors = packed_layer(ranks, hidden, inter, channels, gen)
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    ids, weights = routing(tokens, len(ranks[0]), top_k, gen, idle)
    reference = dense_moe(x, ids, weights, dense_experts(*tensors))
    for dtype, tolerance in TOLERANCE.items():
        layout = base_delta_cpu.prepare(tensors[0], *(t.to(dtype) for t in tensors[1:7]), tensors[7])
        out = base_delta_cpu.base_delta_moe(x.to(dtype), ids, weights, layout)
        assert out.dtype == dtype
        error = float((out.double() - reference).norm() / reference.norm())
        assert error <= tolerance, (dtype, error)


@pytest.mark.parametrize("full_base", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dynamic_pruning_matches_the_torch_path(dtype, full_base):
    """D²-MoE Eq. 9: the same base-down columns dropped per batch as kernels/base_delta_torch.py (float64 on the
    same values). bf16: on AMX CPUs the base down is in the pair layout, its 13 channels padded with a zero row.
    full_base: all 18 channels in the base (the op drops columns of the weighted sum itself, not of a gather)."""
    gen = torch.Generator().manual_seed(1)
    channels = 18 if full_base else 14 if dtype == torch.float64 else 13
    tensors = packed_layer([[3, 1, 4, 2], [2, 2, 2, 2], [1, 3, 0, 2]], 16, 18, channels, gen)
    tensors = tuple(t.to(dtype).double() if t.is_floating_point() else t for t in tensors)  # the values stored
    x = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    ids, weights = routing(5, 4, 2, gen)
    layout = base_delta_cpu.prepare(*(t.to(dtype) if t.is_floating_point() else t for t in tensors))
    assert int(layout.pairs) == (dtype == torch.bfloat16 and amx_usable())
    for drop in (0, 3, tensors[-1].numel()):
        expected = base_delta_torch.base_delta_moe(x, ids, weights, *tensors, num_dynamic_drop=drop)
        out = base_delta_cpu.base_delta_moe(x.to(dtype), ids, weights, layout, num_dynamic_drop=drop).double()
        if dtype == torch.float64:
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        else:
            assert float((out - expected).norm() / expected.norm()) <= TOLERANCE[dtype], drop


def test_dynamic_pruning_without_the_prepared_column_norms_is_refused_with_one_line():
    """The op scores D²-MoE's columns from ``base_down_norms`` (prepared once at load, not recomputed from the base
    down per call); a layout without them, or with another count, stops with one line when dynamic pruning is on,
    and runs as before when it is off."""
    gen = torch.Generator().manual_seed(2)
    tensors = [t.float() if t.is_floating_point() else t
               for t in packed_layer([[3, 1, 4, 2], [2, 2, 2, 2], [1, 3, 0, 2]], 16, 18, 14, gen)]
    layout = base_delta_cpu.prepare(*tensors)
    torch.testing.assert_close(layout.base_down_norms, tensors[6].norm(dim=0))  # ‖B_down[:, j]‖ per channel
    x = torch.randn(5, 16, generator=gen)
    ids, weights = routing(5, 4, 2, gen)
    for norms in (layout.base_down_norms[:0], layout.base_down_norms[:-1], layout.base_down_norms.double()):
        stale = layout._replace(base_down_norms=norms)
        base_delta_cpu.base_delta_moe(x, ids, weights, stale)
        with pytest.raises(RuntimeError, match=r"dynamic pruning needs base_down_norms, 14 contiguous values"):
            base_delta_cpu.base_delta_moe(x, ids, weights, stale, num_dynamic_drop=3)


UNIT_CASES = {  # name: (tokens, top_k, per expert (sparse units, low-rank units, ranks), base, idle experts)
    "mixed, ragged, rank 0, nothing kept, idle expert": (13, 3, [
        (5, 7, (3, 0, 4)), (6, 9, (2, 5, 0)), (12, 0, (0, 0, 0)), (0, 11, (4, 3, 6)), (0, 0, (0, 0, 0)),
        (3, 4, (0, 0, 0))], True, {0}),
    "no base": (9, 2, [(4, 6, (3, 2, 5)), (0, 9, (6, 6, 1)), (10, 3, (1, 0, 2)), (7, 0, (0, 0, 0))], False, set()),
    "single token, top-5": (1, 5, [(e % 4, 6 + e % 5, (e % 3, 1 + e % 4, e % 5)) for e in range(6)], True, set()),
    "top-1": (10, 1, [(3, 0, (0, 0, 0)), (0, 8, (2, 2, 2)), (4, 4, (1, 3, 2))], True, set()),
    "2-8 tokens per expert": (14, 2, [(5, 9, (4, 3, 6)), (3, 11, (7, 2, 5)), (8, 6, (2, 6, 3)), (6, 7, (3, 3, 3))],
                              True, set()),
    "~10 tokens per expert (GEMM)": (30, 1, [(5, 9, (4, 3, 6)), (3, 11, (7, 2, 5)), (8, 6, (2, 6, 3))],
                                                 True, set()),
    "18 experts, ~10 tokens each (GEMMs, experts split)": (90, 2, [(e % 5, 3 + e % 7, (e % 3, 1 + e % 4, e % 5))
                                                                   for e in range(18)], True, set()),
    "18 experts, ~67 tokens each (split for the expert count)": (600, 2, [(e % 5, 3 + e % 7, (e % 3, 1 + e % 4,
                                                                                           e % 5))
                                                                         for e in range(18)], True, set()),
}


@pytest.mark.parametrize("case", UNIT_CASES)
def test_sparse_lowrank_cpu_path_matches_float64_dense_math(case, small_row_limit):
    tokens, top_k, plan, with_base, idle = UNIT_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    layer = random_sparse_lowrank_layer(gen, 24, 20, plan, with_base)
    x = torch.randn(tokens, 24, generator=gen, dtype=torch.float64)
    ids, weights = routing(tokens, len(plan), top_k, gen, idle)
    experts = [tuple(layer.dense_weight(e, p) for p in ("gate", "up", "down")) for e in range(len(plan))]
    reference = dense_moe(x, ids, weights, experts)
    for dtype, tolerance in TOLERANCE.items():
        packed = {k: t.to(dtype) if t.is_floating_point() else t for k, t in layer.packed().items()}
        out = sparse_lowrank_cpu.sparse_lowrank_moe(x.to(dtype), ids, weights, sparse_lowrank_cpu.prepare(**packed))
        assert out.dtype == dtype
        error = float((out.double() - reference).norm() / reference.norm())
        assert error <= tolerance, (dtype, error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_base_down_stored_the_other_way_round_is_refused_with_one_line(dtype):
    """The op reads the shared base down as B [H, I] where ``base_down_projected`` (bf16 on an op with AVX512-BF16
    dot products) and as Bᵀ [I, H] elsewhere; given the other orientation (a layout prepared for another build of
    the op) it stops with a message naming both, instead of reading past the tensor."""
    gen = torch.Generator().manual_seed(7)
    layer = random_sparse_lowrank_layer(gen, 24, 20, UNIT_CASES["top-1"][2], True)
    packed = {k: t.to(dtype) if t.is_floating_point() else t for k, t in layer.packed().items()}
    layout = sparse_lowrank_cpu.prepare(**packed)
    swapped = layout._replace(base_down=layout.base_down.t().contiguous())
    x = torch.randn(4, 24, generator=gen).to(dtype)
    ids, weights = routing(4, 3, 1, gen, set())
    sparse_lowrank_cpu.sparse_lowrank_moe(x, ids, weights, layout)  # the prepared orientation runs
    with pytest.raises(RuntimeError, match=r"reads the base down as .* \(base_down_projected\), got \[") as raised:
        sparse_lowrank_cpu.sparse_lowrank_moe(x, ids, weights, swapped)
    projected = cpu_extension.base_down_projected(layout.base_down.dtype, bool(layout.pairs.item()))
    assert ("B [H, I]" if projected else "Bᵀ [I, H]") in str(raised.value)


@pytest.mark.parametrize("blocks", [[37, 45, 53, 61], [61, 53, 45, 37], [7700, 3800, 12], [5, 0, 129], [30, 31]])
def test_with_tail_appends_the_fewest_zero_rows_that_let_every_block_round(blocks):
    """Every block's rows rounded up (gemm_extent) fit in the rows after its start; one zero row fewer would not
    fit some block (none where no block rounds past the tensor); fp32 (MKL: nothing per shape) gets no tail."""
    extent = cpu_extension.cpu_ops().gemm_extent
    t = torch.randn(sum(blocks), 3, dtype=torch.bfloat16)
    padded = cpu_extension.with_tail(t, blocks, torch.bfloat16)
    assert torch.equal(padded[: len(t)], t) and not padded[len(t):].any()
    starts = [sum(blocks[:e]) for e in range(len(blocks))]
    assert all(start + extent(k) <= len(padded) for start, k in zip(starts, blocks))
    assert len(padded) == max(len(t), *(start + extent(k) for start, k in zip(starts, blocks)))
    assert len(cpu_extension.with_tail(t.float(), blocks, torch.float32)) == len(t)


def test_sparse_lowrank_ragged_products_on_rounded_gemm_shapes_match_float64_dense_math():
    """bf16 products on at::mm whose factor blocks have ragged row counts over 32 (sparse units 37–61 per expert,
    ranks 39 and 41): gemm rounds each block's rows up to a shared shape (gemm_extent: 40, 48, 56, 64, 80–128 for
    the gate/up rows), reading the next expert's rows or the layout's zero tail (with_tail) against zero columns of
    the activations (expands) or into output columns it drops (projects); the last expert's blocks read the tail.
    ~150 tokens per expert: above the loops' 64 rows for small blocks. AMX off before prepare (row-major blocks:
    AMX's pair layout and amx_product do not round)."""
    ops = cpu_extension.cpu_ops()
    previous_amx = ops.set_amx_gemm(0)
    try:
        gen = torch.Generator().manual_seed(5)
        plan = [(37, 60, (20, 19, 41)), (45, 50, (20, 19, 41)), (53, 40, (20, 19, 41)), (61, 70, (20, 19, 41))]
        layer = random_sparse_lowrank_layer(gen, 64, 160, plan, True)
        x = torch.randn(300, 64, generator=gen, dtype=torch.float64)
        ids, weights = routing(300, len(plan), 2, gen)
        experts = [tuple(layer.dense_weight(e, p) for p in ("gate", "up", "down")) for e in range(len(plan))]
        reference = dense_moe(x, ids, weights, experts)
        packed = {k: t.to(torch.bfloat16) if t.is_floating_point() else t for k, t in layer.packed().items()}
        layout = sparse_lowrank_cpu.prepare(**packed)
        assert layout.sgu.shape[0] > 2 * sum(s for s, _, _ in plan)  # the zero tail the last expert rounds into
        out = sparse_lowrank_cpu.sparse_lowrank_moe(x.to(torch.bfloat16), ids, weights, layout)
        error = float((out.double() - reference).norm() / reference.norm())
        assert error <= TOLERANCE[torch.bfloat16], error
    finally:
        ops.set_amx_gemm(previous_amx)


BASIS_CASES = {
    # name: (tokens, top_k, experts, group size, hidden, intermediate, ranks, mixed, residual size, activation,
    #        tp, residual seed or None for the layer's own)
    "rfid, residual, ragged ranks, idle group": (13, 3, 8, 2, 48, 40, {"gate": [3, 17, 1, 6], "up": [5, 2, 9, 4]},
                                                  False, 97, "silu", 1, None),
    "rfid, no residual, factorised down": (9, 2, 6, 3, 32, 24, {"gate": [4, 11], "up": [7, 2], "down": [5, 3]},
                                           False, 0, "silu", 1, None),
    "rfid, residual, factorised down, TP 2, 32-bit seed": (10, 2, 6, 2, 40, 48, {"gate": [3, 8, 5], "up": [6, 2, 7],
                                                                                 "down": [4, 9, 2]}, False, 61, "silu",
                                                           2, 2**32 - 5),
    "mobe, factorised down, TP 2": (11, 2, 6, 2, 32, 40, {"gate": [5], "up": [6], "down": [4]}, True, 0, "tanh", 2,
                                    None),
    "mobe, dense down": (7, 3, 8, 4, 48, 24, {"gate": [9], "up": [3]}, True, 0, "silu", 1, None),
    "rfid, 16 experts, ~75 tokens each (split for the expert count)": (600, 2, 16, 2, 32, 24,
                                                                       {"gate": [3, 5, 2, 6, 4, 1, 7, 3],
                                                                        "up": [2, 4, 6, 1, 5, 3, 2, 4]},
                                                                       False, 0, "silu", 1, None),
    "single token, top-8, idle group": (1, 8, 10, 2, 32, 24, {"gate": [2, 5, 3, 1, 7], "up": [4, 4, 6, 2, 3]},
                                        False, 30, "silu", 1, None),
    "2-8 tokens per expert, factorised down": (20, 2, 6, 2, 40, 36, {"gate": [5, 7, 3], "up": [4, 6, 8],
                                                                      "down": [3, 5, 2]}, False, 0, "silu", 1, None),
    "top-1, identity": (20, 1, 4, 2, 24, 32, {"gate": [6, 3], "up": [2, 5], "down": [3, 4]}, False, 40, "identity",
                        1, None),
    "ragged ranks over 32, ~100 tokens per expert (rounded GEMM shapes)": (400, 1, 4, 1, 96, 80,
                                                                           {"gate": [37, 45, 53, 61],
                                                                            "up": [33, 41, 49, 58]},
                                                                           False, 0, "silu", 1, None),
    "~10 tokens per expert (GEMM), residual": (30, 1, 3, 1, 32, 24, {"gate": [4, 6, 3], "up": [5, 2, 7],
                                                                                  "down": [3, 4, 2]}, False, 37,
                                                          "silu", 1, None),
}


@pytest.mark.parametrize("case", BASIS_CASES)
def test_basis_residual_cpu_path_matches_float64_dense_math(case, small_row_limit):
    """kernels/basis_residual_cpu.py through the plugin's loader and ``prepare`` (backend "cpu", TP slicing) on a
    random RFID-MoE / MoBE layer, against float64 dense math on the materialised experts (the TP ranks' sum) and,
    per rank, the torch path on the same loaded weights."""
    (tokens, top_k, num_experts, group_size, hidden, inter, ranks, mixed, residual, activation, tp,
     seed) = BASIS_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    layer = random_basis_residual_layer(gen, num_experts, group_size, hidden, inter, ranks, mixed, residual,
                                        activation)
    if seed is not None:
        layer = dataclasses.replace(layer, residual_seed=seed)
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    idle = set(layer.groups[0]) if "idle" in case else set()
    ids, weights = routing(tokens, num_experts, top_k, gen, idle)
    reference = basis_residual_dense_float64(layer, x, ids, weights)
    assert reference.norm() > 0.1 * tokens**0.5  # not a vacuous comparison
    if residual:  # the residual is a large part of the output, so ignoring or misplacing it fails
        without = basis_residual_dense_float64(dataclasses.replace(layer, residual_size=0), x, ids, weights)
        assert (reference - without).norm() > 0.2 * reference.norm()
    for dtype, tolerance in TOLERANCE.items():
        # The float64 reference sees the weights rounded to dtype, so only the compute's rounding is measured.
        tensors = layer.to_tensors(PREFIX, NAMES, dtype)
        stored = BasisResidualLayer.from_tensors(layer.spec(0, PREFIX), NAMES,
                                                 lambda n: tensors[n].double() if tensors[n].is_floating_point()
                                                 else tensors[n])
        expected = basis_residual_dense_float64(stored, x, ids, weights)
        total = torch.zeros_like(x)
        for tp_rank in range(tp):
            scheme, module = basis_residual_shard(layer, tensors, dtype, tp_rank, tp, "cpu")
            assert scheme.backend == "cpu"
            got = scheme.apply(module, x.to(dtype), weights, ids)
            assert got.dtype == dtype
            # The torch path on the same loaded weights, in at least float32: a wrong packing or slice shows per rank.
            wide = torch.promote_types(dtype, torch.float32)
            torch_scheme, torch_module = basis_residual_shard(layer, tensors, dtype, tp_rank, tp, "torch")
            torch_path = torch_scheme.apply_torch(torch_module.to(wide), x.to(wide), weights, ids).double()
            error = float((got.double() - torch_path).norm() / torch_path.norm())
            assert error <= tolerance, (dtype, tp_rank, "vs torch path", error)
            total += got.double()
        error = float((total - expected).norm() / expected.norm())
        assert error <= tolerance, (dtype, error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_dense_weight_stored_the_other_way_round_is_refused_with_one_line(dtype):
    """The op reads basis_residual's dense weights as W_e [E, out, in] where ``dense_projected`` (bf16 on an op with
    AVX512-BF16 dot products) and as W_eᵀ [E, in, out] elsewhere; given the other orientation (a layout prepared for
    another build of the op) it stops with a message naming both, instead of reading past the tensor."""
    gen = torch.Generator().manual_seed(8)
    layer = random_basis_residual_layer(gen, 4, 2, 24, 40, {"gate": [3, 5], "up": [2, 4]}, False, 0, "silu")
    scheme, _ = basis_residual_shard(layer, layer.to_tensors(PREFIX, NAMES, dtype), dtype, 0, 1, "cpu")
    layout = basis_residual_cpu.BasisResidualCpuLayout(*scheme.cpu_args)
    swapped = layout._replace(down_dense=layout.down_dense.transpose(1, 2).contiguous())
    x = torch.randn(3, 24, generator=gen).to(dtype)
    ids, weights = routing(3, 4, 2, gen)
    basis_residual_cpu.basis_residual_moe(x, ids, weights, layout)  # the prepared orientation runs
    with pytest.raises(RuntimeError, match=r"reads a dense weight as .* \(dense_projected\), got \[") as raised:
        basis_residual_cpu.basis_residual_moe(x, ids, weights, swapped)
    projected = cpu_extension.dense_projected(layout.down_dense.dtype, bool(layout.pairs.item()))
    assert ("W_e [E, out, in]" if projected else "W_eᵀ [E, in, out]") in str(raised.value)


@pytest.mark.parametrize("routing", ["prefill", "decode"])
@pytest.mark.parametrize("scheme", ["base_delta", "sparse_lowrank", "basis_residual"])
def test_amx_pair_layout_matches_float64_dense_math(scheme, routing):
    """The AMX path as the plugin runs it on AMX CPUs: bf16 factors prepared with the expand-side blocks in the pair
    layout (``cpu_extension.pair_rows``), against float64 dense math with fresh random inputs. "prefill": ≥ 16
    routed rows per expert (amx_product: ATen's brgemm on the pairs in place), one expert with 2 rows on the loops;
    "decode": 1–4 rows per expert (axpys_pairs). Hidden 1000 puts the blocks of ranks 66 and 70 over 128 KiB (rank
    40: under it, but from 16 rows on AMX too: kAmxCachedBlockRows) and over one brgemm chunk with tails (project: 32 rows of b; expand: blocks of 64 columns, a
    last block 40 wide); the odd ranks 33 and 1 have a pad row. The same pair layout with AMX turned off (at::mm
    on the pairs' copy back to rows) and a row-major layout prepared with AMX off must agree too."""
    if not amx_usable():
        pytest.skip("no AMX-BF16 (or no brgemm packing in this torch)")
    ops = cpu_extension.cpu_ops()
    gen = torch.Generator().manual_seed(17 if routing == "prefill" else 18)
    hidden, inter = 1000, 200
    if routing == "prefill":
        # top-2 over experts 0-3 (two different ones per token), the last two tokens to expert 4 and one of 0-3
        tokens = 38
        first = torch.arange(tokens) % 4
        second = torch.where(torch.arange(tokens) < tokens - 2, (first + 1 + torch.arange(tokens) // 4 % 3) % 4, 4)
    else:  # each token to two of the 5 experts: 1-4 rows per active expert
        tokens = 4
        first = torch.arange(tokens)
        second = (first + 1 + torch.arange(tokens) % 2) % 5
    ids = torch.stack([first, second], 1)[torch.randperm(tokens, generator=gen)].to(torch.int32)
    rows = torch.bincount(ids.flatten().long(), minlength=5)
    if routing == "prefill":
        assert rows[:4].min() >= 16 and rows[4] == 2, rows
    else:
        assert rows.max() <= 4, rows
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    weights = torch.rand(tokens, 2, generator=gen, dtype=torch.float64).softmax(1)
    if scheme == "base_delta":
        tensors = packed_layer([[40, 70, 33, 1, 6], [66, 2, 40, 33, 4], [70, 40, 1, 66, 3]], hidden, inter, 25, gen)
        reference = dense_moe(x, ids, weights, dense_experts(*tensors))

        def prepare():
            layout = base_delta_cpu.prepare(tensors[0], *(t.to(torch.bfloat16) for t in tensors[1:7]), tensors[7])
            return layout, int(layout.pairs)

        def run(layout):
            return base_delta_cpu.base_delta_moe(x.to(torch.bfloat16), ids, weights, layout)
    elif scheme == "sparse_lowrank":
        plan = [(34, 40, (40, 70, 66)), (33, 30, (1, 33, 40)), (16, 50, (70, 40, 2)), (0, 48, (66, 66, 70)),
                (11, 9, (5, 3, 7))]
        layer = random_sparse_lowrank_layer(gen, hidden, inter + 1, plan, True)  # odd I: base down with a pad row
        reference = dense_moe(x, ids, weights,
                              [tuple(layer.dense_weight(e, p) for p in ("gate", "up", "down")) for e in range(5)])

        def prepare():
            packed = {k: t.to(torch.bfloat16) if t.is_floating_point() else t for k, t in layer.packed().items()}
            layout = sparse_lowrank_cpu.prepare(**packed)
            return layout, int(layout.pairs)

        def run(layout):
            return sparse_lowrank_cpu.sparse_lowrank_moe(x.to(torch.bfloat16), ids, weights, layout)
    else:
        layer = random_basis_residual_layer(gen, 5, 1, hidden, inter + 1, {"gate": [40, 70, 33, 66, 2],
                                                                            "up": [66, 40, 70, 1, 4]}, False, 0,
                                            "silu")
        tensors = layer.to_tensors(PREFIX, NAMES, torch.bfloat16)
        stored = BasisResidualLayer.from_tensors(layer.spec(0, PREFIX), NAMES,
                                                 lambda n: tensors[n].double() if tensors[n].is_floating_point()
                                                 else tensors[n])
        reference = basis_residual_dense_float64(stored, x, ids, weights)  # dense down [I, H], I odd: a pad row

        def prepare():
            scheme_, module = basis_residual_shard(layer, tensors, torch.bfloat16, 0, 1, "cpu")
            return (scheme_, module), int(module.moe_compress_cpu_pairs)

        def run(layout):
            scheme_, module = layout
            return scheme_.apply(module, x.to(torch.bfloat16), weights, ids)
    assert reference.norm() > 0.1 * tokens**0.5  # not a vacuous comparison
    previous = ops.set_amx_gemm(1)
    try:
        pairs, pairs_flag = prepare()
        amx = run(pairs).double()
        ops.set_amx_gemm(0)
        pairs_at_mm = run(pairs).double()
        rows_layout, rows_flag = prepare()
        at_mm = run(rows_layout).double()
    finally:
        ops.set_amx_gemm(previous)
    assert (pairs_flag, rows_flag) == (1, 0)
    for name, got in (("AMX, pairs", amx), ("at::mm, pairs", pairs_at_mm), ("at::mm, rows", at_mm)):
        error = float((got - reference).norm() / reference.norm())
        assert error <= TOLERANCE[torch.bfloat16], (name, error)


def test_pair_tiles_on_the_loops_match_float64_dense_math(monkeypatch):
    """The pair layout's column tiles (``cpu_extension.PAIR_TILE``) as the loops and at::mm read them, on any CPU:
    base_delta prepared in bf16 with the pair layout forced on and the AMX path off. Hidden 1,008: the down and
    base-down blocks hold 15 whole tiles and a 48-column one (whole vectors), so experts of 8–64 rows expand
    through ``expand_tiles`` tile by tile (down blocks of ranks ≤ 64: ≤ 128 KiB); expert 0's 70 rows and the base
    down over 80 tokens take at::mm on the block's rows copied back from the tiles (``pair_block_rows``), as does
    D²-MoE's dynamic drop, run on both layouts: the pair and row-major layouts must give the same output."""
    ops = cpu_extension.cpu_ops()
    gen = torch.Generator().manual_seed(23)
    hidden, inter, tokens = 1008, 200, 80
    token = torch.arange(tokens)
    # top-2 of 3 experts: expert 0 first for tokens 0–69 (70 rows), experts 1 and 2 share the rest (45 rows each)
    ids = torch.stack([torch.where(token < 70, 0, 1), torch.where(token < 70, 1 + token % 2, 2)], 1).to(torch.int32)
    assert torch.bincount(ids.flatten().long()).tolist() == [70, 45, 45]
    tensors = packed_layer([[30, 20, 33], [25, 40, 1], [40, 64, 33]], hidden, inter, 25, gen)
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    weights = torch.rand(tokens, 2, generator=gen, dtype=torch.float64).softmax(1)
    reference = dense_moe(x, ids, weights, dense_experts(*tensors))

    def run(pairs: bool, drop: int = 0) -> torch.Tensor:
        monkeypatch.setattr(base_delta_cpu, "pair_layout", lambda dtype: pairs)
        layout = base_delta_cpu.prepare(tensors[0], *(t.to(torch.bfloat16) for t in tensors[1:7]), tensors[7])
        assert int(layout.pairs) == pairs
        return base_delta_cpu.base_delta_moe(x.to(torch.bfloat16), ids, weights, layout, drop).double()

    previous = ops.set_amx_gemm(0)
    try:
        pairs, rows = run(True), run(False)
        pairs_drop, rows_drop = run(True, 3), run(False, 3)
    finally:
        ops.set_amx_gemm(previous)
    for name, got in (("pairs", pairs), ("rows", rows)):
        error = float((got - reference).norm() / reference.norm())
        assert error <= TOLERANCE[torch.bfloat16], (name, error)
    assert float((pairs_drop - pairs).norm() / pairs.norm()) > 1e-3  # the drop changed the output
    assert float((pairs_drop - rows_drop).norm() / rows_drop.norm()) <= TOLERANCE[torch.float32]


def amx_base_delta_error(tensors, x, ids, weights, reference, threads: int) -> float:
    """Relative error of the C++ base_delta op in bf16 on the AMX path (the pair layout) against reference, run on
    ``threads`` threads."""
    ops = cpu_extension.cpu_ops()
    previous, previous_threads = ops.set_amx_gemm(1), torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        layout = base_delta_cpu.prepare(tensors[0], *(t.to(torch.bfloat16) for t in tensors[1:7]), tensors[7])
        assert int(layout.pairs) == 1
        got = base_delta_cpu.base_delta_moe(x.to(torch.bfloat16), ids, weights, layout).double()
    finally:
        ops.set_amx_gemm(previous)
        torch.set_num_threads(previous_threads)
    return float((got - reference).norm() / reference.norm())


@pytest.mark.parametrize("threads", [1, 2])
def test_amx_blocked_products_match_float64_dense_math(threads):
    """amx_product's blocking (kAmxRows, kAmxTokens, kAmxDepth, amx_blocked) at sizes over every block with tails:
    base_delta in bf16 on the pair layout, 150 tokens top-2 over 3 experts (~100 rows per expert: two 64-token aᵀ
    panels and a tail), hidden 4000 (expand's 64-column blocks with a 32-column tail). Both sides of project's rule
    (blocked only where aᵀ is over kAmxCachedActivationBytes, 1 MiB): the base's gate/up project over all 150
    tokens (aᵀ 150 × 4000 bf16 = 1.2 MB) blocked, its inner dimension in pieces of 512 with a 416 tail, base
    channels 300 (600 rows of b: four 128-row chunks and a tail); the experts' gate/up projects (~100 × 4000:
    0.8 MB) and down projects (intermediate 600) unblocked over the panels. Expand blocked throughout: base down's
    inner dimension in 256-row pieces with a tail, ranks 257–301 (two or three 256-row pieces, odd ranks with a
    pad row). Against float64 dense math; one and two threads (the chunks split over them)."""
    if not amx_usable():
        pytest.skip("no AMX-BF16 (or no brgemm packing in this torch)")
    gen = torch.Generator().manual_seed(23)
    hidden, inter, tokens = 4000, 600, 150
    tensors = packed_layer([[300, 257, 40], [260, 301, 66], [261, 290, 270]], hidden, inter, 300, gen)
    reference_layer = dense_experts(*tensors)
    ids = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in range(tokens)]).to(torch.int32)
    assert torch.bincount(ids.flatten().long()).min() > 2 * 64 - 64 + 1  # every expert over one aᵀ panel
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    weights = torch.rand(tokens, 2, generator=gen, dtype=torch.float64).softmax(1)
    reference = dense_moe(x, ids, weights, reference_layer)
    assert amx_base_delta_error(tensors, x, ids, weights, reference, threads) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("threads", [1, 2])
def test_amx_expand_spans_match_float64_dense_math(threads):
    """Expand's spans (expand_span): where a's [n, K] bf16 block is over kAmxCachedActivationBytes (1 MiB), K is
    taken span by span over every column block. base_delta in bf16 on the pair layout with every channel in the
    base, 300 tokens top-2 over 3 experts: the base down's a is 300 × 2000 bf16 = 1.2 MB, spans of 1536 rows (six
    256-row pieces) and a 464-row tail span (a 208-row tail piece); hidden 200 (three 64-column blocks and an
    8-column tail); the experts' ~200-row expands (ranks 35–70: a ≤ 28 KB) in one span. Against float64 dense math;
    one and two threads (the column blocks split over them)."""
    if not amx_usable():
        pytest.skip("no AMX-BF16 (or no brgemm packing in this torch)")
    gen = torch.Generator().manual_seed(31)
    hidden, inter, tokens = 200, 2000, 300
    tensors = packed_layer([[40, 35, 70], [66, 41, 36], [37, 70, 45]], hidden, inter, inter, gen)
    assert torch.equal(tensors[7], torch.arange(inter))
    ids = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in range(tokens)]).to(torch.int32)
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    weights = torch.rand(tokens, 2, generator=gen, dtype=torch.float64).softmax(1)
    reference = dense_moe(x, ids, weights, dense_experts(*tensors))
    assert amx_base_delta_error(tensors, x, ids, weights, reference, threads) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("threads", [1, 2])
def test_amx_projects_with_more_rows_than_the_factor_match_float64_dense_math(threads):
    """A project with more activation rows than its factor has rows packs the factor (the pair layout of Bᵀ, made
    per call) instead of the activations and runs as an expand; the experts' rows are gathered as they are converted
    to bf16 (project_rows), on both sides of that rule. base_delta in bf16 on the pair layout, 250 tokens top-2 over
    3 experts (~167 rows each: brgemm calls of 32 rows and a tail), hidden 600 (the packed factor's depth in pieces
    of 256 and an 88 tail), intermediate 130: the base's gate/up (200 rows against 250 tokens: three 64-column tiles
    and an 8-wide one) and the experts' gate/up of 70 and 34 rows and all three downs (66, 1 and 70 rows) packed; expert 2's
    gate/up (350 rows) keeps the packed activations, gathered from the call's rows. Against float64 dense math; one
    and two threads."""
    if not amx_usable():
        pytest.skip("no AMX-BF16 (or no brgemm packing in this torch)")
    gen = torch.Generator().manual_seed(37)
    hidden, inter, tokens = 600, 130, 250
    tensors = packed_layer([[40, 33, 200], [30, 1, 150], [66, 1, 70]], hidden, inter, 100, gen)
    ids = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in range(tokens)]).to(torch.int32)
    rows = torch.bincount(ids.flatten().long())
    assert rows.min() > 70 and rows.max() < 350, rows
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    weights = torch.rand(tokens, 2, generator=gen, dtype=torch.float64).softmax(1)
    reference = dense_moe(x, ids, weights, dense_experts(*tensors))
    assert amx_base_delta_error(tensors, x, ids, weights, reference, threads) <= TOLERANCE[torch.bfloat16]


def pairs_by_definition(block: torch.Tensor) -> torch.Tensor:
    """The pair layout of ``block [K, N]`` as defined (``cpu_extension.pair_rows``): per tile of 64 columns (the
    last one narrower), [K'/2, w, 2] values with (p, i, half) = block[2p + half, 64c + i], an odd K padded with a
    zero row; the tiles in turn, seen as [K', N]."""
    padded = torch.cat([block, block.new_zeros(block.shape[0] % 2, block.shape[1])])
    tiles = [torch.stack([tile[0::2], tile[1::2]], -1).reshape(-1) for tile in padded.split(64, dim=1)]
    return torch.cat(tiles).reshape(padded.shape) if tiles else padded


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_blocks_match_the_pair_layout_definition(dtype):
    """``row_blocks`` (each block written into one preallocated tensor) and ``pair_rows`` give the pair layout's
    definition bit for bit: blocks of even, odd and zero rows, from a transposed view (as ``prepare`` passes
    Uᵀ), with a leading dimension for ``pair_rows``; the row-major form is ``t`` itself."""
    gen = torch.Generator().manual_seed(4)
    sizes = [4, 3, 0, 1, 6, 5]
    t = torch.randn(150, sum(sizes), generator=gen).to(dtype).T  # [19, 150]: two tiles and a 22-column one

    def same_bits(a, b):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                        b.contiguous().view(torch.uint8))

    got, starts = cpu_extension.row_blocks(t, sizes, True)
    assert got.is_contiguous() and starts == [0, 4, 8, 8, 10, 16]
    assert same_bits(got, torch.cat([pairs_by_definition(b) for b in t.split(sizes)]))
    stacked = torch.randn(3, 5, 70, generator=gen).to(dtype)
    assert same_bits(cpu_extension.pair_rows(stacked), torch.stack([pairs_by_definition(b) for b in stacked]))
    rows, row_starts = cpu_extension.row_blocks(t, sizes, False)
    assert rows is t and row_starts == [0, 4, 7, 7, 8, 14]


def test_op_regions_run_on_every_thread():
    """The build has OpenMP: one at::parallel_for region runs on torch's threads (without -fopenmp every region
    ran on one thread, and the op used one core whatever vLLM's worker set)."""
    ops, threads = cpu_extension.cpu_ops(), torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert ops.parallel_threads() == 3
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_split_gives_the_same_output_as_experts_in_turn(dtype):
    """Each expert writes only its pairs' rows of the per-pair outputs and every token's rows are added in its top-k
    order (sum_pairs), so the output is the same, bit for bit, whether two threads split the experts or one thread
    runs them in turn: base_delta with ≤ 64 rows per expert (the split's condition), top-3 (three terms per token:
    per-thread partial sums, as before, added them in another order), one expert with a single row, products on the
    loops and the register tiles (8+ rows of the small blocks), the base over a subset of channels."""
    ops = cpu_extension.cpu_ops()
    gen = torch.Generator().manual_seed(23)
    ranks = [[9, 4, 17, 6, 11, 3], [5, 12, 3, 8, 16, 2], [7, 2, 13, 19, 4, 6]]
    tensors = packed_layer(ranks, 48, 32, 20, gen)
    layout = base_delta_cpu.prepare(tensors[0], *(t.to(dtype) for t in tensors[1:7]), tensors[7])
    x = torch.randn(60, 48, generator=gen).to(dtype)
    ids, weights = routing(60, 6, 3, gen)  # three terms per token: a sum whose order shows in its last bits
    ids[-1] = torch.tensor([5, 0, 1], dtype=ids.dtype)  # and expert 5 with few rows
    ids[:-1][ids[:-1] == 5] = 2
    counts = torch.bincount(ids.flatten().long(), minlength=6)
    assert counts.max() <= 64 and counts[5] == 1, counts
    outputs, threads = [], torch.get_num_threads()
    previous = ops.set_expert_parallel(1)
    try:
        for split, count in ((1, 2), (0, 1)):
            ops.set_expert_parallel(split)
            torch.set_num_threads(count)
            outputs.append(base_delta_cpu.base_delta_moe(x, ids, weights, layout))
    finally:
        ops.set_expert_parallel(previous)
        torch.set_num_threads(threads)
    assert outputs[0].abs().max() > 0 and torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("value", ["0", "1", None])
def test_expert_split_follows_the_environment(value):
    """MOE_COMPRESS_CPU_EXPERT_SPLIT sets the split in a process that loads the op (how vLLM's worker gets it);
    unset, the split is on."""
    code = ("from vllm_moe_compress.kernels import cpu_extension; "
            "print(cpu_extension.cpu_ops().set_expert_parallel(0))")
    env = {k: v for k, v in os.environ.items() if k != cpu_extension.EXPERT_SPLIT_ENV}
    if value is not None:
        env[cpu_extension.EXPERT_SPLIT_ENV] = value
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert shown.split()[-1] == (value or "1")


def plugin_cpu_layer(scheme: str, gen: torch.Generator, hidden: int, inter: int):
    """A random layer of ``scheme`` with 4 experts, loaded and prepared by the plugin's scheme for the C++ CPU op
    (backend "cpu", one TP rank): the scheme and the module holding its parameters."""
    if scheme == "base_delta":
        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64) / shape[-1] ** 0.5

        ranks, channels = {"gate": [3, 0, 6, 2], "up": [1, 5, 2, 4], "down": [2, 2, 7, 1]}, [0, 3, 4, 11]
        shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
        factors = {proj: [(randn(shapes[proj][0], r), randn(r, shapes[proj][1])) if r else None for r in proj_ranks]
                   for proj, proj_ranks in ranks.items()}
        base = {"gate": randn(len(channels), hidden), "up": randn(len(channels), hidden),
                "down": randn(hidden, len(channels))}
        layer = BaseDeltaLayer(hidden, inter, factors, base, torch.tensor(channels))
        spec = layer.spec(0, PREFIX)
        plugin = BaseDeltaScheme(spec, NAMES, {base_channels_name(PREFIX): channels}, 0, 1)
    elif scheme == "sparse_lowrank":
        layer = random_sparse_lowrank_layer(gen, hidden, inter, [(5, 7, (3, 2, 4)), (0, 11, (4, 3, 6)),
                                                                 (12, 0, (0, 0, 0)), (6, 9, (2, 5, 0))], True)
        spec = layer.spec(0, PREFIX)
        tensors = layer.to_tensors(PREFIX, NAMES, torch.float32)
        indices = {name: tensors[name].tolist() for e in range(4) for kind in ("sparse", "lowrank")
                   if (name := unit_channels_name(PREFIX, e, kind)) in tensors}
        plugin = SparseLowRankScheme(spec, NAMES, indices, 0, 1)
    else:
        layer = random_basis_residual_layer(gen, 4, 2, hidden, inter, {"gate": [3, 4], "up": [2, 5]}, False, 0,
                                            "silu")
        return basis_residual_shard(layer, layer.to_tensors(PREFIX, NAMES, torch.float32), torch.float32, 0, 1, "cpu")
    return plugin, load_scheme(plugin, layer.to_tensors(PREFIX, NAMES, torch.float32), torch.float32, "cpu")


@pytest.mark.parametrize("scheme", ["base_delta", "sparse_lowrank", "basis_residual"])
def test_plugin_cpu_path_compiles_fullgraph(scheme):
    """vLLM's CPU mode runs the model as one Dynamo graph (fullgraph): the plugin's ``apply_cpu`` calls the C++ op
    ``torch.ops.moe_compress_cpu.<scheme>`` directly, which traces through its fake implementation
    (``cpu_extension.MOE_OPS``) and returns the same values in the compiled graph as eagerly, at token counts the
    graph was not traced with (dynamic shapes)."""
    gen = torch.Generator().manual_seed(3)
    plugin, module = plugin_cpu_layer(scheme, gen, 24, 16)
    assert plugin.backend == "cpu"
    torch._dynamo.reset()
    compiled = torch.compile(plugin.apply, fullgraph=True, dynamic=True)
    for tokens in (1, 5, 9):
        x = torch.randn(tokens, 24, generator=gen)
        ids, weights = routing(tokens, 4, 2, gen)
        eager = plugin.apply(module, x, weights, ids)
        assert eager.norm() > 0  # not a vacuous comparison
        assert torch.equal(compiled(module, x, weights, ids), eager)



def test_benchmark_rounds_alternate_the_order_of_the_paths():
    """``benchmarks/cpu_moe.py``'s rounds run the paths in the given order in even rounds and reversed in odd ones
    (the second path of a round ran faster at identical code), after one warm-up call each; the flush before
    every path's calls."""
    from benchmarks.cpu_moe import timed_rounds

    calls = []
    paths = {name: (lambda name: lambda: calls.append(name))(name) for name in "abc"}
    ms = timed_rounds(paths, [()], rounds=3, calls=2, flush=lambda: calls.append("flush"))
    assert set(ms) == set("abc")
    timed = [c for c in calls[3:] if c != "flush"]
    assert calls[:3] == list("abc") and timed == list("aabbcc" "ccbbaa" "aabbcc")
    assert calls[3:].count("flush") == 9


def test_benchmark_warm_mode_calls_each_path_once_untimed_before_its_calls_and_never_flushes():
    """``--warm``: one untimed call of the path right before its timed ones in every round, the flush not run."""
    from benchmarks.cpu_moe import timed_rounds

    calls = []
    paths = {name: (lambda name: lambda: calls.append(name))(name) for name in "ab"}
    timed_rounds(paths, [()], rounds=2, calls=2, flush=lambda: calls.append("flush"), warm=True)
    assert calls == list("ab" "aaa" "bbb" "bbb" "aaa")


def test_benchmark_rounds_take_routings_no_earlier_round_took():
    """Call c of round r takes input (r · calls + c) mod len(inputs): with as many inputs as timed calls, no timed
    call of a path repeats one (so a cost per new product shape is timed, not paid once)."""
    from benchmarks.cpu_moe import timed_rounds

    seen = {"a": [], "b": []}
    paths = {name: (lambda name: lambda i: seen[name].append(i))(name) for name in seen}
    timed_rounds(paths, [(i,) for i in range(6)], rounds=3, calls=2)
    for taken in seen.values():
        assert taken == [0] + list(range(6))  # the warm-up call, then each input once


def test_benchmark_stops_with_one_line_before_timing_when_a_scheme_cannot_reach_a_ratio(tmp_path):
    """``benchmarks/cpu_moe.py`` checks every (model, scheme, ratio) before it builds or times anything: RFID-MoE
    cannot reach 60 % on the reference model, so the run stops at once with the reachable range, and writes no
    table (before, the schemes ahead of it were timed and their rows lost when it raised)."""
    out = tmp_path / "cpu_moe.md"
    run = subprocess.run([sys.executable, "-m", "benchmarks.cpu_moe", "--models", "brown-qwen3-moe", "--schemes",
                          "base_delta", "basis_residual", "--ratios", "0.6", "--tokens", "8", "--out", str(out)],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(
        "cpu_moe.py: error: brown-qwen3-moe, basis_residual: method rfid cannot reach ratio 0.6000")
    assert "reachable ratios are [0.0000, 0.4" in run.stderr and not out.exists()


def test_engine_call_recordings_round_trip_and_replay_by_call_size(tmp_path, monkeypatch):
    """``benchmarks/engine_calls.py``: a recording keeps each layer's op arguments (tensors, and the scalars after
    them) and every call in order, each tensor loaded 64-byte aligned, and is refused where this checkout's pair
    layout differs from the one its layout was prepared in, or its op takes another number of arguments (a
    recording from before a layout field); replay times each call size's calls, path order alternating per round."""
    from benchmarks import engine_calls
    from benchmarks.engine_calls import load_recording, save_recording, timed_sizes

    gen = torch.Generator().manual_seed(5)
    plugin, _ = plugin_cpu_layer("base_delta", gen, 24, 16)
    calls = [(n % 2, torch.randn(t, 24, generator=gen), *routing(t, 4, 2, gen)) for n, t in
             enumerate([7, 1, 1, 7, 1])]
    save_recording(tmp_path / "rec.safetensors", "m", "base_delta", [plugin.cpu_args, plugin.cpu_args], calls)
    assert not list(tmp_path.glob("*.partial"))
    kind, scheme, layers, loaded = load_recording(tmp_path / "rec.safetensors")
    assert (kind, scheme, len(layers)) == ("compressed", "base_delta", 2)
    for got, want in zip(layers[1], plugin.cpu_args):
        assert torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want
    assert [c[0] for c in loaded] == [0, 1, 0, 1, 0] and all(torch.equal(a[1], b[1]) for a, b in zip(loaded, calls))
    tensors = [t for t in layers[1] if isinstance(t, torch.Tensor)] + [t for call in loaded for t in call[1:]]
    assert all(t.data_ptr() % 64 == 0 for t in tensors)  # each in memory of its own, as the engine's (§10.23)
    with monkeypatch.context() as patched:
        patched.setattr(engine_calls, "PAIR_TILE", 2 * engine_calls.PAIR_TILE)
        with pytest.raises(SystemExit, match="record it again"):
            load_recording(tmp_path / "rec.safetensors")
    save_recording(tmp_path / "old.safetensors", "m", "base_delta", [plugin.cpu_args[1:]], calls[:1])
    with pytest.raises(SystemExit, match=r"old.safetensors: its layers hold \[\d+\] op arguments each, .* record it"):
        load_recording(tmp_path / "old.safetensors")
    order = []
    paths = {name: (lambda name: lambda layer, x, ids, w: order.append((name, x.shape[0])))(name) for name in "ab"}
    sizes = [(size, count) for size, count, _, _ in timed_sizes(paths, loaded, rounds=2, at_least=1)]
    assert sizes == [(1, 3), (7, 2)]
    assert [name for name, t in order if t == 7] == list("aabb" "aabb" "bbaa")  # warm-up, then rounds
