"""The Triton base_delta kernels under Triton's interpreter (CPU), against the torch path and float64 dense math.

Not collected by a plain ``pytest tests/``: ``tests/test_kernels_triton.py`` runs this file with pytest in a
subprocess whose environment has ``TRITON_INTERPRET=1``. Triton chooses interpretation when each
``triton.jit`` function is defined, its own library functions included, so the variable must be set
before the first ``import triton`` of the process, and other tests' vLLM imports load Triton early.

Every float buffer the Triton path allocates (output and intermediates) starts as NaN, so an element a
kernel fails to write shows up as NaN in the result. bf16 is tested too: the kernels convert every load
before arithmetic, which the interpreter handles exactly (see ``kernels/lowrank_moe_triton.py``).
"""

import os
import zlib

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through tests/test_kernels_triton.py (needs TRITON_INTERPRET=1 before Triton loads)",
                allow_module_level=True)

import vllm_moe_compress.kernels.base_delta_torch as torch_path  # noqa: E402
import vllm_moe_compress.kernels.base_delta_triton as triton_path  # noqa: E402
import vllm_moe_compress.kernels.lowrank_moe_triton as lowrank  # noqa: E402
import vllm_moe_compress.kernels.routing as routing  # noqa: E402
import vllm_moe_compress.kernels.routing_triton as routing_triton  # noqa: E402
from vllm_moe_compress.kernels.routing import align_pairs_by_expert  # noqa: E402
from vllm_moe_compress.format.names import base_channels_name  # noqa: E402
from vllm_moe_compress.format.schemes.base_delta import BaseDeltaLayer  # noqa: E402
from random_layers import load_scheme  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
"""Bound on ‖out − ref‖_F / ‖ref‖_F."""


def test_kernels_were_built_for_the_interpreter():
    assert lowrank.INTERPRETED


def random_layer(gen, hidden, intermediate, ranks, channels) -> BaseDeltaLayer:
    """float64 factors scaled so every stage's values are O(1); ``channels`` None = no base (svd baselines)."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) / shape[-1] ** 0.5

    factors = {}
    for proj, proj_ranks in zip(("gate", "up", "down"), ranks):
        out_dim, in_dim = (hidden, intermediate) if proj == "down" else (intermediate, hidden)
        factors[proj] = [(randn(out_dim, r), randn(r, in_dim)) if r else None for r in proj_ranks]
    base = None
    if channels is not None:
        c = len(channels)
        base = {"gate": randn(c, hidden), "up": randn(c, hidden), "down": randn(hidden, c)}
        channels = torch.tensor(channels)
    return BaseDeltaLayer(hidden, intermediate, factors, base, channels)


def dense_float64(layer: BaseDeltaLayer, x, ids, weights) -> torch.Tensor:
    """Σ_k w_k · W_down (silu(W_gate x) ⊙ W_up x) on the materialised float64 experts."""
    x64, out = x.double(), torch.zeros(x.shape, dtype=torch.float64)
    for e in range(layer.num_experts):
        gate, up, down = (layer.dense_weight(e, p) for p in ("gate", "up", "down"))
        out += (weights.double() * (ids == e)).sum(1, keepdim=True) * ((F.silu(x64 @ gate.T) * (x64 @ up.T)) @ down.T)
    return out


def rounded(layer: BaseDeltaLayer, dtype) -> BaseDeltaLayer:
    """The layer with every factor rounded to ``dtype`` (kept in float64), so the dense reference sees the
    same weights as the kernels and only the compute's rounding is measured."""
    def r(t):
        return t.to(dtype).double()

    factors = {p: [None if f is None else (r(f[0]), r(f[1])) for f in fs] for p, fs in layer.factors.items()}
    base = None if layer.base is None else {p: r(w) for p, w in layer.base.items()}
    return BaseDeltaLayer(layer.hidden_size, layer.intermediate_size, factors, base, layer.base_channels)


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every floating-point ``torch.empty``/``empty_like`` starts as NaN while the test runs."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_filled(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_filled(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_filled(empty_like(*a, **k)))


CASES = {
    # name: (tokens, top_k, experts, hidden, intermediate, ranks [gate, up, down] per expert, base channels)
    "ragged ranks, rank 0, idle expert": (37, 3, 6, 48, 40, [[3, 0, 17, 5, 40, 2], [4, 1, 0, 33, 6, 2],
                                                             [0, 7, 5, 20, 3, 9]], list(range(0, 40, 3))),
    "no base (svd)": (9, 2, 5, 32, 24, [[5, 9, 0, 2, 24]] * 3, None),
    "single token, top-8": (1, 8, 10, 32, 20, [[2, 3, 4, 5, 6, 7, 8, 9, 10, 1]] * 3, list(range(1, 20, 2))),
    "top-1, no down factors": (20, 1, 4, 32, 24, [[6, 2, 0, 9], [1, 4, 3, 0], [0] * 4], [0, 5, 7, 23]),
    "64-pair blocks, full base": (48, 3, 4, 24, 32, [[3, 8, 1, 0], [2, 0, 5, 7], [4, 4, 0, 6]], list(range(32))),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_torch_path_and_dense_float64(case, dtype, poisoned_buffers):
    tokens, top_k, num_experts, hidden, intermediate, ranks, channels = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case} {dtype}".encode()))
    layer = rounded(random_layer(gen, hidden, intermediate, ranks, channels), dtype)
    packed = {name: t.to(dtype) if t.is_floating_point() else t for name, t in layer.packed().items()}
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    # Expert 0 gets no token in the first case (idle expert); elsewhere any expert may be picked.
    low = 1 if case.startswith("ragged") else 0
    ids = torch.stack([torch.randperm(num_experts - low, generator=gen)[:top_k] + low for _ in range(tokens)]).int()
    weights = torch.rand(tokens, top_k, generator=gen)
    args = (x, ids, weights, packed["ranks"], packed["gate_up_u"], packed["gate_up_v"], packed["down_u"],
            packed["down_v"], packed["base_gate_up"], packed["base_down"], packed["base_channels"])
    if case.startswith("64-pair"):
        assert routing.block_size_for(ids.numel(), num_experts) == 64

    got = triton_path.base_delta_moe(*args)

    assert got.dtype == dtype and got.shape == x.shape
    dense = dense_float64(layer, x, ids, weights)
    reference = torch_path.base_delta_moe(*args).double()
    assert dense.norm() > 0.1 * tokens ** 0.5  # not a vacuous comparison
    for expected in (dense, reference):
        error = (got.double() - expected).norm() / expected.norm()
        assert error <= TOLERANCE[dtype], f"relative error {error:.2e}"


def test_dynamic_pruning_takes_the_torch_path():
    gen = torch.Generator().manual_seed(7)
    layer = random_layer(gen, 16, 12, [[2, 3, 1]] * 3, list(range(10)))
    packed = {name: t.float() if t.is_floating_point() else t for name, t in layer.packed().items()}
    x, ids, weights = torch.randn(5, 16, generator=gen), torch.tensor([[0, 2]] * 5), torch.rand(5, 2, generator=gen)
    args = (x, ids, weights, *(packed[k] for k in ("ranks", "gate_up_u", "gate_up_v", "down_u", "down_v",
                                                   "base_gate_up", "base_down", "base_channels")), 3)
    torch.testing.assert_close(triton_path.base_delta_moe(*args), torch_path.base_delta_moe(*args), rtol=0, atol=0)


@pytest.mark.parametrize("num_experts, tokens, top_k, block_m", [(9, 50, 4, 16), (6, 1, 1, 16), (128, 20, 8, 64),
                                                                  (5, 90, 3, 64)])
def test_one_launch_align_equals_torch_align(num_experts, tokens, top_k, block_m):
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)]).int()
    ids[ids == num_experts - 1] = 0  # the last expert idle, expert 0 busier
    assert ids.numel() <= routing_triton.MAX_PAIRS_ONE_PROGRAM
    got = routing_triton.align_pairs(ids, num_experts, block_m)
    expected = align_pairs_by_expert(ids, num_experts, block_m)
    for name, want in expected._asdict().items():
        assert torch.equal(torch.as_tensor(getattr(got, name)), torch.as_tensor(want)), name


PROJ_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def test_plugin_triton_branch_sums_over_tensor_parallel_ranks(poisoned_buffers):
    """``BaseDeltaScheme.apply_triton`` (the backend on CUDA devices) on each of 2 TP shards: its per-layer metadata
    comes from the config's host lists and this rank's local base channels; the shards sum to the layer."""
    from vllm_moe_compress.base_delta import BaseDeltaScheme

    gen = torch.Generator().manual_seed(11)
    channels = [0, 3, 4, 11, 12, 13, 20]  # 4 in the first half of the 24 channels, 3 in the second
    layer = rounded(random_layer(gen, 32, 24, [[3, 0, 6, 2], [1, 5, 0, 4], [2, 2, 7, 0]], channels), torch.float32)
    spec = layer.spec(0, "model.layers.0.mlp.experts")
    tensors = layer.to_tensors(spec.prefix, PROJ_NAMES, torch.float32)
    x, weights = torch.randn(9, 32, generator=gen), torch.rand(9, 2, generator=gen)
    ids = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(9)]).int()
    total = torch.zeros(9, 32)
    for tp_rank in range(2):
        scheme = BaseDeltaScheme(spec, PROJ_NAMES, {base_channels_name(spec.prefix): channels}, tp_rank, 2)
        total += scheme.apply_triton(load_scheme(scheme, tensors, backend="triton"), x, weights, ids)
    dense = dense_float64(layer, x, ids, weights)
    assert (total.double() - dense).norm() / dense.norm() <= TOLERANCE[torch.float32]
