"""The Triton kernels' correctness tests (``tests/triton_interpreted*.py``), run by Triton's interpreter on the CPU.

They run in a pytest subprocess with ``TRITON_INTERPRET=1`` in its environment: Triton decides at each
``triton.jit`` definition whether to interpret, so the variable must be set before Triton is first imported,
which other test modules (through vLLM) do early in this process; and it must not leak into the vLLM
servers other tests start. The torch-only grouping of pairs by expert is tested here directly, and every
kernel is compiled for an sm_90 GPU (Triton's compiler and ptxas need no GPU), which the interpreter does
not exercise.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from vllm_moe_compress.kernels.routing import align_pairs_by_expert

HERE = Path(__file__).resolve().parent
ACTIVATION_POINTERS = {"a_ptr", "v_ptr", "z_ptr", "u_ptr", "out_ptr", "addend_ptr", "w_ptr", "pair_rows_ptr"}
ACTIVATION_POINTERS |= {"x_ptr", "h_ptr", "sparse_ptr", "lowrank_u_ptr", "down_v_ptr", "sparse_down_ptr", "down_u_ptr"}


def test_triton_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    modules = sorted(str(path) for path in HERE.glob("triton_interpreted*.py"))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *modules],
                          cwd=HERE.parent, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


@pytest.mark.parametrize("block_m", [16, 64])
def test_align_groups_every_pair_once_by_expert(block_m):
    gen = torch.Generator().manual_seed(block_m)
    num_experts, top_k = 9, 4
    ids = torch.stack([torch.randperm(num_experts - 2, generator=gen)[:top_k] + 2 for _ in range(50)])  # 0, 1 idle
    blocks = align_pairs_by_expert(ids, num_experts, block_m)
    flat = ids.reshape(-1)
    used = blocks.sorted_pair < flat.numel()
    assert sorted(blocks.sorted_pair[used].tolist()) == list(range(flat.numel()))
    assert torch.equal(blocks.sorted_pair[blocks.slot_of_pair.long()], torch.arange(flat.numel(), dtype=torch.int32))
    slot_expert = blocks.block_expert.long().repeat_interleave(block_m)
    assert torch.equal(slot_expert[used], flat[blocks.sorted_pair[used].long()])
    assert set(blocks.block_expert.tolist()) - {num_experts} == set(range(2, num_experts))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_benchmark_refuses_to_run_without_cuda():
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--tokens", "1"], cwd=HERE.parent,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "CUDA GPU" in done.stderr, done.stderr


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles real GPU code")
def test_basis_residual_kernel_compiles_for_an_sm90_gpu_without_register_spills():
    """The hashed-residual expand kernel (kernels/basis_residual_triton.py): gated for decode and prefill tiles,
    and the factorised down; its other stages are the low-rank kernels compiled below."""
    import triton.language as tl

    from vllm_moe_compress.kernels import basis_residual_triton
    from vllm_moe_compress.kernels import lowrank_moe_triton as lowrank

    dot = {"DOT_DTYPE": tl.bfloat16, "PRECISION": "tf32"}
    pointers = {"coef_ptr": "bf16", "eta_ptr": "bf16", "seg_start_ptr": "i64"}
    residual = 188_743  # a residual size that is not a power of two (the modulo is a multiply-shift)
    for rows, gated in ((16, True), (64, True), (16, False)):
        constexprs = dict(TOP_K=8, SEG_WIDTH=201, GATED=gated, RESIDUAL_SIZE=residual, BLOCK_M=rows, BLOCK_N=64,
                          BLOCK_R=32 if rows == 16 else 64, BLOCK_K=basis_residual_triton.RESIDUAL_CHUNK)
        compiled = compile_for_gpu(basis_residual_triton._expand_residual_kernel, "bf16", {**constexprs, **dot},
                                   lowrank.num_warps_for(rows), pointer_types=pointers)
        assert spilled_bytes(compiled.asm["cubin"]) == 0, constexprs
        assert re.search(r"mma\S*\.f32\.bf16\.bf16", compiled.asm["ptx"]), constexprs
        assert not re.search(r"\b(rem|div)\.[su]32", compiled.asm["ptx"]), constexprs  # mod a: a multiply-shift


def compile_for_gpu(fn, activation: str, constexprs: dict, num_warps: int, capability: int = 90,
                    pointer_types: dict[str, str] | None = None):
    """Ahead-of-time compilation of a Triton kernel to a cubin, as a launch with these argument types would
    (``pointer_types``: element types of pointers the defaults below do not cover, e.g. ``{"eta_ptr": "bf16"}``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def arg_type(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if not name.endswith("_ptr"):
            return "i32"
        if pointer_types and name in pointer_types:
            return "*" + pointer_types[name]
        return "*" + (activation if name in ACTIVATION_POINTERS else "fp32" if name == "weight_ptr" else "i32")

    signature = {name: arg_type(name) for name in fn.arg_names}
    return triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps})


def spilled_bytes(cubin: bytes) -> int:
    """Per-thread stack bytes of a cubin's kernel (register spills), from the cuobjdump bundled with Triton."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([f"{triton.__path__[0]}/backends/nvidia/bin/cuobjdump", "--dump-resource-usage",
                                file.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def assert_compiled_cleanly(variants: list, activation: str, dot: dict) -> None:
    """Each (kernel, constexprs) compiles for sm_90 with its launcher's warps, spills no register, and (bf16)
    runs its dots on tensor cores with bf16 operands and fp32 accumulation."""
    from vllm_moe_compress.kernels.lowrank_moe_triton import num_warps_for

    for fn, constexprs in variants:
        rows = constexprs.get("BLOCK_M", constexprs.get("BLOCK_T"))
        compiled = compile_for_gpu(fn, activation, {**constexprs, **dot}, num_warps_for(rows))
        assert spilled_bytes(compiled.asm["cubin"]) == 0, (fn.__name__, constexprs)
        if activation == "bf16":
            assert re.search(r"mma\S*\.f32\.bf16\.bf16", compiled.asm["ptx"]), fn.__name__  # mma.sync or wgmma


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles real GPU code")
@pytest.mark.parametrize("activation", ["bf16", "fp32"])
def test_kernels_compile_for_an_sm90_gpu_without_register_spills(activation):
    import triton.language as tl

    from vllm_moe_compress.kernels import lowrank_moe_triton as lowrank
    from vllm_moe_compress.kernels import routing_triton

    dot = {"DOT_DTYPE": tl.bfloat16, "PRECISION": "tf32"} if activation == "bf16" else {
        "DOT_DTYPE": tl.float32, "PRECISION": "ieee"}
    variants = [  # fp32 (IEEE dots, no tensor cores): the most complex kernel only, to keep the test short
        (lowrank._expand_ranks_kernel, dict(TOP_K=8, SEG_WIDTH=201, GATED=True, HAS_ADDEND=True, BLOCK_M=16,
                                            BLOCK_N=64, BLOCK_R=32)),
    ]
    if activation == "bf16":  # every kernel and branch, and the alignment kernel (no activations)
        variants += [
            (lowrank._project_ranks_kernel, dict(TOP_K=8, SEG_WIDTH=201, A_ROWS_ARE_TOKENS=True, SCALE_BY_WEIGHT=False,
                                                 BLOCK_M=16, BLOCK_R=32, BLOCK_K=64)),
            (lowrank._project_ranks_kernel, dict(TOP_K=2, SEG_WIDTH=827, A_ROWS_ARE_TOKENS=False, SCALE_BY_WEIGHT=True,
                                                 BLOCK_M=64, BLOCK_R=64, BLOCK_K=64)),
            (lowrank._expand_ranks_kernel, dict(TOP_K=8, SEG_WIDTH=201, GATED=True, HAS_ADDEND=True, BLOCK_M=64,
                                                BLOCK_N=64, BLOCK_R=64)),
            (lowrank._expand_ranks_kernel, dict(TOP_K=2, SEG_WIDTH=827, GATED=False, HAS_ADDEND=False, BLOCK_M=16,
                                                BLOCK_N=64, BLOCK_R=32)),
            (lowrank._token_gemm_kernel, dict(TOP_K=8, GATHER_PAIRS=True, COLS_PER_EXPERT=False, ADD_PAIR_ROWS=True,
                                              BLOCK_T=16, BLOCK_N=32, BLOCK_K=64)),
            (lowrank._token_gemm_kernel, dict(TOP_K=8, GATHER_PAIRS=True, COLS_PER_EXPERT=False, ADD_PAIR_ROWS=True,
                                              BLOCK_T=64, BLOCK_N=64, BLOCK_K=64)),
            (lowrank._token_gemm_kernel, dict(TOP_K=1, GATHER_PAIRS=False, COLS_PER_EXPERT=False, ADD_PAIR_ROWS=False,
                                              BLOCK_T=64, BLOCK_N=64, BLOCK_K=64)),
        ]
    assert_compiled_cleanly(variants, activation, dot)
    if activation == "bf16":
        aligned = compile_for_gpu(routing_triton._align_kernel, activation, dict(BLOCK_M=16, E_PAD=128, BLOCK_P=64), 4)
        assert spilled_bytes(aligned.asm["cubin"]) == 0


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles real GPU code")
@pytest.mark.parametrize("activation", ["bf16", "fp32"])
def test_sparse_lowrank_kernels_compile_for_an_sm90_gpu_without_register_spills(activation):
    """The sparse_lowrank kernels and the reduction's per-expert column gather: bf16 decode and prefill tiles
    (tensor-core dots); fp32 the gate/up kernel's decode tile (its launcher's 32-wide chunks). No spills."""
    import triton.language as tl

    from vllm_moe_compress.kernels import lowrank_moe_triton as lowrank
    from vllm_moe_compress.kernels import sparse_lowrank_triton as sparse_lowrank

    gate_up = sparse_lowrank._gate_up_units_kernel
    if activation == "fp32":
        dot = {"DOT_DTYPE": tl.float32, "PRECISION": "ieee"}
        variants = [(gate_up, dict(TOP_K=8, SEG_WIDTH=201, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, BLOCK_R=32))]
    else:
        dot = {"DOT_DTYPE": tl.bfloat16, "PRECISION": "tf32"}
        variants = [
            (gate_up, dict(TOP_K=8, SEG_WIDTH=201, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, BLOCK_R=32)),
            (gate_up, dict(TOP_K=2, SEG_WIDTH=827, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_R=64)),
            (sparse_lowrank._down_project_kernel, dict(BLOCK_M=16, BLOCK_R=32, BLOCK_K=64)),
            (sparse_lowrank._down_units_kernel, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_R=64)),
            (lowrank._token_gemm_kernel, dict(TOP_K=8, GATHER_PAIRS=True, COLS_PER_EXPERT=True, ADD_PAIR_ROWS=True,
                                              BLOCK_T=64, BLOCK_N=64, BLOCK_K=64)),
        ]
    assert_compiled_cleanly(variants, activation, dot)
