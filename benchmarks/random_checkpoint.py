"""Random-weight checkpoints with a published MoE model's layer shapes, for memory, time and speed runs.

    python -m benchmarks.random_checkpoint qwen3-30b-a3b --layers 8 -o runs/qwen3-30b-shapes-8
    python -m benchmarks.random_checkpoint mixtral-8x7b --layers 1 -o runs/mixtral-shapes-1

Writes a Hugging Face directory (config.json, safetensors shards with ``model.safetensors.index.json``, the
tokenizer files of ``--tokenizer``) whose decoder layers have exactly the published config's shapes
(``benchmarks.kernels.MODELS``: Qwen3-30B-A3B hidden 2048, 128 experts top-8, expert width 768, 32/4 heads of
128; Mixtral-8x7B hidden 4096, 8 experts top-2, width 14336, 32/8 heads of 128), only fewer of them, and the
tokenizer's vocabulary. Tensor names are the real checkpoints' (per-expert ``gate_proj``/``w1`` …), so the
compressor, transformers and vLLM read it as they read the real model.

The weights are N(0, 0.02²) (norms 1) in bfloat16: they exercise every code path and every byte, and say
nothing about quality. Memory stays at one tensor at a time plus one decoder layer's shard being written.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.kernels import MODELS, ModelShape
from vllm_moe_compress.offline.checkpoint_io import atomic_output_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
DEFAULT_TOKENIZER = Path(__file__).resolve().parent.parent / "examples" / "tiny-qwen3-moe-demo"

# The published configs' remaining fields (rope, norms, routing), beside the shapes in benchmarks.kernels.
PUBLISHED = {
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "intermediate_size": 6144,
        "attention_bias": False, "router_aux_loss_coef": 0.001,
    },
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "router_aux_loss_coef": 0.02,
    },
}


def config_for(name: str, layers: int, vocab: int, shape: ModelShape | None = None) -> dict:
    """config.json of model ``name`` with ``layers`` decoder layers and a vocabulary of ``vocab``; ``shape``
    replaces the published layer shapes (the tests use tiny ones)."""
    shape = shape or MODELS[name]
    experts_key, width_key = (("num_local_experts", "intermediate_size") if name == "mixtral-8x7b"
                              else ("num_experts", "moe_intermediate_size"))
    return {
        **PUBLISHED[name], "hidden_size": shape.hidden, "num_hidden_layers": layers, "vocab_size": vocab,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim,
        experts_key: shape.experts, width_key: shape.intermediate, "num_experts_per_tok": shape.top_k,
        "hidden_act": "silu", "tie_word_embeddings": False, "dtype": "bfloat16", "use_cache": True,
        "initializer_range": 0.02,
    }


def tensor_shapes(config: dict) -> dict[str, list[int]]:
    """Every tensor of the checkpoint and its shape, named as the published checkpoints name them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from vllm_moe_compress.offline.architectures import architecture_for

    arch = architecture_for(config)
    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    experts, width, hidden = arch.num_experts(hf_config), arch.intermediate_size(hf_config), config["hidden_size"]
    shapes: dict[str, list[int]] = {}
    for name, tensor in model.state_dict().items():
        if ".mlp.experts." not in name:  # router, attention, norms, embeddings
            shapes[name.replace(".mlp.", f".{arch.block_name}.")] = list(tensor.shape)
        elif name.endswith("down_proj"):  # fused [E, H, I] in transformers 5: one tensor per expert on disk
            prefix = name.removesuffix("down_proj").replace(".mlp.", f".{arch.block_name}.")
            for e in range(experts):
                shapes[f"{prefix}{e}.{arch.proj_names['down']}.weight"] = [hidden, width]
                shapes[f"{prefix}{e}.{arch.proj_names['gate']}.weight"] = [width, hidden]
                shapes[f"{prefix}{e}.{arch.proj_names['up']}.weight"] = [width, hidden]
    return shapes


def random_tensor(name: str, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return torch.randn(shape, generator=generator, dtype=torch.bfloat16) * 0.02


def shard_of(name: str) -> str:
    """One shard per decoder layer, one for everything outside the layers."""
    parts = name.split(".")
    if "layers" in parts:
        return f"layer-{int(parts[parts.index('layers') + 1]):05d}"
    return "embeddings"


def write_random_checkpoint(name: str, layers: int, out: Path, tokenizer: Path = DEFAULT_TOKENIZER,
                            seed: int = 0, shape: ModelShape | None = None) -> int:
    """Write the checkpoint into ``out`` (which must not exist); returns its number of parameters."""
    from transformers import AutoTokenizer

    if out.exists():
        raise FileExistsError(f"{out} already exists")
    vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    config = config_for(name, layers, vocab, shape)
    shapes = tensor_shapes(config)
    with atomic_output_dir(out) as tmp:  # a staging folder of its own, renamed onto ``out`` on success
        generator = torch.Generator().manual_seed(seed)
        shards = sorted({shard_of(n) for n in shapes})
        weight_map, total = {}, 0
        for index, shard in enumerate(shards):
            filename = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: random_tensor(n, s, generator) for n, s in shapes.items() if shard_of(n) == shard}
            save_file(tensors, tmp / filename, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, filename))
            total += sum(t.numel() for t in tensors.values())
            del tensors
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": 2 * total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file in TOKENIZER_FILES:
            if (tokenizer / file).is_file():
                shutil.copyfile(tokenizer / file, tmp / file)
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(MODELS), help="whose published layer shapes to use")
    parser.add_argument("--layers", type=int, default=2, help="number of decoder layers (default 2)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output directory (must not exist)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                        help="directory whose tokenizer files are copied; sets the vocabulary "
                             "(default: the bundled demo model's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    total = write_random_checkpoint(args.model, args.layers, args.out, args.tokenizer, args.seed)
    print(f"wrote {args.out}: {args.layers} decoder layers of {args.model}'s shapes, {total:,} parameters "
          f"({2 * total / 2**30:.2f} GiB in bfloat16)")


if __name__ == "__main__":
    main()
