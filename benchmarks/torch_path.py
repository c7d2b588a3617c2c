"""Time the two strategies of the torch base_delta path on one MoE layer of a compressed checkpoint.

    python -m benchmarks.torch_path runs/ppl/d2-60 --tokens 8 32 128 512

One thread, bf16, random inputs and uniform random routing with the model's top-k; the median of
``--repeats`` calls per strategy, and the "wasted" multiply-adds the masked strategy would spend.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vllm_moe_compress.offline.loading import load_compressed_model
import vllm_moe_compress.kernels.base_delta_torch as torch_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8, 32, 128, 512])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_compressed_model(args.model_dir, torch.bfloat16, dynamic_pruning=False)
    experts = model.model.layers[args.layer].mlp.experts
    num_experts, top_k = experts.ranks.shape[1], model.config.num_experts_per_tok
    hidden, intermediate = model.config.hidden_size, experts.gate_up_u.shape[0]
    print("| routed tokens | masked ms | per-expert ms | wasted MACs of the masked path |")
    print("|---|---|---|---|")
    for tokens in args.tokens:
        x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k)
        times = {}
        for name, limit in (("masked", 2**62), ("grouped", -1)):
            torch_path.MASKED_PATH_MAX_MACS = limit
            experts(x, ids, weights)
            samples = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                experts(x, ids, weights)
                samples.append(time.perf_counter() - start)
            times[name] = statistics.median(samples) * 1e3
        wasted = ids.numel() * int(experts.ranks.sum()) * (hidden + intermediate)
        print(f"| {tokens} | {times['masked']:.2f} | {times['grouped']:.2f} | {wasted:.2e} |")


if __name__ == "__main__":
    main()
