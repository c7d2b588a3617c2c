"""GPU benchmark of the Triton MoE kernels of one scheme against a dense MoE with the same routing.

    python -m benchmarks.kernels --scheme base_delta --out runs/kernels.md
    python -m benchmarks.kernels --scheme sparse_lowrank --out runs/kernels-sparse_lowrank.md
    python -m benchmarks.kernels --scheme basis_residual      (and basis_residual_no_residual)

One MoE layer at Qwen3-30B-A3B shapes (hidden 2048, moe_intermediate 768, 128 experts, top-8) and Mixtral-8x7B
shapes (4096 / 14336, 8 experts, top-2), bf16, for each token count and compression ratio:

- the layer from the compressor's own accounting (``offline/budget.py``, the ratio over total model
  parameters, random routing frequencies):
  - ``base_delta``: D²-MoE's base of ``I − round(0.05·I)`` channels (``D2MoE().static_channels``) and the
    leftover ranks to the most-routed experts (so ranks are ragged by one);
  - ``sparse_lowrank``: RS-MoE's defaults (``RSMoE()``: ridge down base [H, I], 80 % of the budget to sparse
    units) partitioning random unit scores (``partition_units``): ragged sparse and low-rank unit counts
    per expert, one rank per expert;
  - ``basis_residual`` (RFID-MoE, dense down): ``RFIDMoE()``'s groups of 4 and budget, ragged group ranks
    from ``allocate_group_ranks`` on random importances, the 3 % residual hashed in the kernel tile
    (``basis_residual_no_residual``: the same method with ``residual_fraction=0``);
- random uniform top-k routing (softmax weights), the same for both paths;
- kernel time: median of ``--repeats`` runs timed with CUDA events, L2 flushed before each run; both paths
  are replayed from a CUDA graph (as vLLM serves decode) unless the dense baseline is the torch loop, which
  syncs with the host and runs eagerly (the table says ``graph`` or ``eager``);
- achieved bandwidth = bytes the compressed layer must read (base, the stored parameters of every expert that
  gets a token, x and out; intermediates not counted) / time, and TFLOP/s, against a copy bandwidth and a bf16
  matmul TFLOP/s measured in the same run;
- the dense baseline: vLLM's Triton ``fused_experts`` if it imports on this machine, else a torch loop over
  experts on grouped tokens (the header says which);
- the relative error ‖ours − torch path‖/‖torch path‖ of every configuration.

The ``bytes ratio`` column is the dense layer's bytes over ours: the speed-up a purely bandwidth-bound pair
of kernels would show. Needs a CUDA GPU; refuses to run without one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from vllm_moe_compress.offline.budget import LayerShape, allocate_ranks, plan_budget
from vllm_moe_compress.offline.methods.base import CompressionMethod
from vllm_moe_compress.offline.methods.d2 import D2MoE
from vllm_moe_compress.offline.methods.group_basis import allocate_group_ranks
from vllm_moe_compress.offline.methods.rfid import RFIDMoE, RFIDOptions
from vllm_moe_compress.offline.methods.rs import RSMoE, UnitPlan, partition_units


@dataclass(frozen=True)
class ModelShape:
    """What the parameter accounting needs: the MoE layer and the rest of the model (untied embeddings)."""

    layers: int
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    qk_norm: bool

    @property
    def layer(self) -> LayerShape:
        return LayerShape(self.experts, self.hidden, self.intermediate)

    @property
    def non_expert_params(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        per_layer = attention + self.hidden * self.experts + 2 * self.hidden + 2 * self.head_dim * self.qk_norm
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden

    @property
    def total_params(self) -> int:
        return self.non_expert_params + self.layers * self.layer.dense_expert_params


MODELS = {
    "qwen3-30b-a3b": ModelShape(48, 2048, 768, 128, 8, 151936, 32, 4, 128, qk_norm=True),
    "mixtral-8x7b": ModelShape(32, 4096, 14336, 8, 2, 32000, 32, 8, 128, qk_norm=False),
}


def layer_budget(model: ModelShape, ratio: float, method: CompressionMethod) -> int:
    """Rank-dependent parameters of one MoE layer at ``ratio`` of total parameters, as the compressor plans it."""
    shape, layers = model.layer, range(model.layers)
    plan = plan_budget(model.total_params, {l: shape for l in layers}, ratio,
                       {l: method.fixed_params(shape) for l in layers}, {l: method.capacity(shape) for l in layers},
                       method.name)
    return plan.layer_budgets[0]


def d2_ranks(model: ModelShape, ratio: float, gen: torch.Generator) -> tuple[list[int], int]:
    """Per-expert rank (same for gate, up, down) and base channels C of one layer at ``ratio``."""
    method, shape = D2MoE(), model.layer
    frequencies = torch.rand(shape.num_experts, generator=gen).tolist()
    return (allocate_ranks(layer_budget(model, ratio, method), shape, frequencies, set()),
            method.static_channels(shape))


def rs_units(model: ModelShape, ratio: float, gen: torch.Generator) -> UnitPlan:
    """RS-MoE's sparse / low-rank / pruned partition of one layer at ``ratio``, on random unit scores."""
    method, shape = RSMoE(), model.layer
    scores = torch.rand(shape.num_experts, shape.intermediate_size, generator=gen)
    frequencies = torch.rand(shape.num_experts, generator=gen).tolist()
    return partition_units(scores, layer_budget(model, ratio, method), shape.hidden_size, method.opts.sparse_share,
                           method.opts.lowrank_share, frequencies)


def rfid_method(residual: bool) -> RFIDMoE:
    """RFID-MoE as the basis_residual builders plan it: a 3 % hashed residual, or none."""
    return RFIDMoE(RFIDOptions(residual_fraction=0.03 if residual else 0.0))


def rfid_group_ranks(model: ModelShape, ratio: float, residual: bool, gen: torch.Generator):
    """RFID-MoE's per-group basis ranks of gate and up (down dense), its residual size a and group size k for
    one layer at ``ratio``, on random group importances."""
    method, shape = rfid_method(residual), model.layer
    extra = method.extra_ranks(layer_budget(model, ratio, method), shape)
    num_groups = method.num_groups(shape)
    importance = torch.rand(num_groups, generator=gen).tolist()
    ranks = {p: allocate_group_ranks(num_groups + extra[p], importance, method.max_rank(p, shape))
             for p in method.factorized}
    return ranks, method.residual_size(shape), method.opts.group_size


@dataclass(frozen=True)
class CompressedLayer:
    """One compressed layer to time: its Triton and torch forwards ``(x, topk_ids, topk_weights) → out``, the
    parameters each expert stores, and the shared ones (a base: read once, multiplied once per token)."""

    triton_moe: Callable
    torch_moe: Callable
    expert_params: torch.Tensor
    """int64 [E], on the device."""
    shared_params: int
    group_params: torch.Tensor | None = None
    """int64 [m], on the device, when the experts form m contiguous groups: what a group shares (basis_residual's
    right factor and η), read once if any of its experts gets a token."""
    pair_flops: torch.Tensor | None = None
    """int64 [E], on the device: operations per routed pair besides 2 per expert parameter (basis_residual: the
    group right factor's product and the hashed residual's GEMMs)."""
    torch_args: tuple = ()
    """What the torch path takes after ``topk_weights``: what the CPU paths' ``prepare`` takes
    (benchmarks/cpu_moe.py)."""

    def read_params(self, used: torch.Tensor) -> int:
        """Parameters the layer reads when the experts ``used`` (bool [E]) get tokens."""
        params = self.shared_params + int(self.expert_params[used].sum())
        if self.group_params is not None:
            params += int(self.group_params[used.view(self.group_params.numel(), -1).any(1)].sum())
        return params

    def flops(self, topk_ids: torch.Tensor) -> int:
        pairs = topk_ids.long()
        flops = 2 * (topk_ids.shape[0] * self.shared_params + int(self.expert_params[pairs].sum()))
        return flops + (int(self.pair_flops[pairs].sum()) if self.pair_flops is not None else 0)


def random_tensors(gen: torch.Generator, dtype, device):
    """``randn(*shape, fan_in=shape[-1])``: random values over √fan_in, so activations stay O(1)."""
    def randn(*shape, fan_in=None):
        fan_in = shape[-1] if fan_in is None else fan_in
        return (torch.randn(*shape, generator=gen, device=device) / max(fan_in, 1) ** 0.5).to(dtype)

    return randn


def base_delta_factors(model: ModelShape, ratio: float, seed: int, dtype, device, gen) -> tuple:
    """Random packed factors and base in the plugin's layout at D²-MoE's ranks: the arguments of
    ``kernels.base_delta_torch.base_delta_moe`` after ``topk_weights``."""
    ranks, channels = d2_ranks(model, ratio, torch.Generator().manual_seed(seed))
    h, i, total = model.hidden, model.intermediate, sum(ranks)
    randn = random_tensors(gen, dtype, device)
    rank_table = torch.tensor([ranks] * 3, device=device)
    base_channels = torch.randperm(i, generator=gen, device=device)[:channels].sort().values
    return (rank_table, randn(i, 2 * total), randn(2 * total, h), randn(h, total), randn(total, i),
            randn(2 * channels, h), randn(h, channels), base_channels)


def base_delta_layer(model: ModelShape, ratio: float, seed: int, dtype, device, gen) -> CompressedLayer:
    """``base_delta_factors`` through the Triton and torch paths."""
    from vllm_moe_compress.kernels import base_delta_torch, base_delta_triton

    factors = base_delta_factors(model, ratio, seed, dtype, device, gen)
    rank_table, base_channels = factors[0], factors[7]
    h, i = model.hidden, model.intermediate
    layout = base_delta_triton.BaseDeltaLayout.from_tensors(rank_table, base_channels, i)
    return CompressedLayer(
        lambda x, ids, w: base_delta_triton.base_delta_moe(x, ids, w, *factors, layout=layout),
        lambda x, ids, w: base_delta_torch.base_delta_moe(x, ids, w, *factors),
        rank_table[0] * 3 * (h + i), 3 * h * base_channels.numel(), torch_args=factors)


def sparse_lowrank_layer(model: ModelShape, ratio: float, seed: int, dtype, device, gen) -> CompressedLayer:
    """Random packed units, factors and down base in the plugin's layout at RS-MoE's partition."""
    from vllm_moe_compress.kernels import sparse_lowrank_torch, sparse_lowrank_triton

    units = rs_units(model, ratio, torch.Generator().manual_seed(seed))
    h, i = model.hidden, model.intermediate
    s, m, k = [len(c) for c in units.sparse], [len(c) for c in units.lowrank], units.ranks
    sparse, lowrank, rank, factor = sum(s), sum(m), sum(k), sum(r * n for r, n in zip(k, m))
    randn = random_tensors(gen, dtype, device)
    counts = [torch.tensor(c, device=device) for c in (s, m, [k] * 3)]
    channels = [torch.tensor(sum(c, []), device=device) for c in (units.sparse, units.lowrank)]
    tensors = (*counts, randn(2 * sparse, h), randn(h, sparse), randn(2 * factor, fan_in=max(k)), randn(2 * rank, h),
               randn(h, rank), randn(factor, fan_in=max(m)), randn(h, i), *channels)
    layout = sparse_lowrank_triton.SparseLowrankLayout.from_lists(s, m, [k] * 3, *(c.tolist() for c in channels),
                                                                  i, device)
    return CompressedLayer(
        lambda x, ids, w: sparse_lowrank_triton.sparse_lowrank_moe(x, ids, w, *tensors, layout=layout),
        lambda x, ids, w: sparse_lowrank_torch.sparse_lowrank_moe(x, ids, w, *tensors),
        torch.tensor([3 * h * a + 3 * r * (h + b) for a, b, r in zip(s, m, k)], device=device), h * i,
        torch_args=tensors)


def basis_residual_layer(model: ModelShape, ratio: float, seed: int, dtype, device, gen,
                         residual: bool) -> CompressedLayer:
    """Random coefficients, group right factors φ(B_g), η and dense down in the plugin's layout at RFID-MoE's
    ranks; experts in contiguous groups (expert e in group e // k, at position e % k)."""
    from vllm_moe_compress.kernels import basis_residual_torch, basis_residual_triton

    ranks, size, k = rfid_group_ranks(model, ratio, residual, torch.Generator().manual_seed(seed))
    h, i, num_experts = model.hidden, model.intermediate, model.experts
    num_groups = num_experts // k
    groups, slots = [e // k for e in range(num_experts)], [e % k for e in range(num_experts)]
    expert_ranks = [[ranks[p][g] for g in groups] for p in ("gate", "up")]
    gate_cols, gate_rows = sum(expert_ranks[0]), sum(ranks["gate"])
    randn = random_tensors(gen, dtype, device)
    coef = randn(i, gate_cols + sum(expert_ranks[1]), fan_in=max(ranks["gate"] + ranks["up"]))
    right = F.silu(2 * randn(gate_rows + sum(ranks["up"]), h))
    eta = randn(2 * num_groups, size, fan_in=h) if residual else coef.new_zeros(0)
    down = randn(num_experts, h, i)
    empty = coef.new_zeros(0)
    weights = basis_residual_triton.BasisResidualWeights(coef, right, eta, down, empty, empty, empty)
    layout = basis_residual_triton.BasisResidualLayout.from_lists(
        [*expert_ranks, [0] * num_experts], [ranks["gate"], ranks["up"], [0] * num_groups], groups, slots, False,
        h, i, i, 0, size, seed, device)
    no_ranks = torch.zeros(0, dtype=torch.int64)
    projections = [basis_residual_torch.ProjectionWeights(
        empty, part, torch.tensor(expert_ranks[j]), rows, torch.tensor(ranks[p]), empty,
        eta[j * num_groups: (j + 1) * num_groups] if residual else empty)
        for j, (p, part, rows) in enumerate((("gate", coef[:, :gate_cols], right[:gate_rows]),
                                             ("up", coef[:, gate_cols:], right[gate_rows:])))]
    projections.append(basis_residual_torch.ProjectionWeights(down, empty, no_ranks, empty, no_ranks, empty, empty))
    group_of, slot_of = torch.tensor(groups), torch.tensor(slots)
    group_rank = torch.tensor(ranks["gate"], device=device) + torch.tensor(ranks["up"], device=device)
    expert_rank = group_rank[group_of.to(device)]
    torch_args = (*projections, group_of, slot_of, "silu", seed, i, 0)
    return CompressedLayer(
        lambda x, ids, w: basis_residual_triton.basis_residual_moe(x, ids, w, weights, layout),
        lambda x, ids, w: basis_residual_torch.basis_residual_moe(x, ids, w, *torch_args),
        expert_rank * i + h * i, 0, group_rank * h + 2 * size,
        2 * expert_rank * h + (4 * h * i if residual else 0), torch_args)


SCHEMES = {"base_delta": base_delta_layer, "sparse_lowrank": sparse_lowrank_layer,
           "basis_residual": partial(basis_residual_layer, residual=True),
           "basis_residual_no_residual": partial(basis_residual_layer, residual=False)}

SCHEME_METHODS = {"base_delta": D2MoE, "sparse_lowrank": RSMoE,
                  "basis_residual": partial(rfid_method, residual=True),
                  "basis_residual_no_residual": partial(rfid_method, residual=False)}
"""Scheme -> the compression method whose budget its builder plans (``layer_budget``)."""


def check_reachable(scheme: str, model: ModelShape, ratio: float) -> None:
    """Raise ``UnreachableRatioError`` (its message names the reachable range) if ``scheme``'s method cannot reach
    ``ratio`` on ``model``: cheap (the budget plan only), so a benchmark can check every cell before timing any."""
    layer_budget(model, ratio, SCHEME_METHODS[scheme]())


def torch_dense_moe(x, w13, w2, topk_weights, topk_ids):
    """Dense baseline without vLLM: each expert's dense GEMMs on its grouped tokens (host syncs: eager only)."""
    inter = w2.shape[2]
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    token_of = order // topk_ids.shape[1]
    weight_of = topk_weights.reshape(-1)[order].to(x.dtype)[:, None]
    out, start = torch.zeros_like(x), 0
    for e, n in enumerate(torch.bincount(flat, minlength=w13.shape[0]).tolist()):
        tokens, w = token_of[start: start + n], weight_of[start: start + n]
        start += n
        if n:
            gate_up = x[tokens] @ w13[e].T
            out.index_add_(0, tokens, w * ((F.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w2[e].T))
    return out


def dense_baseline():
    """vLLM's fused_experts (Triton) when this machine's vLLM has it, else the torch loop; its name; whether
    it can be captured in a CUDA graph."""
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts

        probe = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
        fused_experts(probe, torch.randn(2, 128, 64, device="cuda", dtype=torch.bfloat16),
                      torch.randn(2, 64, 64, device="cuda", dtype=torch.bfloat16),
                      torch.rand(2, 1, device="cuda"), torch.zeros(2, 1, dtype=torch.int32, device="cuda"))
        return fused_experts, "vLLM fused_experts (Triton)", True
    except Exception as err:  # any import or launch failure means the fallback, named in the output
        print(f"vLLM fused_experts unavailable ({type(err).__name__}: {err}); using the torch grouped loop",
              file=sys.stderr)
        return torch_dense_moe, "torch loop over experts (vLLM fused_experts unavailable)", False


def median_ms(fn, flush: torch.Tensor, repeats: int, capture: bool = True) -> tuple[float, str]:
    """Median CUDA-event time of ``fn`` (replaying a CUDA graph of it if ``capture``), L2 flushed before
    every run."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    run, mode = fn, "eager"
    if capture:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run, mode = graph.replay, "graph"
    events = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events), mode


def device_ceilings(flush: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Measured copy bandwidth (GB/s, read + write) and bf16 matmul TFLOP/s of this GPU."""
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    copy_ms, _ = median_ms(lambda: dst.copy_(src), flush, repeats, capture=False)
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms, _ = median_ms(lambda: a @ b, flush, repeats, capture=False)
    return 2 * src.numel() * 2 / copy_ms / 1e6, 2 * n**3 / mm_ms / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scheme", choices=sorted(SCHEMES), default="base_delta",
                        help="compressed-expert scheme whose kernels are timed (default: base_delta)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.6],
                        help="fractions of total model parameters removed (default: 0.4 0.6)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=100, help="timed runs per configuration (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="Markdown table written here (default: runs/kernels-<scheme>.md)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py times the Triton kernels on a CUDA GPU, and torch sees none here. "
                 "The CPU correctness tests are tests/test_kernels_triton.py (Triton interpreter).")

    out = args.out or Path(f"runs/kernels-{args.scheme}.md")
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    dtype, device = torch.bfloat16, torch.device("cuda")
    flush = torch.empty(2**28, dtype=torch.uint8, device=device)  # 256 MiB, larger than any L2
    copy_gbs, mm_tflops = device_ceilings(flush, args.repeats)
    dense_moe, dense_name, dense_capturable = dense_baseline()
    lines = [f"Device: {torch.cuda.get_device_name()}; measured ceilings: copy {copy_gbs:.0f} GB/s, bf16 matmul "
             f"{mm_tflops:.0f} TFLOP/s. Scheme {args.scheme}. Dense baseline: {dense_name}. bf16, median of "
             f"{args.repeats} runs.", "",
             "| model | ratio | tokens | ours µs | dense µs | speed-up | bytes ratio | ours GB/s (% copy) "
             "| ours TFLOP/s (% matmul) | timing (ours / dense) | rel. error vs torch path |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.models:
        model = MODELS[name]
        h, i, num_experts = model.hidden, model.intermediate, model.experts
        w13 = torch.randn(num_experts, 2 * i, h, generator=gen, device=device).div_(h**0.5).to(dtype)
        w2 = torch.randn(num_experts, h, i, generator=gen, device=device).div_(i**0.5).to(dtype)
        for ratio in args.ratios:
            layer = SCHEMES[args.scheme](model, ratio, args.seed, dtype, device, gen)
            for tokens in args.tokens:
                x = torch.randn(tokens, h, generator=gen, device=device).to(dtype)
                logits = torch.randn(tokens, num_experts, generator=gen, device=device)
                topk_logits, topk_ids = logits.topk(model.top_k, dim=1)
                topk_ids, topk_weights = topk_ids.to(torch.int32), topk_logits.softmax(dim=1)

                def ours():
                    return layer.triton_moe(x, topk_ids, topk_weights)

                reference = layer.torch_moe(x, topk_ids, topk_weights).float()
                error = float((ours().float() - reference).norm() / reference.norm())
                ours_ms, ours_mode = median_ms(ours, flush, args.repeats)
                dense_ms, dense_mode = median_ms(lambda: dense_moe(x, w13, w2, topk_weights, topk_ids), flush,
                                                 args.repeats, capture=dense_capturable)

                used = torch.zeros(num_experts, dtype=torch.bool, device=device)
                used[topk_ids.long().flatten()] = True
                io_bytes = 2 * tokens * h * 2
                ours_bytes = 2 * layer.read_params(used) + io_bytes
                dense_bytes = 2 * 3 * h * i * int(used.sum()) + io_bytes
                ours_flops = layer.flops(topk_ids)
                gbs, tflops = ours_bytes / ours_ms / 1e6, ours_flops / ours_ms / 1e9
                lines.append(
                    f"| {name} | {ratio:.0%} | {tokens} | {ours_ms * 1e3:.1f} | {dense_ms * 1e3:.1f} | "
                    f"{dense_ms / ours_ms:.2f}× | {dense_bytes / ours_bytes:.2f} | {gbs:.0f} ({gbs / copy_gbs:.0%}) | "
                    f"{tflops:.1f} ({tflops / mm_tflops:.0%}) | {ours_mode} / {dense_mode} | {error:.1e} |")
                print(lines[-1], flush=True)
    write_atomically(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


if __name__ == "__main__":
    main()
