"""The C++ CPU MoE path (kernels/base_delta_cpu.py) against float64 dense math on the materialised experts,
with fresh random inputs: ragged ranks including 0, idle experts, no base, top-1 and top-k, a single token,
dynamic base pruning, bf16 factors (computed in fp32 on CPUs without native bf16)."""

import pytest
import torch
import torch.nn.functional as F

from kernels import base_delta_cpu, base_delta_torch
from kernels.base_delta_torch import rank_offsets


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
}


@pytest.mark.parametrize("case", CASES)
def test_cpu_path_matches_float64_dense_math(case):
    ranks, channels, tokens, top_k, idle = CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    hidden, inter = 24, 20
    tensors = packed_layer(ranks, hidden, inter, channels, gen)
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    ids, weights = routing(tokens, len(ranks[0]), top_k, gen, idle)
    reference = dense_moe(x, ids, weights, dense_experts(*tensors))
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        layout = base_delta_cpu.prepare(tensors[0], *(t.to(dtype) for t in tensors[1:7]), tensors[7])
        out = base_delta_cpu.base_delta_moe(x.to(dtype), ids, weights, layout)
        assert out.dtype == dtype
        error = float((out.double() - reference).norm() / reference.norm())
        assert error <= tolerance, (dtype, error)


def test_dynamic_pruning_matches_the_torch_path():
    """D²-MoE Eq. 9: the same base-down columns dropped per batch as kernels/base_delta_torch.py."""
    gen = torch.Generator().manual_seed(1)
    tensors = packed_layer([[3, 1, 4, 2], [2, 2, 2, 2], [1, 3, 0, 2]], 16, 18, 14, gen)
    x = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    ids, weights = routing(5, 4, 2, gen)
    layout = base_delta_cpu.prepare(*tensors)
    for drop in (0, 3, 14):
        expected = base_delta_torch.base_delta_moe(x, ids, weights, *tensors, num_dynamic_drop=drop)
        out = base_delta_cpu.base_delta_moe(x, ids, weights, layout, num_dynamic_drop=drop)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
