"""The C++ CPU MoE ops (``kernels/csrc/lowrank_moe_cpu.cpp``), compiled at first use and cached.

``torch.utils.cpp_extension.load`` builds the source with the machine's C++ compiler (g++, which vLLM's CPU
backend already needs for its compiled mode) into ``$MOE_COMPRESS_CPU_BUILD`` (default
``~/.cache/vllm_moe_compress/cpu-<torch version>-<CPU tag>``) with ``-O3 -march=native -fopenmp`` (the small-product
loops are vectorised for this CPU's ISA: AVX-512 on the EPYC this project runs on now, AVX2 + FMA on its
earlier one; intrinsics only where the compiler defines ``__AVX512BF16__``, for the bf16 dot products of
``bf16_dots``, so any ISA builds), once per source change; later processes load the cached
library (~0.1 s). Concurrent first builds (vLLM's worker processes, parallel tests) wait on torch's build
lock. The ops register as ``torch.ops.moe_compress_cpu.*``; the MoE ops (``MOE_OPS``) also get a fake
implementation, so the plugin can call them straight from vLLM's compiled graph (Dynamo traces them with fake
tensors).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import platform
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "lowrank_moe_cpu.cpp"


def build_directory() -> Path:
    """One build per torch version and CPU model: the source is compiled for the building machine's ISA
    (``-march=native``), so a cache shared by machines with different CPUs must not share a build."""
    default = Path.home() / ".cache" / "vllm_moe_compress" / f"cpu-{torch.__version__}-{_cpu_tag()}"
    path = Path(os.environ.get("MOE_COMPRESS_CPU_BUILD", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_tag() -> str:
    """A short hash of this CPU's model name and ISA flags (``/proc/cpuinfo``; the machine type elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        text = "\n".join(sorted({l for l in lines if l.startswith(("model name", "flags"))}))
    except OSError:
        text = platform.machine() + platform.processor()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _vector_flags() -> list[str]:
    """ATen's ``at::vec::Vectorized`` width for the small-product loops: the widest ISA torch itself would
    dispatch to on this CPU (``torch.backends.cpu.get_cpu_capability()``: AVX512 or AVX2; else the generic
    scalar fallback)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX512", "AVX2"):
        return [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    return []


def load_library(name: str, source: Path, build: Path) -> None:
    """Build (once per source and flags) and load ``source`` as the op library ``name`` in ``build``, with the
    op's compiler flags (``compile_flags``) and OpenMP at link time."""
    from torch.utils.cpp_extension import load

    load(name=name, sources=[str(source)], extra_cflags=compile_flags(), extra_ldflags=["-fopenmp"],
         is_python_module=False, build_directory=str(build), verbose=False)


def compile_flags() -> list[str]:
    """The op's compiler flags. ``-fopenmp``: ATen's ``at::parallel_for`` is inlined
    into the op from its headers as an OpenMP parallel region; built without the flag the pragma is ignored and
    every region runs on one thread (BENCHMARKS.md §10.20). With GCC, as here, the process's OpenMP runtime stays
    torch's own ``libgomp.so.1`` where torch ships it under that soname (Linux x86 wheels: the same soname, loaded
    first, checked in ``/proc/self/maps``); a compiler with another runtime (clang's libomp) would add a second."""
    return ["-O3", "-march=native", "-fopenmp", *_vector_flags()]


EXPERT_SPLIT_ENV = "MOE_COMPRESS_CPU_EXPERT_SPLIT"
"""0 or 1 (default 1) in every process that loads the op, e.g. vLLM's CPU worker: 1 splits the active experts over
the threads where every expert has at most 64 rows or there are at least 8 active experts per thread
(``set_expert_parallel(1)``, docs/kernels.md), 0 runs them in turn with each product split over the threads by
columns."""


MOE_OPS = ("base_delta", "sparse_lowrank", "basis_residual")
"""The ops that compute one MoE layer, named after their schemes: ``op(x [T, H], topk_ids, topk_weights, <layout
fields>...)`` → a new contiguous [T, H] tensor in x's dtype."""


def _output_like_x(x: torch.Tensor, *layout) -> torch.Tensor:
    """The MoE ops' fake implementation (what torch.compile's fake tensors see): the output's shape, dtype and
    contiguous strides, from x alone."""
    return x.new_empty(x.shape)


@functools.cache
def cpu_ops():
    """``torch.ops.moe_compress_cpu``, building the extension first if this machine has no cached build."""
    from vllm_moe_compress import request_amx_tile_state

    load_library("moe_compress_cpu", SOURCE, build_directory())
    split = os.environ.get(EXPERT_SPLIT_ENV, "1")
    if split not in ("0", "1"):
        raise ValueError(f"{EXPERT_SPLIT_ENV} must be 0 or 1, not {split!r}")
    torch.ops.moe_compress_cpu.set_expert_parallel(int(split))
    # On CPUs with AMX-BF16, once this process holds the AMX tile state (Linux kills a process that uses AMX
    # without asking), the op's bf16 products above the small-row loops' limit (prefill) use AMX tiles through
    # ATen's brgemm (lowrank_moe_cpu.cpp, amx_product); other CPUs keep at::mm.
    torch.ops.moe_compress_cpu.set_amx_gemm(int(request_amx_tile_state()))
    # A Python fake rather than a C++ Meta kernel: one function serves the three ops' long signatures, and this
    # is the one place the library is loaded.
    for name in MOE_OPS:
        torch.library.register_fake(f"moe_compress_cpu::{name}", _output_like_x)
    return torch.ops.moe_compress_cpu


@functools.cache
def available() -> bool:
    """Whether the ops build (or load) here; if not (no C++ compiler, no ninja), say why once: the plugin then
    keeps the torch paths for its CPU layers."""
    try:
        cpu_ops()
    except (OSError, RuntimeError, ImportError) as err:  # what cpp_extension raises for a missing/failed toolchain
        logger.warning("moe_compress: the C++ CPU MoE ops could not be built (%s); CPU layers use the slower "
                       "torch path", err)
        return False
    return True


HUGE_PAGE_MIN_BYTES = 8 << 20
"""Layout tensors from this size on are copied onto huge-page memory (``on_huge_pages``): each is rounded up to
whole 2 MiB pages, so smaller ones (the reference model's layers, a layer's base) would waste a larger share."""


def on_huge_pages(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, contiguous, for a prepared CPU layout: tensors of at least ``HUGE_PAGE_MIN_BYTES`` are
    copied (converted on the way, no intermediate) onto 2 MiB-aligned memory advised for transparent huge pages
    (the C++ ``huge_page_copy``). Where THP is ``madvise`` (the usual default) torch's own allocations get 4 KiB
    pages, and the op, which reads a few MiB of factors per routed expert at random places in hundreds of MiB,
    paid a TLB miss per 4 KiB: at Qwen3-30B-A3B shapes and 1–32 tokens the op on a 4 KiB-page copy took
    0.96–1.23× as long (median 1.07×; BENCHMARKS.md §10.4, with what it cost at 256 tokens)."""
    if t.numel() * dtype.itemsize < HUGE_PAGE_MIN_BYTES:
        return t.to(dtype).contiguous()
    return cpu_ops().huge_page_copy(t, dtype)


def with_tail(t: torch.Tensor, block_rows: list[int], dtype: torch.dtype, pairs: bool = False) -> torch.Tensor:
    """``t [Σ block_rows, N]`` (blocks of ragged sizes: one per expert or group) with the fewest zero rows appended,
    in bf16/fp16 and row-major (``pairs``: the pair layout, whose blocks ``gemm`` does not round, gets none), that
    let the C++ ``gemm`` round every block's rows up to a shape the blocks share
    (``gemm_extent``: n up to 32, else at most an eighth more), reading the rows after the block
    (``Block::spare_rows``: the next blocks', then the tail). bf16/fp16 ``at::mm`` is oneDNN's, which compiles a
    kernel per new shape: RS-MoE's ragged sparse-unit counts made Qwen3-30B-A3B's 256-token prefill call 1.6–2.1×
    slower where routings did not repeat (BENCHMARKS.md §10.26)."""
    if pairs or dtype not in (torch.bfloat16, torch.float16):
        return t
    extent, after, tail = cpu_ops().gemm_extent, 0, 0
    for rows in reversed(block_rows):  # after: the rows of the blocks after this one
        tail = max(tail, extent(rows) - rows - after)
        after += rows
    return torch.cat([t, t.new_zeros(tail, t.shape[1])]) if tail else t


def pair_layout(dtype: torch.dtype) -> bool:
    """Whether ``prepare`` stores the expand-side factors (the blocks the op multiplies as ``z Uᵀ``) in the pair
    layout (``pair_rows``) instead of row-major: bf16 factors where the op's bf16 prefill products run on AMX
    tiles (``set_amx_gemm``, on CPUs with AMX-BF16), whose brgemm takes that layout as it is; the small-row loops
    read it as cheaply as rows. Elsewhere (fp32, fp16, CPUs without AMX) the row-major layout."""
    return dtype == torch.bfloat16 and bool(cpu_ops().amx_gemm())


def base_down_projected(dtype: torch.dtype, pairs: bool) -> bool:
    """Whether ``prepare`` stores a shared base down B [H, C] (base_delta, sparse_lowrank) as B itself, which the op
    multiplies as a project (``wh Bᵀ``, on AVX512-BF16 dot products at 5–32 rows), instead of as Bᵀ [C, H]: bf16
    outside the pair layout where the op is built with those dot products (its ``bf16_dots()``; the C++
    ``base_down_projected``). As an expand, on ``at::mm`` over Bᵀ, Mixtral-8x7B's 117 MB base down took 13.3 ms
    at 8 rows against 4.7 (docs/kernels.md)."""
    return dtype == torch.bfloat16 and not pairs and bool(cpu_ops().bf16_dots())


def dense_projected(dtype: torch.dtype, pairs: bool) -> bool:
    """Whether ``basis_residual_cpu.prepare`` stores a dense expert weight (RFID-MoE's down by default) as W_e
    [E, out, in], which the op multiplies as a project (``h W_eᵀ``), instead of as W_eᵀ [E, in, out]: where the
    base down is projected (``base_down_projected``; the C++ ``dense_projected``). As an expand, 2–4 rows over
    Mixtral-8x7B's down took 6.6–14.0 ms against the project's 2.8–3.7 (docs/kernels.md)."""
    return base_down_projected(dtype, pairs)


def base_down_layout(base_down: torch.Tensor, dtype: torch.dtype, pairs: bool) -> torch.Tensor:
    """A base down B [H, C] as the op reads it (``base_down_projected``): B itself, or Bᵀ [C, H] (in the pair
    layout where ``pairs``)."""
    if base_down_projected(dtype, pairs):
        return base_down
    return row_blocks(base_down.T, [base_down.shape[1]], pairs)[0]


def pairs_flag(pairs: bool) -> torch.Tensor:
    """The layouts' ``pairs`` field: int64 [1], 1 where the expand-side tensors are in the pair layout."""
    return torch.tensor([int(pairs)], dtype=torch.int64)


PAIR_TILE = 64
"""Columns per tile of the pair layout (the C++ op's ``kPairTile``)."""


def pair_rows(t: torch.Tensor) -> torch.Tensor:
    """``t [..., K, N]`` in the pair layout (AMX's VNNI layout for a bf16 GEMM's B operand): rows 2p and 2p + 1
    interleaved value by value into 32-bit pairs ("lanes"), ``[..., K', N]`` with K' = K rounded up to even (an
    odd K gets a zero row), stored in column tiles of ``PAIR_TILE`` columns (the last one narrower where N is not
    a multiple): tile c holds columns [64c, 64c + w) as K'/2 pair rows of w lanes, from lane 64c · K'/2. The pair
    (t[2p, j], t[2p + 1, j]) of column j = 64c + i is at values 2·(64c · K'/2 + p·w + i). One tile is the B
    operand of one brgemm call, contiguous (the C++ op's ``Block``)."""
    *lead, rows, cols = t.shape
    out = t.new_empty(*lead, rows + rows % 2, cols)
    _write_pairs(t, out)
    return out


def _write_pairs(t: torch.Tensor, out: torch.Tensor) -> None:
    """Write ``t [..., K, N]`` in the pair layout (``pair_rows``) into the contiguous ``out [..., K', N]``: t's
    values copied once, tile by tile as views of out (no intermediate copy)."""
    *lead, rows, cols = t.shape
    half = (rows + 1) // 2
    flat = out.view(*lead, half * cols * 2)

    def fill(pairs: torch.Tensor, columns) -> None:
        """pairs [..., p, i, h] (a view of out) = t[2p + h] at ``columns(t's rows)``, the pad row zero."""
        pairs[..., 0].copy_(columns(t[..., 0::2, :]))
        pairs[..., : rows // 2, :, 1].copy_(columns(t[..., 1::2, :]))
        if rows % 2:
            pairs[..., -1, :, 1].zero_()

    whole = cols // PAIR_TILE * PAIR_TILE  # columns in whole tiles, then the narrower last tile
    tiles = whole // PAIR_TILE
    if whole:  # [..., tile, p, i, h]
        fill(flat[..., : half * whole * 2].view(*lead, tiles, half, PAIR_TILE, 2),
             lambda r: r[..., :whole].unflatten(-1, (tiles, PAIR_TILE)).transpose(-3, -2))
    if cols > whole:
        fill(flat[..., half * whole * 2 :].view(*lead, half, cols - whole, 2), lambda r: r[..., whole:])


def row_blocks(t: torch.Tensor, sizes: list[int], pairs: bool) -> tuple[torch.Tensor, list[int]]:
    """The consecutive row blocks of ``t [Σ sizes, N]`` as stored: as they are (``t`` itself), or each in the pair
    layout (``pair_rows``: a block of odd size takes one more row), written block by block into one new tensor
    (no second copy of the blocks while it is built); and each block's first stored row."""
    stored = [size + size % 2 for size in sizes] if pairs else sizes
    starts = [0, *itertools.accumulate(stored)][:-1]
    if not pairs:
        return t, starts
    out = t.new_empty(sum(stored), t.shape[1])
    for block, start, rows in zip(t.split(sizes), starts, stored):
        _write_pairs(block, out[start : start + rows])
    return out, starts
