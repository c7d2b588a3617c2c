"""Run-time cost of RFID-MoE's residual term: the reference forward of one ``basis_residual`` layer with and
without its hashed residual (same bases and coefficients), next to the original dense experts.

    python -m benchmarks.residual_cost runs/rfid-ppl/r40/rfid-40 --original ../shared/models/brown-qwen3-moe

Times one MoE layer's experts module (float32, 1 thread) on random hidden states with random top-k routing,
for a decode-sized call (1 token) and a prefill-sized call (512 tokens), the three modules taking turns in
every repeat; prints medians and ratios as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from vllm_moe_compress.format import CompressionInfo
from vllm_moe_compress.offline.architectures import moe_block
from vllm_moe_compress.offline.checkpoint_io import SafetensorsCheckpoint, read_config
from vllm_moe_compress.offline.loading import load_model
from vllm_moe_compress.format.schemes.basis_residual import BasisResidualLayer


def median_seconds(modules: dict, x, ids, weights, repeats: int) -> dict[str, float]:
    """Median seconds per module; the modules take turns within each repeat, so machine drift hits all alike."""
    times = {name: [] for name in modules}
    with torch.no_grad():
        for module in modules.values():
            module(x, ids, weights)  # warm-up
        for _ in range(repeats):
            for name, module in modules.items():
                started = time.perf_counter()
                module(x, ids, weights)
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a compressed checkpoint written by --method rfid (residual on)")
    parser.add_argument("--original", required=True, help="the uncompressed model, for the dense experts")
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = CompressionInfo.from_config(read_config(args.checkpoint)["quantization_config"])
    spec = next(s for s in info.layers if s.layer == args.layer)
    with_residual = BasisResidualLayer.from_tensors(spec, info.proj_names, SafetensorsCheckpoint(args.checkpoint).get)
    if not with_residual.residual_size:
        raise SystemExit(f"{args.checkpoint} layer {args.layer} has no residual")
    without = dataclasses.replace(
        with_residual, residual_size=0,
        factorized={p: dataclasses.replace(f, etas=None) for p, f in with_residual.factorized.items()})
    dense = moe_block(load_model(args.original), args.layer).experts
    modules = {"dense": dense, "no_residual": without.experts_module().float(),
               "residual": with_residual.experts_module().float()}
    top_k = int(read_config(args.original)["num_experts_per_tok"])
    results = []
    for tokens in args.tokens:
        g = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, spec.hidden_size, generator=g)
        ids = torch.stack([torch.randperm(spec.num_experts, generator=g)[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k, generator=g).softmax(dim=1)
        row = {"tokens": tokens, **median_seconds(modules, x, ids, weights, args.repeats)}
        row["residual_over_no_residual"] = row["residual"] / row["no_residual"]
        row["residual_over_dense"] = row["residual"] / row["dense"]
        results.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
