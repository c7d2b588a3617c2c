"""GPU benchmark of the Triton ``base_delta`` MoE kernels against a dense MoE with the same routing.

    python -m benchmarks.kernels --out runs/kernels.md

One MoE layer at Qwen3-30B-A3B shapes (hidden 2048, moe_intermediate 768, 128 experts, top-8) and Mixtral-8x7B
shapes (4096 / 14336, 8 experts, top-2), bf16, for each token count and compression ratio:

- ranks from the compressor's own accounting (``offline/budget.py``): D²-MoE's base of
  ``I − round(0.05·I)`` channels (``D2MoE().static_channels``), the ratio over total model parameters, and
  the leftover ranks to the most-routed experts of random routing frequencies (so ranks are ragged by one);
- random uniform top-k routing (softmax weights), the same for both paths;
- kernel time: median of ``--repeats`` runs timed with CUDA events, L2 flushed before each run; both paths
  are replayed from a CUDA graph (as vLLM serves decode) unless the dense baseline is the torch loop, which
  syncs with the host and runs eagerly (the table says ``graph`` or ``eager``);
- achieved bandwidth = bytes the compressed layer must read (base, the factors of every expert that gets a
  token, x and out; intermediates not counted) / time, and TFLOP/s, against a copy bandwidth and a bf16
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
from pathlib import Path

import torch
import torch.nn.functional as F

from offline.budget import LayerShape, allocate_ranks, plan_budget
from offline.methods.d2 import D2MoE


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


def d2_ranks(model: ModelShape, ratio: float, gen: torch.Generator) -> tuple[list[int], int]:
    """Per-expert rank (same for gate, up, down) and base channels C of one layer at ``ratio``."""
    method, shape = D2MoE(), model.layer
    layers = range(model.layers)
    plan = plan_budget(model.total_params, {l: shape for l in layers}, ratio,
                       {l: method.fixed_params(shape) for l in layers}, {l: shape.num_experts for l in layers}, "d2")
    frequencies = torch.rand(shape.num_experts, generator=gen).tolist()
    return allocate_ranks(plan.layer_budgets[0], shape, frequencies, set()), method.static_channels(shape)


def compressed_layer(model: ModelShape, ranks: list[int], channels: int, dtype, device, gen) -> dict:
    """Random packed factors and base in the plugin's layout, scaled so activations stay O(1)."""
    h, i, total = model.hidden, model.intermediate, sum(ranks)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen, device=device) / shape[-1] ** 0.5).to(dtype)

    return {
        "ranks": torch.tensor([ranks] * 3, device=device),
        "gate_up_u": randn(i, 2 * total), "gate_up_v": randn(2 * total, h),
        "down_u": randn(h, total), "down_v": randn(total, i),
        "base_gate_up": randn(2 * channels, h), "base_down": randn(h, channels),
        "base_channels": torch.randperm(i, generator=gen, device=device)[:channels].sort().values,
    }


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
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.6],
                        help="fractions of total model parameters removed (default: 0.4 0.6)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=100, help="timed runs per configuration (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/kernels.md"), help="Markdown table written here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py times the Triton kernels on a CUDA GPU, and torch sees none here. "
                 "The CPU correctness tests are tests/test_kernels_triton.py (Triton interpreter).")

    from kernels import base_delta_torch, base_delta_triton

    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    dtype, device = torch.bfloat16, torch.device("cuda")
    flush = torch.empty(2**28, dtype=torch.uint8, device=device)  # 256 MiB, larger than any L2
    copy_gbs, mm_tflops = device_ceilings(flush, args.repeats)
    dense_moe, dense_name, dense_capturable = dense_baseline()
    lines = [f"Device: {torch.cuda.get_device_name()}; measured ceilings: copy {copy_gbs:.0f} GB/s, bf16 matmul "
             f"{mm_tflops:.0f} TFLOP/s. Dense baseline: {dense_name}. bf16, median of {args.repeats} runs.", "",
             "| model | ratio | tokens | ours µs | dense µs | speed-up | bytes ratio | ours GB/s (% copy) "
             "| ours TFLOP/s (% matmul) | timing (ours / dense) | rel. error vs torch path |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.models:
        model = MODELS[name]
        h, i, num_experts = model.hidden, model.intermediate, model.experts
        w13 = torch.randn(num_experts, 2 * i, h, generator=gen, device=device).div_(h**0.5).to(dtype)
        w2 = torch.randn(num_experts, h, i, generator=gen, device=device).div_(i**0.5).to(dtype)
        for ratio in args.ratios:
            ranks, channels = d2_ranks(model, ratio, torch.Generator().manual_seed(args.seed))
            layer = compressed_layer(model, ranks, channels, dtype, device, gen)
            layout = base_delta_triton.BaseDeltaLayout.from_tensors(layer["ranks"], layer["base_channels"], i)
            factors = [layer[k] for k in ("ranks", "gate_up_u", "gate_up_v", "down_u", "down_v",
                                          "base_gate_up", "base_down", "base_channels")]
            rank_sum = torch.tensor(ranks, device=device) * 3
            for tokens in args.tokens:
                x = torch.randn(tokens, h, generator=gen, device=device).to(dtype)
                logits = torch.randn(tokens, num_experts, generator=gen, device=device)
                topk_logits, topk_ids = logits.topk(model.top_k, dim=1)
                topk_ids, topk_weights = topk_ids.to(torch.int32), topk_logits.softmax(dim=1)

                def ours():
                    return base_delta_triton.base_delta_moe(x, topk_ids, topk_weights, *factors, layout=layout)

                reference = base_delta_torch.base_delta_moe(x, topk_ids, topk_weights, *factors).float()
                error = float((ours().float() - reference).norm() / reference.norm())
                ours_ms, ours_mode = median_ms(ours, flush, args.repeats)
                dense_ms, dense_mode = median_ms(lambda: dense_moe(x, w13, w2, topk_weights, topk_ids), flush,
                                                 args.repeats, capture=dense_capturable)

                used = torch.zeros(num_experts, dtype=torch.bool, device=device)
                used[topk_ids.long().flatten()] = True
                io_bytes = 2 * tokens * h * 2
                ours_bytes = 2 * (3 * h * channels + int(rank_sum[used].sum()) * (h + i)) + io_bytes
                dense_bytes = 2 * 3 * h * i * int(used.sum()) + io_bytes
                pair_rank_sum = int(rank_sum[topk_ids.long()].sum())
                ours_flops = 6 * tokens * channels * h + 2 * pair_rank_sum * (h + i)
                gbs, tflops = ours_bytes / ours_ms / 1e6, ours_flops / ours_ms / 1e9
                lines.append(
                    f"| {name} | {ratio:.0%} | {tokens} | {ours_ms * 1e3:.1f} | {dense_ms * 1e3:.1f} | "
                    f"{dense_ms / ours_ms:.2f}× | {dense_bytes / ours_bytes:.2f} | {gbs:.0f} ({gbs / copy_gbs:.0%}) | "
                    f"{tflops:.1f} ({tflops / mm_tflops:.0%}) | {ours_mode} / {dense_mode} | {error:.1e} |")
                print(lines[-1], flush=True)
    write_atomically(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


if __name__ == "__main__":
    main()
