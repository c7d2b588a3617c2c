"""A compressed counterpart of a random-weight checkpoint, with random factors of a method's real sizes.

    python -m benchmarks.random_checkpoint qwen3-30b-a3b --layers 4 -o runs/q4
    python -m benchmarks.random_compressed runs/q4 --shapes-of qwen3-30b-a3b --ratio 0.6 -o runs/q4-d2-60

For serving-speed runs at real layer shapes (issue 17, item 2) without waiting for the compressor: every
routed expert of ``SOURCE`` (a ``benchmarks.random_checkpoint`` directory) is replaced by D²-MoE-shaped
factors — a shared base on C kept channels plus per-expert low-rank deltas, the ranks D²-MoE's budget gives
each layer of the *published* model (``--shapes-of``) at ``--ratio`` of its total parameters
(``benchmarks.kernels.d2_ranks``: the compressor's own planner on random routing frequencies). The factors are
random (N(0, 1/fan_in)), so the checkpoint has the bytes, shapes and format (``quant_method: moe_compress``,
scheme ``base_delta``) of a real ``--method d2`` output and says nothing about quality; ``method_options``
records ``random_factors: true``. The non-expert tensors are copied unchanged, so the dense source and this
checkpoint differ only in their experts. Memory: one layer's factors at a time, written shard by shard.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoConfig

from benchmarks.kernels import MODELS, d2_ranks, random_tensors
from vllm_moe_compress.format import PROJECTIONS, CompressionInfo, matrix_shape
from vllm_moe_compress.format.schemes.base_delta import BaseDeltaLayer
from vllm_moe_compress.offline.architectures import architecture_for
from vllm_moe_compress.offline.checkpoint_io import (SafetensorsCheckpoint, ShardedWriter, atomic_output_dir,
                                                      copy_side_files, read_config)
from vllm_moe_compress.offline.compress import find_moe_layers
from vllm_moe_compress.offline.methods.d2 import D2Options

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def random_d2_layer(hidden: int, intermediate: int, ranks: list[int], channels: int,
                    gen: torch.Generator) -> BaseDeltaLayer:
    """A ``base_delta`` layer: base on ``channels`` random kept channels, expert i's deltas of rank ranks[i]."""
    randn = random_tensors(gen, torch.float32, "cpu")
    factors = {}
    for proj in PROJECTIONS:
        out_dim, in_dim = matrix_shape(proj, hidden, intermediate)
        factors[proj] = [(randn(out_dim, r, fan_in=r), randn(r, in_dim)) if r else None for r in ranks]
    kept = torch.randperm(intermediate, generator=gen)[:channels].sort().values
    base = {"gate": randn(channels, hidden), "up": randn(channels, hidden), "down": randn(hidden, channels)}
    return BaseDeltaLayer(hidden, intermediate, factors, base, kept)


def write_random_compressed(source: Path, out: Path, shapes_of: str, ratio: float, dtype: str, seed: int) -> dict:
    """Write ``out`` (atomically; it must not exist); returns its ``quantization_config``."""
    ckpt, config = SafetensorsCheckpoint(source), read_config(source)
    arch = architecture_for(config)
    layout = find_moe_layers(ckpt, arch, AutoConfig.from_pretrained(source))
    model = MODELS[shapes_of]
    for layer, shape in layout.shapes.items():
        if (shape.num_experts, shape.hidden_size, shape.intermediate_size) != \
                (model.experts, model.hidden, model.intermediate):
            raise ValueError(f"layer {layer} of {source} is {shape}, not {shapes_of}'s MoE layer shape")
    gen = torch.Generator().manual_seed(seed)
    layers, specs, stored = {}, [], 0
    for layer in sorted(layout.shapes):
        ranks, channels = d2_ranks(model, ratio, gen)
        layers[layer] = ranks, channels
    expert_params = sum(s.dense_expert_params for s in layout.shapes.values())
    with atomic_output_dir(out) as tmp:
        writer = ShardedWriter(tmp, 2 * 1024**3)
        for key in ckpt.keys():
            if key not in layout.expert_keys:
                writer.add(key, ckpt.get(key))
        for layer, (ranks, channels) in layers.items():
            compressed = random_d2_layer(model.hidden, model.intermediate, ranks, channels, gen)
            prefix = layout.prefixes[layer]
            for name, tensor in compressed.to_tensors(prefix, arch.proj_names, DTYPES[dtype]).items():
                writer.add(name, tensor)
            specs.append(compressed.spec(layer, prefix))
            stored += compressed.num_params()
            del compressed
        writer.finish()
        total = sum(ckpt.numel(k) for k in ckpt.keys())
        compressed_total = total - expert_params + stored
        info = CompressionInfo(
            method="d2", target_ratio=ratio, achieved_ratio=round(1 - compressed_total / total, 6),
            expert_ratio=round(1 - stored / expert_params, 6), original_params=total,
            compressed_params=compressed_total, dtype=dtype, proj_names=arch.proj_names, layers=specs,
            method_options={**D2Options().record(), "random_factors": True, "ranks_planned_for": shapes_of,
                            "ratio_of_published_model": ratio},
        )
        (tmp / "config.json").write_text(json.dumps({**config, "quantization_config": info.to_config()},
                                                    indent=2) + "\n")
        copy_side_files(source, tmp)
    return info.to_config()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.random_compressed",
        description="Replace the routed experts of a random-weight checkpoint by random D²-MoE-shaped factors "
                    "(the ranks the compressor's budget gives the published model at --ratio), for serving-speed "
                    "runs at real layer shapes. Says nothing about quality.")
    parser.add_argument("source", type=Path, help="a benchmarks.random_checkpoint directory")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output directory (must not exist)")
    parser.add_argument("--shapes-of", choices=sorted(MODELS), default="qwen3-30b-a3b",
                        help="the published model whose layer shapes SOURCE has and whose budget sets the ranks")
    parser.add_argument("--ratio", type=float, default=0.6, help="fraction of the published model's total "
                        "parameters removed (default 0.6)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="factor dtype (default bfloat16)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} already exists; choose a new directory")
    qc = write_random_compressed(args.source, args.out, args.shapes_of, args.ratio, args.dtype, args.seed)
    print(f"wrote {args.out}: {len(qc['layers'])} base_delta layers, expert ratio {qc['expert_ratio']:.3f}, "
          f"total ratio of this checkpoint {qc['achieved_ratio']:.3f}")


if __name__ == "__main__":
    main()
