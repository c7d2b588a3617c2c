"""Shared test helpers: tiny random checkpoints of every supported MoE family, and calibration text."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "examples" / "tiny-qwen3-moe-demo"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
CALIBRATION_FILE = REPO / "offline" / "data" / "brown-calibration-sample.txt"

if (REPO.parent / "shared" / "data").is_dir():
    os.environ.setdefault("MOE_COMPRESS_DATA", str(REPO.parent / "shared" / "data"))

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "olmoe")
"""model_type of every MoE family the compressor supports."""

_COMMON = dict(
    vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    num_experts_per_tok=2, max_position_embeddings=512,
    # 5x the default init scale (0.02): experts then move the logits by O(0.1-1), so a wrong factor,
    # channel or routing weight shows up orders of magnitude above float32 round-off.
    initializer_range=0.1,
)


VLLM_ATTENTION = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
"""vLLM's CPU attention needs head_dim >= 32 (64 here); DeepSeek's MLA on CPU needs kv_lora_rank 512 and
qk_rope_head_dim 64 (kv_lora_rank + rope = 576)."""


def vllm_tiny_config(family: str) -> transformers.PretrainedConfig:
    """tiny_config with attention shapes vLLM's CPU backend runs (hidden 128, 2 heads of 64)."""
    config = tiny_config(family)
    for key, value in VLLM_ATTENTION.items():
        setattr(config, key, value)
    if family == "deepseek_v2":
        config.num_key_value_heads = config.num_attention_heads
        config.kv_lora_rank, config.qk_rope_head_dim, config.qk_nope_head_dim, config.v_head_dim = 512, 64, 32, 64
        config.qk_head_dim = config.qk_rope_head_dim + config.qk_nope_head_dim
    return config


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """Config of a tiny model: hidden 64, 2 layers, 8 routed experts (top-2) of intermediate size 32, init std 0.1."""
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **_COMMON, head_dim=16, num_experts=8, moe_intermediate_size=32, intermediate_size=64,
        )
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **_COMMON, num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            intermediate_size=64,
        )
    if family == "mixtral":
        return transformers.MixtralConfig(**_COMMON, head_dim=16, num_local_experts=8, intermediate_size=32)
    if family == "deepseek_v2":
        return transformers.DeepseekV2Config(
            **_COMMON, n_routed_experts=8, moe_intermediate_size=32, intermediate_size=64,
            first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=32, q_lora_rank=None,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
        )
    if family == "olmoe":
        # OLMoE's default eos_token_id (50279) lies outside the tiny vocabulary.
        return transformers.OlmoeConfig(**_COMMON, num_experts=8, intermediate_size=32, eos_token_id=None)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


def write_tiny_model(config: transformers.PretrainedConfig, path: Path, seed: int = 0) -> Path:
    """Build a random float32 model from ``config`` (seeded init), save it and the demo tokenizer to ``path``."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy2(TOKENIZER_DIR / name, Path(path) / name)
    return Path(path)


def make_tiny_moe(family: str, path: Path, seed: int = 0) -> Path:
    """A tiny random checkpoint of ``family`` (one of FAMILIES) written to ``path``; returns ``path``."""
    return write_tiny_model(tiny_config(family), path, seed)


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory) -> Callable[..., Path]:
    """Factory ``tiny_moe(family, seed=0) -> Path``; each (family, seed) is built once per session.

    Treat the returned directory as read-only: other tests share it.
    """
    cache: dict[tuple[str, int], Path] = {}

    def factory(family: str, seed: int = 0) -> Path:
        key = (family, seed)
        if key not in cache:
            cache[key] = make_tiny_moe(family, tmp_path_factory.mktemp(f"tiny-{family}-{seed}"), seed)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """The calibration text shipped with the package (offline/data/brown-calibration-sample.txt)."""
    assert CALIBRATION_FILE.is_file(), CALIBRATION_FILE
    return CALIBRATION_FILE
