"""CPU benchmark of one compressed MoE layer against vLLM CPU's dense fused-MoE op, at real layer shapes.

    python -m benchmarks.cpu_moe --models qwen3-30b-a3b --dtypes float32 bfloat16 --threads 1 --out runs/cpu_moe.md

One MoE layer at Qwen3-30B-A3B shapes (hidden 2048, moe_intermediate 768, 128 experts, top-8), Mixtral-8x7B
shapes (4096 / 14336, 8 experts, top-2) or the reference model's (``brown-qwen3-moe``: 256 / 128, 32 experts,
top-4; its parameter accounting counts untied embeddings), models one at a time (memory). The compressed layers are
``benchmarks/kernels.py``'s builders (random factors at the shapes the compressor's budget gives each scheme
at ``--ratios``); the paths timed, with the same inputs and routings:

- ``ours``: the CPU path of the scheme (``kernels/<scheme>_cpu.py``: layout prepared once, one C++ op per
  layer), where the scheme has one;
- ``ours (at::mm only)``: the same op with its small-row loops off (``set_small_row_limit(0)``: every product
  an ``at::mm``, as before the loops), with ``--compare-at-mm``;
- ``ours (experts in turn)``: the same op with the active experts run in turn, each product split over the
  threads (``set_expert_parallel(0)``; by default the experts are split over the threads), with
  ``--compare-expert-parallel`` (only differs from ``ours`` at ``--threads`` > 1);
- ``ours (4 KiB pages)``: the same op on a plain copy of the layout (torch's allocator: 4 KiB pages where
  transparent huge pages are ``madvise``, as the layouts were before ``on_huge_pages``), with
  ``--compare-small-pages`` (one more copy of the layout in memory);
- ``ours (<file>)``: the same layouts through the ops compiled from another ``lowrank_moe_cpu.cpp`` (e.g. an
  earlier commit's), registered as ``torch.ops.moe_compress_cpu_other``, with ``--compare-source <file>``: a
  before/after comparison in the same rounds (with ``--compare-small-pages`` on the 4 KiB-page copy, as the
  layouts were before ``on_huge_pages``). A source from before the pair layout (its ops take no ``pairs``) gets
  a second layout, prepared row-major, in its arguments (``rows_layout``: one more copy of the factors); one from
  before the pair layout's column tiles (no ``kPairTile``) a second layout with its pair rows across each block's
  whole width (``untiled_layout``), as it reads them; one from before ``base_down_projected`` its bf16 base
  down as Bᵀ (``base_down_as_before``: one more copy of the base down); one from before ``dense_projected`` its
  bf16 dense weights as W_eᵀ (``dense_as_before``: one more copy of them);
- ``torch op``: the scheme's torch path (``kernels/<scheme>_torch.py``, what the plugin called before);
- ``vLLM dense``: vLLM CPU's own unquantized fused MoE, as ``CPUUnquantizedExperts`` calls it: weights
  prepacked once with ``cpu_prepack_moe_weight(w, isa)``, then ``cpu_fused_moe(out, x, w13, w2, None, None,
  topk_weights, topk_ids, "silu", isa)`` (``isa`` "amx" where AMX exists, else "vec");
- ``torch loop``: a plain per-expert loop over the dense weights (``benchmarks.kernels.torch_dense_moe``).

Each call gets a fresh random routing (uniform top-k, softmax weights), cycled from ``--routings`` drawn
ones, so the routed experts' weights are not cache-hot from the previous call. Call c of round r takes routing
(r · calls + c) mod routings: with ``--routings`` ≥ rounds × calls no timed call of a path repeats a routing, so
the experts' row counts at prefill sizes keep changing as in a serving engine, and a cost paid per new product
shape (a GEMM library compiling a kernel for each, BENCHMARKS.md §10.24–§10.25) is timed instead of paid once in
the warm-up. Timing: ``--rounds`` alternating rounds (every path once per round, in turn; odd rounds reverse the
order of the paths, since a path ran 17–25 % faster second than first in a round at identical code: BENCHMARKS.md
§10.12); a round runs each path ``--calls`` times and keeps the mean; the table gives the median over rounds (use
an even ``--rounds`` for each path to run as often in each place). The copy bandwidth (a 512 MiB ``copy_``,
``--copy-mib``: (read + write bytes) / time) is one more path in the same rounds, so it sees the same machine load.
Each row: ms, the bytes the path must read (the routed experts' weights or factors plus shared ones, in the dtype
the path multiplies in: ``ours`` converts bf16 to fp32 at load on CPUs without native bf16, so its bytes are fp32
there; x and out included), achieved GB/s (those bytes / time) and its fraction of the copy bandwidth, and the
speed-up of ``ours`` over vLLM dense. ``--dynamic-prune R`` times base_delta with D²-MoE's dynamic base pruning on
(Eq. 9: ``round(R · I)`` base channels dropped per call, in the op and the torch op), as the plugin serves it with
``VLLM_MOE_COMPRESS_DYNAMIC_PRUNE=1``; the bytes column does not change (the dropped columns are still read).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import subprocess
import time
from pathlib import Path
from unittest import mock

import torch

from benchmarks.kernels import MODELS, SCHEMES, ModelShape, check_reachable, torch_dense_moe, write_atomically
from vllm_moe_compress import request_amx_tile_state
from vllm_moe_compress.kernels import cpu_extension
from vllm_moe_compress.kernels.base_delta_cpu import compute_dtype
from vllm_moe_compress.offline.budget import UnreachableRatioError

MODELS = {**MODELS, "brown-qwen3-moe": ModelShape(4, 256, 128, 32, 4, 8192, 4, 2, 64, qk_norm=True)}

CPU_PATHS = {"base_delta": "base_delta", "sparse_lowrank": "sparse_lowrank", "basis_residual": "basis_residual",
             "basis_residual_no_residual": "basis_residual"}
"""Benchmarked layer -> its scheme's CPU path (``kernels/<scheme>_cpu.py``: ``prepare`` + ``<scheme>_moe``)."""


class CopyBandwidth:
    """A 512 MiB (``--copy-mib``) tensor copy, timed as one more path in every round: GB/s = (read + write
    bytes) / time."""

    def __init__(self, mib: int = 512):
        self.src = torch.ones(mib * 2**18)
        self.dst = torch.empty_like(self.src)

    def __call__(self, *inputs):
        self.dst.copy_(self.src)

    def gbs(self, ms: float) -> float:
        return 2 * self.src.numel() * 4 / ms / 1e6


def dense_baselines(num_experts: int, h: int, i: int, dtype, gen, torch_loop: bool):
    """``{name: forward}`` of vLLM dense (and the torch loop) on random dense experts, and vLLM's ISA. vLLM's is
    its CPU unquantized fused MoE on prepacked weights (``CPUUnquantizedExperts``'s call). The weights are drawn
    expert by expert in ``dtype``; without the torch loop each expert is prepacked as drawn and only the packed
    copy kept (``cpu_prepack_moe_weight`` packs the experts independently: packing them one at a time gives the
    same tensor), so the peak is the packed weights plus one expert (Mixtral-8x7B bf16: 2.8 GB)."""
    from vllm import _custom_ops as ops

    isa = "amx" if torch.cpu._is_amx_tile_supported() and dtype == torch.bfloat16 else "vec"
    if isa == "amx" and not request_amx_tile_state():  # vLLM's AMX kernel does not ask: SIGILL otherwise
        raise RuntimeError("the CPU reports AMX, but the kernel refused the AMX tile state (arch_prctl)")

    def expert(rows, cols):
        return torch.randn(1, rows, cols, generator=gen).div_(cols**0.5).to(dtype)

    def weights(rows, cols):
        """(dense [E, rows, cols] or None, prepacked)"""
        if torch_loop:
            dense = torch.cat([expert(rows, cols) for _ in range(num_experts)])
            return dense, ops.cpu_prepack_moe_weight(dense, isa)
        packed = None
        for e in range(num_experts):
            one = ops.cpu_prepack_moe_weight(expert(rows, cols), isa)
            if packed is None:
                packed = one.new_empty(num_experts, *one.shape[1:])
            packed[e] = one[0]
        return None, packed

    w13, p13 = weights(2 * i, h)
    w2, p2 = weights(h, i)

    def dense(x, ids, topk_weights):
        out = torch.empty_like(x)
        ops.cpu_fused_moe(out, x, p13, p2, None, None, topk_weights, ids, "silu", isa)
        return out

    paths = {f"vLLM dense ({isa})": dense}
    if torch_loop:
        paths["torch loop"] = lambda x, ids, w: torch_dense_moe(x, w13, w2, w, ids)
    return paths, isa


def timed_rounds(paths: dict, inputs: list, rounds: int, calls: int, clock=time.perf_counter,
                 flush=None, warm: bool = False) -> dict[str, float]:
    """Median over ``rounds`` of each path's mean ms per call; call c of round r takes ``inputs[(r · calls + c) mod
    len(inputs)]``; paths alternate within every round, in the given order in even rounds and reversed in odd ones
    (the second path of a round found part of the first one's routed factors in cache: 17–25 % faster at identical
    code, BENCHMARKS.md §10.12). ``flush``
    (untimed) runs before each path's calls, so every path starts from the same cold caches: a layer that fits
    in L3 (the reference model's) ran ~1.5× slower as the path right after the copy than as the next one, the
    same op in both places. ``warm``: instead, one untimed call of the path right before its timed ones, so a layer
    that fits in cache is timed from cache (the reference model's timed the same either way, BENCHMARKS.md §10.19).
    ``clock``: wall time (``time.perf_counter``) or this process's CPU time (``time.process_time``: on a loaded
    machine it leaves out the time the process waited for a core)."""
    for fn in paths.values():  # warm-up (and first-call allocations)
        fn(*inputs[0])
    samples = {name: [] for name in paths}
    for r in range(rounds):
        for name, fn in (paths.items() if r % 2 == 0 else reversed(paths.items())):
            if warm:
                fn(*inputs[0])
            elif flush is not None:
                flush()
            start = clock()
            for c in range(calls):
                fn(*inputs[(r * calls + c) % len(inputs)])
            samples[name].append((clock() - start) / calls * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def other_ops(source: Path):
    """The ops compiled from another ``lowrank_moe_cpu.cpp``, registered as ``torch.ops.moe_compress_cpu_other``
    (built as kernels/cpu_extension.py builds the op, next to this checkout's build)."""
    text = source.read_text()
    for macro in ("TORCH_LIBRARY", "TORCH_LIBRARY_IMPL"):
        text = text.replace(f"{macro}(moe_compress_cpu,", f"{macro}(moe_compress_cpu_other,")
    build = cpu_extension.build_directory() / "other"
    build.mkdir(exist_ok=True)
    copy = build / "other.cpp"
    if not copy.exists() or copy.read_text() != text:
        copy.write_text(text)
    cpu_extension.load_library("moe_compress_cpu_other", copy, build)
    other = torch.ops.moe_compress_cpu_other
    # The process-wide settings cpu_ops() gives this checkout's op, where the other source has them: without
    # set_amx_gemm its bf16 prefill products would take at::mm (on a copy of the pair layout back to rows).
    ops = cpu_extension.cpu_ops()
    if "set_amx_gemm" in text:
        other.set_amx_gemm(ops.amx_gemm())
    if "set_expert_parallel" in text:
        previous = ops.set_expert_parallel(0)
        ops.set_expert_parallel(previous)
        other.set_expert_parallel(previous)
    return other


OLD_META_COLUMNS = {"base_delta": 5, "sparse_lowrank": 11, "basis_residual": 11}
"""meta's columns in the ops from before the pair layout: the row-major layout's meta begins with them (the first
rows of the expand-side blocks it added equal the other blocks' there)."""


def rows_layout(module, scheme: str, args) -> list[torch.Tensor]:
    """The layout's fields as the ops from before the pair layout take them: prepared with the AMX path off (so
    row-major), meta cut to its old columns, without ``pairs`` or ``base_down_norms``."""
    from vllm_moe_compress.kernels.cpu_extension import cpu_ops

    previous = cpu_ops().set_amx_gemm(0)
    try:
        layout = module.prepare(*args)
    finally:
        cpu_ops().set_amx_gemm(previous)
    fields = dense_as_before(base_down_as_before(layout))._replace(
        meta=layout.meta[:, :OLD_META_COLUMNS[scheme]].contiguous())
    return without_base_down_norms(fields)[:-1]


def base_down_as_before(layout):
    """``layout`` with its base down as Bᵀ [C, H], as the ops from before ``base_down_projected`` read it (they
    expand it; this op projects B [H, C] where ``base_down_projected``); other layouts as they are."""
    if "base_down" not in layout._fields or not cpu_extension.base_down_projected(layout.base_down.dtype,
                                                                                  bool(layout.pairs.item())):
        return layout
    return layout._replace(base_down=layout.base_down.t().contiguous())


def dense_as_before(layout):
    """``layout`` with basis_residual's dense weights as W_eᵀ [E, in, out], as the ops from before
    ``dense_projected`` read them (this op projects W_e [E, out, in] where ``dense_projected``); other layouts as
    they are."""
    if "down_dense" not in layout._fields or not cpu_extension.dense_projected(layout.down_dense.dtype,
                                                                               bool(layout.pairs.item())):
        return layout
    dense = {f"{q}_dense": getattr(layout, f"{q}_dense") for q in ("gate", "up", "down")}
    return layout._replace(**{name: t.transpose(1, 2).contiguous() for name, t in dense.items() if t.numel()})


def without_base_down_norms(layout) -> list[torch.Tensor]:
    """``layout``'s fields without ``base_down_norms``, as the ops from before it take them (they computed
    D²-MoE's column norms of the base down per call)."""
    return [tensor for name, tensor in layout._asdict().items() if name != "base_down_norms"]


def untiled_layout(module, args):
    """``module.prepare(*args)`` with the pair layout's pair rows across each block's whole width, as the ops
    before its column tiles read it (BENCHMARKS.md §10.22): one tile as wide as any block."""
    with mock.patch.object(cpu_extension, "PAIR_TILE", 1 << 62):
        return module.prepare(*args)


def with_op_setting(forward, layout, setter: str, value: int):
    """``forward`` on ``layout`` with the C++ op's process-wide setting ``setter`` (``set_small_row_limit``,
    ``set_expert_parallel``) at ``value`` for the call, restored after it."""
    from vllm_moe_compress.kernels.cpu_extension import cpu_ops

    def call(x, ids, w):
        previous = getattr(cpu_ops(), setter)(value)
        try:
            return forward(x, ids, w, layout)
        finally:
            getattr(cpu_ops(), setter)(previous)

    return call


def compressed_paths(scheme: str, model, ratio: float, dtype, seed: int, gen, compare_at_mm: bool = False,
                     compare_split: bool = False, compare_source: Path | None = None,
                     compare_small_pages: bool = False, torch_op: bool = True, dynamic_prune: float = 0.0):
    """``{name: forward}`` of the scheme's paths and ``read_bytes(used, name)``. Without the torch op, the
    layer's own tensors are freed once the CPU layout is prepared. ``dynamic_prune`` (base_delta): D²-MoE's
    dynamic pruning of ``round(dynamic_prune · I)`` base channels per call (at most C), as the plugin runs it with
    ``VLLM_MOE_COMPRESS_DYNAMIC_PRUNE=1``, in every path that has it."""
    import importlib

    from vllm_moe_compress.kernels import base_delta_torch
    from vllm_moe_compress.kernels.cpu_extension import cpu_ops

    layer = SCHEMES[scheme](model, ratio, seed, dtype, torch.device("cpu"), gen)
    paths = {"torch op": layer.torch_moe}
    drop = ()  # the base_delta forwards' trailing num_dynamic_drop
    if scheme == "base_delta":
        drop = (min(round(dynamic_prune * model.intermediate), layer.torch_args[7].numel()),)
        paths["torch op"] = lambda x, ids, w: base_delta_torch.base_delta_moe(x, ids, w, *layer.torch_args, *drop)
    elem = {"torch op": dtype.itemsize}
    if scheme in CPU_PATHS:
        module = importlib.import_module(f"vllm_moe_compress.kernels.{CPU_PATHS[scheme]}_cpu")
        layout = module.prepare(*layer.torch_args)
        scheme_forward = getattr(module, f"{CPU_PATHS[scheme]}_moe")

        def forward(x, ids, w, layout):
            return scheme_forward(x, ids, w, layout, *drop)

        paths = {"ours": lambda x, ids, w: forward(x, ids, w, layout), **paths}
        elem["ours"] = compute_dtype(dtype).itemsize
        variants = {"ours (at::mm only)": ("set_small_row_limit", 0)} if compare_at_mm else {}
        if compare_split:
            variants["ours (experts in turn)"] = ("set_expert_parallel", 0)
        for label, (setter, value) in variants.items():
            paths = {"ours": paths.pop("ours"), label: with_op_setting(forward, layout, setter, value), **paths}
            elem[label] = elem["ours"]
        if compare_small_pages:
            small = type(layout)(*(t.clone() for t in layout))
            paths["ours (4 KiB pages)"] = lambda x, ids, w: forward(x, ids, w, small)
            elem["ours (4 KiB pages)"] = elem["ours"]
        if compare_source is not None:
            other = getattr(other_ops(compare_source), CPU_PATHS[scheme])
            name = f"ours ({compare_source.name})"
            before = small if compare_small_pages else layout  # main's layouts were on 4 KiB pages
            source_text = compare_source.read_text()
            if "Tensor pairs" not in source_text:
                before = rows_layout(module, CPU_PATHS[scheme], layer.torch_args)
            else:
                if "kPairTile" not in source_text:
                    before = untiled_layout(module, layer.torch_args)
                if "base_down_projected" not in source_text:
                    before = base_down_as_before(before)
                if "dense_projected" not in source_text:
                    before = dense_as_before(before)
                if "base_down_norms" not in source_text:
                    before = without_base_down_norms(before)
            paths = {"ours": paths.pop("ours"), name: lambda x, ids, w: other(x, ids, w, *before, *drop), **paths}
            elem[name] = elem["ours"]

    if not torch_op:
        del paths["torch op"]
        layer = dataclasses.replace(layer, triton_moe=None, torch_moe=None, torch_args=())

    def read_bytes(used: torch.Tensor, name: str) -> int:
        return elem[name] * layer.read_params(used)

    return paths, read_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["qwen3-30b-a3b", "mixtral-8x7b"])
    parser.add_argument("--schemes", nargs="+", choices=sorted(SCHEMES), default=["base_delta"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.6])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 256])
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds of every path in turn; odd rounds reverse the order (default 4: each path as "
                        "often first as last)")
    parser.add_argument("--calls", type=int, default=4, help="calls per path per round (default 4)")
    parser.add_argument("--routings", type=int, default=4,
                        help="random routings cycled through (default 4); with at least rounds x calls every timed "
                        "call of a path gets a routing (and prefill row counts) it has not seen")
    parser.add_argument("--skip", nargs="*", choices=["torch op", "torch loop"], default=[],
                        help="paths not timed: the torch loop needs an unpacked copy of the dense weights (2x the "
                        "dense memory); both run bf16 GEMMs, ~100x slower than fp32 on CPUs without native bf16")
    parser.add_argument("--compare-at-mm", action="store_true",
                        help="also time ours with the small-row loops off (every product an at::mm)")
    parser.add_argument("--compare-expert-parallel", action="store_true",
                        help="also time ours with the active experts run in turn (the default splits them over "
                             "the threads)")
    parser.add_argument("--compare-source", type=Path,
                        help="also time the same layouts through the ops compiled from this lowrank_moe_cpu.cpp "
                        "(e.g. `git show <commit>:kernels/csrc/lowrank_moe_cpu.cpp > old.cpp`)")
    parser.add_argument("--compare-small-pages", action="store_true",
                        help="also time ours on a plain copy of the layout (4 KiB pages; doubles the layout memory)")
    parser.add_argument("--copy-mib", type=int, default=512,
                        help="size of the copy that measures the bandwidth (default 512 MiB; source and destination "
                        "take twice that)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="time per call: wall (default) or this process's CPU time (all its threads; on a "
                        "loaded machine it leaves out the waits for a core)")
    parser.add_argument("--warm", action="store_true",
                        help="time each path from warm caches: one untimed call right before its timed ones, no "
                        "flush (BENCHMARKS.md §10.19)")
    parser.add_argument("--dynamic-prune", type=float, default=0.0, metavar="RATIO",
                        help="base_delta: D²-MoE's dynamic pruning of round(RATIO · I) base channels per call, as "
                             "VLLM_MOE_COMPRESS_DYNAMIC_PRUNE=1 serves a checkpoint whose dynamic_prune_ratio is RATIO "
                             "(default 0: off, as vllm serve runs by default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/cpu_moe.md"))
    args = parser.parse_args()
    if not 0 <= args.dynamic_prune < 1:
        parser.error(f"--dynamic-prune {args.dynamic_prune} is outside [0, 1)")
    for name, scheme, ratio in itertools.product(args.models, args.schemes, args.ratios):
        try:  # before any timing: a run stopped half-way writes no table
            check_reachable(scheme, MODELS[name], ratio)
        except UnreachableRatioError as e:
            parser.error(f"{name}, {scheme}: {e}")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    cpu = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if l.startswith("Model name")), "?")
    copy = CopyBandwidth(args.copy_mib)
    header = [f"CPU: {cpu}; torch threads {args.threads}; clock {args.clock}; load average before: "
              f"{os.getloadavg()[0]:.1f}; median "
              f"of {args.rounds} alternating rounds of {args.calls} calls{' from warm caches' if args.warm else ''}; "
              f"copy GB/s = a {args.copy_mib} MiB copy's (read + write) bytes / time, timed in the same rounds"
              + (f"; base_delta with dynamic pruning of {args.dynamic_prune:.0%} of I." if args.dynamic_prune else "."),
              "",
              "| model | dtype | scheme | ratio | tokens | path | ms | MB read | GB/s | copy GB/s | % copy "
              "| vLLM dense ms / path ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines = list(header)
    for name in args.models:
        model = MODELS[name]
        h, i, num_experts = model.hidden, model.intermediate, model.experts
        for dtype in (getattr(torch, d) for d in args.dtypes):
            dense_paths = {}
            for scheme in args.schemes:
                for ratio in args.ratios:
                    paths, read_bytes = compressed_paths(scheme, model, ratio, dtype, args.seed, gen,
                                                           args.compare_at_mm, args.compare_expert_parallel,
                                                           args.compare_source, args.compare_small_pages,
                                                           "torch op" not in args.skip, args.dynamic_prune)
                    if not dense_paths:  # after the first layout: the two are never built at the same time
                        dense_paths, isa = dense_baselines(num_experts, h, i, dtype, gen,
                                                           "torch loop" not in args.skip)
                    all_paths = {**paths, **dense_paths}
                    for tokens in args.tokens:
                        inputs = []
                        for _ in range(args.routings):
                            x = torch.randn(tokens, h, generator=gen).to(dtype)
                            top_logits, ids = torch.randn(tokens, num_experts, generator=gen).topk(model.top_k, dim=1)
                            inputs.append((x, ids.to(torch.int32), top_logits.softmax(dim=1)))
                        ms = timed_rounds({**all_paths, "copy": copy}, inputs, args.rounds, args.calls,
                                          time.process_time if args.clock == "cpu" else time.perf_counter, copy,
                                          args.warm)
                        dense_ms, copy_gbs = ms[f"vLLM dense ({isa})"], copy.gbs(ms.pop("copy"))
                        for path, t in ms.items():
                            used = torch.zeros(num_experts, dtype=torch.bool)  # mean over the routings
                            read = []
                            for _, ids, _ in inputs:
                                used.zero_()
                                used[ids.long().flatten()] = True
                                io = 2 * tokens * h * dtype.itemsize
                                read.append(io + (read_bytes(used, path) if path in paths
                                                  else dtype.itemsize * 3 * h * i * int(used.sum())))
                            mb = statistics.mean(read) / 1e6
                            gbs = mb / t
                            lines.append(f"| {name} | {dtype_name(dtype)} | {scheme} | {ratio:.0%} | {tokens} | {path} | "
                                         f"{ms_text(t)} | {mb:.0f} | {gbs:.1f} | {copy_gbs:.1f} | {gbs / copy_gbs:.0%} | "
                                         f"{dense_ms / t:.2f}× |")
                            print(lines[-1], flush=True)
                    del paths, all_paths, read_bytes  # freed before the next layout is built
            del dense_paths
    lines.append("")
    lines.append(f"Load average after: {os.getloadavg()[0]:.1f}.")
    write_atomically(args.out, "\n".join(lines) + "\n")
    print(lines[-1])
    print(f"wrote {args.out}")


def ms_text(ms: float) -> str:
    """Two decimals, four below 1 ms (the reference model's layer takes tens of µs)."""
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.4f}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


if __name__ == "__main__":
    main()
