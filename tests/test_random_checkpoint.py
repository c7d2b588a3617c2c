"""benchmarks/random_checkpoint.py writes checkpoints that the compressor's layout check and transformers read
as the real model's: every tensor present, named and shaped as the published checkpoints (tiny shapes here)."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks.kernels import MODELS
from benchmarks.random_checkpoint import write_random_checkpoint
from vllm_moe_compress.offline.architectures import architecture_for
from vllm_moe_compress.offline.checkpoint_io import SafetensorsCheckpoint
from vllm_moe_compress.offline.compress import find_moe_layers


@pytest.mark.parametrize("name", sorted(MODELS))
def test_random_checkpoint_loads_as_the_architecture(tmp_path, name):
    tiny = MODELS[name].__class__(layers=2, hidden=32, intermediate=24, experts=4, top_k=2, vocab=0, heads=4,
                                  kv_heads=2, head_dim=8, qk_norm=MODELS[name].qk_norm)
    out = tmp_path / "model"
    total = write_random_checkpoint(name, 3, out, shape=tiny)
    config = json.loads((out / "config.json").read_text())
    layout = find_moe_layers(SafetensorsCheckpoint(out), architecture_for(config), AutoConfig.from_pretrained(out))
    assert sorted(layout.shapes) == [0, 1, 2]
    assert {(s.num_experts, s.hidden_size, s.intermediate_size) for s in layout.shapes.values()} == {(4, 32, 24)}
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert sum(p.numel() for p in model.parameters()) == total
    assert len(list(out.glob("*.safetensors"))) == 4  # embeddings + one shard per decoder layer
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
