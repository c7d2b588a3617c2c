"""Architecture adapters: where each MoE family keeps its router and experts, and how they are named.

Two namings matter and they differ:

* the **checkpoint** naming (what safetensors files hold and what vLLM's loaders read), per expert:
  ``model.layers.{L}.mlp.experts.{i}.gate_proj.weight`` (Qwen3-MoE, Qwen2-MoE, DeepSeek-V2, OLMoE) or
  ``model.layers.{L}.block_sparse_moe.experts.{i}.w1.weight`` (Mixtral);
* the **transformers 5** module layout, identical for all five families: ``model.model.layers[L].mlp`` has a
  ``gate`` (router) and an ``experts`` module holding fused ``gate_up_proj [E, 2I, H]`` (gate rows first) and
  ``down_proj [E, H, I]``, called as ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``.

Router, shared experts (Qwen2-MoE's ``shared_expert`` + ``shared_expert_gate``, DeepSeek's
``shared_experts``), attention and embeddings are never touched by the compressor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture has no adapter."""


@dataclass(frozen=True)
class MoEArchitecture:
    """How one MoE family names its expert tensors in checkpoints."""

    model_type: str
    architecture: str
    block_name: str  # checkpoint name of the MoE block: "mlp" or "block_sparse_moe"
    proj_names: dict[str, str]  # canonical projection (vllm_moe_compress.format.PROJECTIONS) -> checkpoint name
    experts_attr: str  # config attribute holding the number of routed experts
    intermediate_attr: str  # config attribute holding one expert's intermediate size

    @property
    def expert_key_pattern(self) -> re.Pattern:
        """Matches ``<prefix>.{i}.<proj>.weight`` for routed experts; groups: prefix, layer, expert, proj."""
        projs = "|".join(re.escape(p) for p in self.proj_names.values())
        return re.compile(
            rf"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.{re.escape(self.block_name)}\.experts)"
            rf"\.(?P<expert>\d+)\.(?P<proj>{projs})\.weight$"
        )

    def canonical_proj(self, checkpoint_proj: str) -> str:
        return {v: k for k, v in self.proj_names.items()}[checkpoint_proj]

    def checkpoint_to_module_name(self, name: str) -> str:
        """Checkpoint tensor name -> transformers 5 parameter name (only Mixtral renames its block)."""
        if self.block_name != "mlp":
            return name.replace(f".{self.block_name}.", ".mlp.")
        return name

    def num_experts(self, config) -> int:
        return int(getattr(config, self.experts_attr))

    def intermediate_size(self, config) -> int:
        return int(getattr(config, self.intermediate_attr))


_GATE_UP_DOWN = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

ARCHITECTURES: dict[str, MoEArchitecture] = {
    a.model_type: a
    for a in (
        MoEArchitecture("qwen3_moe", "Qwen3MoeForCausalLM", "mlp", _GATE_UP_DOWN, "num_experts", "moe_intermediate_size"),
        MoEArchitecture("qwen2_moe", "Qwen2MoeForCausalLM", "mlp", _GATE_UP_DOWN, "num_experts", "moe_intermediate_size"),
        MoEArchitecture(
            "mixtral", "MixtralForCausalLM", "block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"},
            "num_local_experts", "intermediate_size",
        ),
        MoEArchitecture(
            "deepseek_v2", "DeepseekV2ForCausalLM", "mlp", _GATE_UP_DOWN, "n_routed_experts", "moe_intermediate_size"
        ),
        MoEArchitecture("olmoe", "OlmoeForCausalLM", "mlp", _GATE_UP_DOWN, "num_experts", "intermediate_size"),
    )
}


def supported_architectures() -> list[str]:
    return [a.architecture for a in ARCHITECTURES.values()]


def architecture_for(config: dict) -> MoEArchitecture:
    """Adapter for a config.json dict; clear error naming the supported architectures otherwise."""
    model_type = config.get("model_type")
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    names = ", ".join(config.get("architectures") or []) or "unknown"
    raise UnsupportedArchitectureError(
        f"unsupported architecture {names} (model_type {model_type!r}); supported: "
        + ", ".join(supported_architectures())
    )


def moe_block(model, layer: int):
    """The transformers 5 MoE block (router + experts) of decoder layer ``layer``."""
    return model.model.layers[layer].mlp
