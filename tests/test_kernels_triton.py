"""The Triton kernels' correctness tests (``tests/triton_interpreted.py``), run by Triton's interpreter on the CPU.

They run in a pytest subprocess with ``TRITON_INTERPRET=1`` in its environment: Triton decides at each
``triton.jit`` definition whether to interpret, so the variable must be set before Triton is first imported,
which other test modules (through vLLM) do early in this process; and it must not leak into the vLLM
servers other tests start. The torch-only grouping of pairs by expert is tested here directly.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.routing import align_pairs_by_expert

HERE = Path(__file__).resolve().parent


def test_triton_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "triton_interpreted.py")],
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
