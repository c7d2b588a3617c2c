"""End-to-end compression of tiny random checkpoints of every supported MoE family.

Each family (Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek-V2, OLMoE) is compressed with ``d2`` and
``whitened-svd``, and the output is checked *independently* of the package's own reader code paths:
tensors are read straight from the written safetensors, parameters are counted by hand, and the
compressed model's logits are compared with an original model whose fused expert weights were
overwritten with the dense reconstruction of the compressed experts.

Target ratio: the tiny models are dominated by their 4096 × 64 embedding and lm_head (routed experts
are only ~15% of all parameters, ~8% for DeepSeek-V2 whose layer 0 is dense), so a total ratio of 0.3
is unreachable (the compressor correctly raises UnreachableRatioError). 0.05 of *total* parameters
removes about a third of the routed-expert weights (~60% for DeepSeek-V2), enough to make every
expert genuinely low-rank.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

from vllm_moe_compress.format import CompressionInfo
from vllm_moe_compress.offline.architectures import ARCHITECTURES, UnsupportedArchitectureError
from vllm_moe_compress.offline.compress import CalibrationOptions, build_method, compress_checkpoint
from vllm_moe_compress.offline.loading import load_compressed_model
from vllm_moe_compress.format.schemes.base_delta import BaseDeltaLayer

from conftest import FAMILIES, TOKENIZER_FILES, write_tiny_model

RATIO = 0.05
TOLERANCE = 0.005
METHODS = ("d2", "whitened-svd")
ARCHITECTURE_CLASSES = (
    "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM", "DeepseekV2ForCausalLM", "OlmoeForCausalLM",
)
MOE_LAYERS = {"qwen3_moe": [0, 1], "qwen2_moe": [0, 1], "mixtral": [0, 1], "deepseek_v2": [1], "olmoe": [0, 1]}
ROUTED_EXPERT_KEY = re.compile(
    r"^model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$"
)
"""Per-expert dense weights as save_pretrained writes them (the only tensors the compressor may replace)."""


# --------------------------------------------------------------------------------------------- helpers


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in ``model_dir`` (names must be unique across files)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                assert key not in tensors, f"{key} stored twice"
                tensors[key] = f.get_tensor(key)
    return tensors


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def random_ids(seed: int = 1234, batch: int = 2, length: int = 24) -> torch.Tensor:
    """Fresh token ids, independent of the calibration text."""
    return torch.randint(0, 4096, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def dense_reference_model(original: Path, compressed: Path):
    """The original model with each MoE layer's fused experts replaced by the dense compressed experts."""
    info = CompressionInfo.from_config(read_config(compressed)["quantization_config"])
    tensors = read_tensors(compressed)
    model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    for spec in info.layers:
        layer = BaseDeltaLayer.from_tensors(spec, info.proj_names, tensors.__getitem__)
        experts = model.model.layers[spec.layer].mlp.experts
        stacked = {
            p: torch.stack([layer.dense_weight(e, p) for e in range(spec.num_experts)]).float()
            for p in ("gate", "up", "down")
        }
        assert experts.gate_up_proj.shape == (spec.num_experts, 2 * spec.intermediate_size, spec.hidden_size)
        assert experts.down_proj.shape == stacked["down"].shape
        experts.gate_up_proj.copy_(torch.cat([stacked["gate"], stacked["up"]], dim=1))  # gate rows first
        experts.down_proj.copy_(stacked["down"])
    return model


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def calibration(calib_file) -> CalibrationOptions:
    return CalibrationOptions(file=calib_file, samples=8, seqlen=64, batch_size=4, fisher_samples=4)


@pytest.fixture(scope="module")
def compressed(tiny_moe, calibration, tmp_path_factory):
    """Factory ``compressed(family, method, **options) -> (original_dir, output_dir)``, cached per module."""
    cache: dict[tuple, tuple[Path, Path]] = {}

    def factory(family: str, method: str, **options) -> tuple[Path, Path]:
        key = (family, method, tuple(sorted(options.items())))
        if key not in cache:
            original = tiny_moe(family)
            out = tmp_path_factory.mktemp(f"{family}-{method}") / "out"
            compress_checkpoint(
                original, out, build_method(method, **options), RATIO, calibration, dtype="float32", progress=False,
            )
            cache[key] = original, out
        return cache[key]

    return factory


CASES = pytest.mark.parametrize("family,method", [(f, m) for f in FAMILIES for m in METHODS])


# --------------------------------------------------------------------------------------------- tests


@CASES
def test_round_trip_matches_dense_reconstruction(compressed, family, method):
    """load_compressed_model (factor path, base scatter, linearity trick) == dense math on the same weights."""
    original, out = compressed(family, method)
    info = CompressionInfo.from_config(read_config(out)["quantization_config"])
    assert [spec.layer for spec in info.layers] == MOE_LAYERS[family]

    ids = random_ids()
    got = logits(load_compressed_model(out, dtype=torch.float32, dynamic_pruning=False), ids)
    want = logits(dense_reference_model(original, out), ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # Compression must actually change the model, or the comparison above proves nothing.
    dense = logits(AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval(), ids)
    assert (got - dense).abs().max() > 1e-3


@CASES
def test_non_expert_tensors_are_copied_bit_for_bit(compressed, family, method):
    """Router, shared experts, attention, norms, embeddings: present and bit-identical; experts replaced."""
    original, out = compressed(family, method)
    before, after = read_tensors(original), read_tensors(out)
    expert_keys = {k for k in before if ROUTED_EXPERT_KEY.match(k)}
    assert {int(ROUTED_EXPERT_KEY.match(k)[1]) for k in expert_keys} == set(MOE_LAYERS[family])
    for key in sorted(set(before) - expert_keys):
        assert key in after, f"{key} missing from the output"
        assert same_bits(before[key], after[key]), f"{key} changed"
    assert not expert_keys & set(after), "dense expert tensors left in the output"
    new = set(after) - set(before)
    assert new and all(re.search(r"\.experts\.(\d+\.\w+\.delta_[uv]|base\.(\w+\.weight|channels))$", k) for k in new)


@CASES
def test_achieved_ratio_by_counting_tensors(compressed, family, method):
    """Parameters counted in the written files match quantization_config and the target ratio."""
    original, out = compressed(family, method)
    qc = read_config(out)["quantization_config"]
    before, after = read_tensors(original), read_tensors(out)
    channels = {k: t for k, t in after.items() if k.endswith(".base.channels")}
    assert all(t.dtype == torch.int32 for t in channels.values())
    assert bool(channels) == (method == "d2")
    assert all(t.is_floating_point() for k, t in after.items() if k not in channels)

    original_params = sum(t.numel() for t in before.values())
    compressed_params = sum(t.numel() for k, t in after.items() if k not in channels)
    achieved = 1 - compressed_params / original_params
    assert qc["original_params"] == original_params
    assert qc["compressed_params"] == compressed_params
    assert qc["achieved_ratio"] == pytest.approx(achieved, abs=1e-6)
    assert abs(achieved - RATIO) <= TOLERANCE
    assert qc["target_ratio"] == RATIO and qc["method"] == method and qc["dtype"] == "float32"


@CASES
def test_output_directory_layout(compressed, family, method):
    """config.json keeps the architecture; tokenizer files are copied; the index lists every tensor."""
    original, out = compressed(family, method)
    before, after = read_config(original), read_config(out)
    assert after["architectures"] == before["architectures"] and len(after["architectures"]) == 1
    assert after["model_type"] == before["model_type"] == family
    assert after["architectures"][0] in ARCHITECTURE_CLASSES
    assert after["quantization_config"]["quant_method"] == "moe_compress"
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (original / name).read_bytes(), name

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == shards
    stored = {}
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            stored.update(dict.fromkeys(f.keys(), shard))
    assert index["weight_map"] == stored
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")], "temporary directories left"


def test_dynamic_pruning_changes_qwen3_logits(compressed):
    """d2 with base_prune=0.5: the per-batch (dynamic) half of the base pruning changes the output."""
    _, out = compressed("qwen3_moe", "d2", base_prune=0.5)
    qc = read_config(out)["quantization_config"]
    assert qc["dynamic_prune_ratio"] == 0.25
    assert all(spec["base_channels"] == 32 - 8 for spec in qc["layers"].values())  # static half: 8 of 32

    ids = random_ids(seed=99)
    static = logits(load_compressed_model(out, dtype=torch.float32, dynamic_pruning=False), ids)
    dynamic = logits(load_compressed_model(out, dtype=torch.float32, dynamic_pruning=True), ids)
    assert torch.isfinite(static).all() and torch.isfinite(dynamic).all()
    assert (static - dynamic).abs().max() > 1e-3


EVERY_SCHEME_LAYOUT = [("d2", {"base_prune": 0.2}), ("whitened-svd", {}), ("rs", {}), ("rs", {"base": "none"}),
                       ("rfid", {"residual_fraction": 0.03, "fit_steps": 5}),
                       ("rfid", {"factorize_down": True, "residual_fraction": 0.03, "fit_steps": 5}),
                       ("mobe", {"fit_steps": 5})]
"""Every tensor layout: base_delta with and without a base, sparse_lowrank with and without the shared down base,
basis_residual with a dense or a factorised down and with MoBE's mixed bases."""


@pytest.mark.parametrize("method,options", EVERY_SCHEME_LAYOUT, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_expected_tensors_are_exactly_the_written_ones(compressed, method, options):
    """The format's table of a layer's tensors (LayerSpec.expected_tensors, which the plugin checks before vLLM
    starts an engine) lists exactly the names and shapes the compressor wrote, read from the safetensors headers."""
    _, out = compressed("qwen3_moe", method, **options)
    info = CompressionInfo.from_config(read_config(out)["quantization_config"])
    written = {}
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            written.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    for spec in info.layers:
        under_prefix = {name: shape for name, shape in written.items() if name.startswith(spec.prefix + ".")}
        assert spec.expected_tensors(info.proj_names) == under_prefix, spec.where


def test_every_supported_family_is_covered():
    """The families built here are exactly the architectures the compressor supports."""
    assert sorted(FAMILIES) == sorted(ARCHITECTURES)
    assert sorted(a.architecture for a in ARCHITECTURES.values()) == sorted(ARCHITECTURE_CLASSES)


def test_unsupported_architecture_is_refused_cleanly(tmp_path, calibration):
    """A dense Llama checkpoint: UnsupportedArchitectureError naming all five families, nothing written."""
    config = LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )
    model_dir = write_tiny_model(config, tmp_path / "llama")
    out = tmp_path / "out"
    with pytest.raises(UnsupportedArchitectureError) as err:
        compress_checkpoint(model_dir, out, build_method("d2"), RATIO, calibration, dtype="float32", progress=False)
    for name in ARCHITECTURE_CLASSES:
        assert name in str(err.value)
    assert "LlamaForCausalLM" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"], "output or .out.partial-* left behind"
