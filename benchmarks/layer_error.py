"""Calibrated output error of each method, layer by layer, and the energy split of D²-MoE's base and deltas.

    python -m benchmarks.layer_error --model ../shared/models/brown-qwen3-moe \\
        --calib-file ../shared/data/brown/train.txt --ratios 0.4 0.6 \\
        --methods whitened-svd d2:merge=frequency d2:merge=frequency,base_prune=0 rfid mobe --out runs/layer-error.json

One calibration pass (``--calib-samples`` × ``--calib-seqlen`` windows, seed 0) through the original model; at
every MoE layer each method compresses the layer exactly as ``moe-compress compress`` would at that ratio (same
budget planner, same statistics; ``d2`` needs ``merge=mean|frequency`` here, the Fisher pass is not run) and
the error is measured on the same statistics:

    err_p = Σ_i ‖(Ŵ_i,p − W_i,p) S_i,p‖²_F / Σ_i ‖W_i,p S_i,p‖²_F,

S the Cholesky factor of the Gram of what projection p of expert i multiplies on its routed tokens (so
frequently routed experts weigh more). For whitened SVD this is exactly the discarded whitened energy.
``energy`` gives, per layer and projection, the share of Σ‖W_i S_i‖² carried by the routing-frequency-weighted
mean expert (W̄ S_i) and by the deltas (ΔW_i S_i) — D²-MoE Figures 1–2 in output space. Methods take
constructor options after a colon (``rfid:residual_fraction=0,xi=0.5``); rfid/mobe with ``factorize_down=1``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from vllm_moe_compress.format import PROJECTIONS
from vllm_moe_compress.offline.architectures import architecture_for
from vllm_moe_compress.offline.budget import plan_budget
from vllm_moe_compress.offline.calibration import calibration_windows, read_calibration_text, run_layerwise
from vllm_moe_compress.offline.checkpoint_io import SafetensorsCheckpoint, read_config
from vllm_moe_compress.offline.compress import build_method, find_moe_layers
from vllm_moe_compress.offline.methods.base import LayerInputs, input_gram
from vllm_moe_compress.offline.source_model import StreamedModel


def parse_method(entry: str):
    name, _, opts = entry.partition(":")
    options = {}
    for item in filter(None, opts.split(",")):
        key, value = item.split("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        options[key] = value
    return build_method(name, **options)


def output_errors(layer, weights, stats) -> dict[str, float]:
    out = {}
    for p in PROJECTIONS:
        grams = input_gram(stats, p)
        num = den = 0.0
        for e in range(weights[p].shape[0]):
            w = weights[p][e]
            diff = layer.dense_weight(e, p).double() - w
            num += float(torch.einsum("oi,ij,oj->", diff, grams[e], diff))
            den += float(torch.einsum("oi,ij,oj->", w, grams[e], w))
        out[p] = num / den
    return out


def energy_split(weights, stats) -> dict[str, dict[str, float]]:
    freq = stats.counts.double() / stats.counts.sum().clamp_min(1)
    out = {}
    for p in PROJECTIONS:
        grams = input_gram(stats, p)
        base = (freq.view(-1, 1, 1) * weights[p]).sum(0)
        total = base_part = delta_part = 0.0
        for e in range(weights[p].shape[0]):
            for name, m in (("w", weights[p][e]), ("b", base), ("d", weights[p][e] - base)):
                v = float(torch.einsum("oi,ij,oj->", m, grams[e], m))
                if name == "w":
                    total += v
                elif name == "b":
                    base_part += v
                else:
                    delta_part += v
        out[p] = {"base": base_part / total, "delta": delta_part / total}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib-file", required=True)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.4, 0.6])
    parser.add_argument("--methods", nargs="+", default=["whitened-svd", "d2:merge=frequency"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    config = read_config(args.model)
    ckpt = SafetensorsCheckpoint(args.model)
    layout = find_moe_layers(ckpt, architecture_for(config), AutoConfig.from_pretrained(args.model))
    total = sum(ckpt.numel(k) for k in ckpt.keys())
    methods = {entry: parse_method(entry) for entry in args.methods}
    plans = {(entry, r): plan_budget(total, layout.shapes, r, {l: m.fixed_params(s) for l, s in layout.shapes.items()},
                                     {l: m.capacity(s) for l, s in layout.shapes.items()}, m.name)
             for entry, m in methods.items() for r in args.ratios}
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    samples = calibration_windows(tokenizer, read_calibration_text(args.calib_file), args.calib_samples,
                                  args.calib_seqlen, 0)
    source = StreamedModel(args.model, ckpt)
    result = {"settings": vars(args) | {"out": str(args.out)}, "layers": {}}

    def on_layer(layer, stats, hidden) -> None:
        shape = layout.shapes[layer]
        weights = source.expert_weights(layer)
        row = {"energy": energy_split(weights, stats), "error": {}}
        for (entry, ratio), plan in plans.items():
            compressed = methods[entry].compress_layer(
                LayerInputs(weights, stats, None, plan.layer_budgets[layer], shape)).layer
            errors = output_errors(compressed, weights, stats)
            row["error"][f"{entry}@{ratio}"] = errors
            print(f"layer {layer} {entry} @ {ratio}: " + " ".join(f"{p} {v:.4f}" for p, v in errors.items()), flush=True)
        print(f"layer {layer} energy (base / delta share): " + " ".join(
            f"{p} {v['base']:.3f}/{v['delta']:.3f}" for p, v in row["energy"].items()), flush=True)
        result["layers"][layer] = row

    run_layerwise(source, {l: (s.num_experts, s.hidden_size, s.intermediate_size) for l, s in layout.shapes.items()},
                  samples, 8, on_layer, progress=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
