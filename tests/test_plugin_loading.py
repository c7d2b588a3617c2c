"""The vLLM plugin's loading path, driven directly (no engine): config, weight mapping, loaders, checks, TP slicing.

One tiny Qwen3-MoE checkpoint is compressed per module (d2, base_prune 0.2 so the base has pruned channels,
ratio 0.05, float32). ``load_layer`` feeds its tensors to ``CompressedMoEMethod``'s parameters the way vLLM
does: the config's checkpoint weight mapper first, then ``RoutedExperts``' own expert mapping
(``experts.{e}.{proj}.`` → ``experts.w13_``/``experts.w2_``, shard ``w1``/``w3``/``w2``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

from vllm_moe_compress.config import MoECompressConfig, NotCompressedError
from vllm_moe_compress.format import CompressionInfo, LayerSpec
from vllm_moe_compress.format.names import base_channels_name, base_name, delta_name
from vllm_moe_compress.moe_method import CompressedMoEMethod
from vllm_moe_compress.scheme import CompressedMoEScheme
from vllm_moe_compress.offline.compress import CalibrationOptions, build_method, compress_checkpoint
from vllm_moe_compress.format.schemes.base_delta import BaseDeltaExperts
from vllm_moe_compress.format.schemes.base_delta import BaseDeltaLayer
import vllm_moe_compress
import vllm_moe_compress.kernels.base_delta_torch as torch_path
from vllm_moe_compress.kernels.cpu_extension import available

from conftest import CALIBRATION_FILE

vllm_moe_compress.register()  # registers torch.ops.moe_compress.base_delta_moe

TOP_K = 2
FACTOR_SUFFIXES = ("delta_u", "delta_v")


@dataclass
class Checkpoint:
    dir: Path
    qc: dict
    info: CompressionInfo
    tensors: dict[str, torch.Tensor]

    def spec(self, layer: int) -> LayerSpec:
        return next(s for s in self.info.layers if s.layer == layer)

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        prefix = self.spec(layer).prefix + "."
        return {k: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def name(self, layer: int, expert: int | str, proj: str, factor: str) -> str:
        """Checkpoint name of a factor (``expert`` an int) or of a base weight (``expert == "base"``)."""
        spec = self.spec(layer)
        if expert == "base":
            return base_name(spec.prefix, self.info.proj_names[proj])
        return delta_name(spec.prefix, expert, self.info.proj_names[proj], factor)


@pytest.fixture(scope="module")
def ckpt(tiny_moe, tmp_path_factory) -> Checkpoint:
    out = tmp_path_factory.mktemp("plugin-loading") / "qwen3_moe-d2"
    calibration = CalibrationOptions(file=CALIBRATION_FILE, samples=8, seqlen=64, batch_size=4, fisher_samples=4)
    compress_checkpoint(tiny_moe("qwen3_moe"), out, build_method("d2", base_prune=0.2), 0.05, calibration,
                        dtype="float32", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    info = CompressionInfo.from_config(copy.deepcopy(qc))
    # What the tests below rely on: a pruned base (some channels kept, some not) and float32 factors.
    assert qc["dtype"] == "float32"
    for spec in info.layers:
        assert 0 < spec.base_channels < spec.intermediate_size
        assert all(r > 0 for p in ("gate", "up", "down") for r in spec.ranks[p])
    return Checkpoint(out, qc, info, tensors)


LAYERS = (0, 1)
LAYER = 0  # the layer the single-layer tests use


# ---------------------------------------------------------------------------------------------- helpers


def make_config(qc: dict, model_dir: Path | None) -> MoECompressConfig:
    cfg = MoECompressConfig.from_config(copy.deepcopy(qc))
    if model_dir is not None:
        cfg.maybe_update_config(str(model_dir))
    return cfg


def fake_moe(tp_rank: int = 0, tp_size: int = 1) -> SimpleNamespace:
    """The two things CompressedMoEMethod reads from vLLM's FusedMoEConfig (FusedMoEMethodBase only stores it)."""
    return SimpleNamespace(moe_parallel_config=SimpleNamespace(use_ep=False, tp_rank=tp_rank), tp_size=tp_size)


def make_layer(cfg: MoECompressConfig, layer: int, tp_rank: int = 0,
               tp_size: int = 1) -> tuple[CompressedMoEMethod, torch.nn.Module]:
    spec = cfg.layers[layer]
    method = CompressedMoEMethod(fake_moe(tp_rank, tp_size), spec, cfg.info.proj_names, cfg.indices[layer], 0.0)
    module = torch.nn.Module()
    method.create_weights(module, spec.num_experts, spec.hidden_size, spec.intermediate_size // tp_size,
                          torch.float32)
    return method, module


def route(name: str, num_experts: int) -> tuple[str, str, int] | None:
    """(parameter, shard_id, expert_id) that vLLM's loading sends checkpoint tensor ``name`` to; None = dropped."""
    mapped = MoECompressConfig.get_checkpoint_weight_mapper().map_name(name)
    if mapped is None:
        return None
    mapping = RoutedExperts.build_expert_params_mapping("gate_proj", "down_proj", "up_proj",
                                                        num_experts=num_experts, routed_experts_prefix="")
    for param_prefix, weight_name, expert_id, shard_id in mapping:
        if weight_name in mapped:
            return mapped.replace(weight_name, param_prefix).rsplit(".", 1)[1], shard_id, expert_id
    raise AssertionError(f"checkpoint tensor {name} (mapped to {mapped}) matches no expert mapping entry")


def load_layer(method: CompressedMoEMethod, layer: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Call each tensor's parameter loader as vLLM's expert mapping would; return the names it loaded."""
    loaded = []
    for name, tensor in tensors.items():
        target = route(name, method.spec.num_experts)
        if target is None:
            continue
        param_name, shard_id, expert_id = target
        param = getattr(layer, param_name)
        ok = param.weight_loader(param, tensor, weight_name=f"{method.spec.prefix}.{param_name}",
                                 shard_id=shard_id, expert_id=expert_id, return_success=True)
        assert ok is True, name
        loaded.append(name)
    return loaded


def loaded_layer(cfg, ckpt: Checkpoint, layer: int, tp_rank: int = 0, tp_size: int = 1):
    method, module = make_layer(cfg, layer, tp_rank, tp_size)
    load_layer(method, module, ckpt.layer_tensors(layer))
    method.process_weights_after_loading(module)
    return method, module


def random_routing(tokens: int, num_experts: int, used: int, gen: torch.Generator):
    """top-k ids drawn from ``used`` (>= top-k) of the experts (the others get no token), softmax weights."""
    assert TOP_K <= used <= num_experts
    experts = torch.randperm(num_experts, generator=gen)[:used]
    choice = torch.rand(tokens, used, generator=gen).argsort(dim=1)[:, :TOP_K]
    ids = experts[choice]
    weights = torch.randn(tokens, TOP_K, generator=gen).softmax(dim=1)
    return ids, weights


ROUTINGS = [(1, 2), (1, 8), (6, 3), (37, 5), (64, 8), (256, 6)]  # (tokens, experts used)


def routings(spec: LayerSpec, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for tokens, used in ROUTINGS:
        x = torch.randn(tokens, spec.hidden_size, generator=gen)
        ids, weights = random_routing(tokens, spec.num_experts, used, gen)
        yield x, ids, weights


@pytest.fixture(params=["cpu", "masked", "grouped"])
def backend(request, monkeypatch) -> str:
    """Force the plugin's compute path: the C++ CPU op (the default on CPUs, scheme.py ``default_backend``), or
    the torch op with one of its two strategies (masked GEMMs for few pairs, grouped loop for many)."""
    if request.param == "cpu":
        assert available(), "the C++ CPU op did not build (kernels/cpu_extension.py)"
        monkeypatch.setattr(CompressedMoEScheme, "default_backend", lambda self, device: "cpu")
    else:
        monkeypatch.setattr(CompressedMoEScheme, "default_backend", lambda self, device: "torch")
        monkeypatch.setattr(torch_path, "MASKED_PATH_MAX_MACS", 2**62 if request.param == "masked" else -1)
    return request.param


@pytest.fixture
def torch_backend(monkeypatch):
    """Layers prepared for the torch op, which computes from the loaded parameters (the C++ CPU backend frees
    the parameters its layout copied): for tests that inspect the parameters as loaded."""
    monkeypatch.setattr(CompressedMoEScheme, "default_backend", lambda self, device: "torch")


@pytest.fixture(params=["masked", "grouped"])
def torch_strategy(request, torch_backend, monkeypatch) -> str:
    """The torch op with each of base_delta's two strategies forced."""
    monkeypatch.setattr(torch_path, "MASKED_PATH_MAX_MACS", 2**62 if request.param == "masked" else -1)
    return request.param


def plugin_forward(method, module, x, ids, weights) -> torch.Tensor:
    return method.apply(module, x, weights, ids.to(torch.int32), None, None)


def dense_forward(compressed: BaseDeltaLayer, x, ids, weights) -> torch.Tensor:
    """float64 dense math on the materialised experts: Σ_k w_k · W_down (silu(W_gate x) ⊙ W_up x)."""
    x64, out = x.double(), torch.zeros(x.shape, dtype=torch.float64)
    for e in range(compressed.num_experts):
        gate, up, down = (compressed.dense_weight(e, p) for p in ("gate", "up", "down"))
        y = (F.silu(x64 @ gate.T) * (x64 @ up.T)) @ down.T  # every token through expert e
        out += (weights.double() * (ids == e)).sum(dim=1, keepdim=True) * y
    return out


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def param_bytes(module: torch.nn.Module) -> int:
    return sum(nbytes(p) for p in module.parameters())


# ---------------------------------------------------------------------------------------------- 1. correctness


@pytest.mark.parametrize("layer", LAYERS)
def test_apply_equals_reference_and_dense_math(ckpt, layer, backend):
    cfg = make_config(ckpt.qc, ckpt.dir)
    method, module = loaded_layer(cfg, ckpt, layer)
    spec = ckpt.spec(layer)
    compressed = BaseDeltaLayer.from_tensors(spec, ckpt.info.proj_names, ckpt.tensors.__getitem__)
    reference = BaseDeltaExperts(compressed)
    for x, ids, weights in routings(spec, seed=layer):
        got = plugin_forward(method, module, x, ids, weights)
        assert got.shape == x.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, reference(x, ids, weights), atol=1e-5, rtol=0)
        assert (got.double() - dense_forward(compressed, x, ids, weights)).abs().max() < 1e-4
        assert got.abs().max() > 1e-2  # the check above is not vacuous


def write_variant(ckpt: Checkpoint, directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A checkpoint directory holding ``tensors`` (all maybe_update_config reads from it)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model-00001-of-00001.safetensors"),
              metadata={"format": "pt"})
    return directory


def check_variant(qc: dict, model_dir: Path, tensors: dict[str, torch.Tensor], layer: int, seed: int) -> list:
    """T=1 plugin == reference (and == the sum of the T=2 ranks) on a hand-edited checkpoint; the T=2 layers."""
    cfg = make_config(qc, model_dir)
    spec = cfg.layers[layer]
    info = CompressionInfo.from_config(copy.deepcopy(qc))
    reference = BaseDeltaExperts(BaseDeltaLayer.from_tensors(spec, info.proj_names, tensors.__getitem__))
    variant = Checkpoint(model_dir, qc, info, tensors)
    full = loaded_layer(cfg, variant, layer)
    ranks = [loaded_layer(cfg, variant, layer, tp_rank=t, tp_size=2) for t in range(2)]
    for x, ids, weights in routings(spec, seed=seed):
        want = plugin_forward(*full, x, ids, weights)
        torch.testing.assert_close(want, reference(x, ids, weights), atol=1e-5, rtol=0)
        got = sum(plugin_forward(*rank, x, ids, weights) for rank in ranks)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    return ranks


def test_rank_zero_projections_and_trimmed_expert(ckpt, tmp_path, backend):
    """Ragged packing with holes: single projections of rank 0, and an expert with no factors (the base alone)."""
    qc = copy.deepcopy(ckpt.qc)
    ranks = qc["layers"][str(LAYER)]["ranks"]
    zeroed = [(2, "gate"), (5, "up"), (7, "down"), (4, "gate"), (4, "up"), (4, "down")]
    for expert, proj in zeroed:
        ranks[proj][expert] = 0
    drop = {ckpt.name(LAYER, e, p, f) for e, p in zeroed for f in FACTOR_SUFFIXES}
    tensors = {k: v for k, v in ckpt.tensors.items() if k not in drop}
    check_variant(qc, write_variant(ckpt, tmp_path, tensors), tensors, LAYER, seed=20)


def restrict_base(ckpt: Checkpoint, keep_channel) -> tuple[dict, dict[str, torch.Tensor], int]:
    """quantization_config and tensors of the checkpoint with layer LAYER's base cut to the kept channels c
    for which ``keep_channel(c)`` holds (a smaller, still valid static pruning); and the new C."""
    spec = ckpt.spec(LAYER)
    prefix, names = spec.prefix, ckpt.info.proj_names
    channels = ckpt.tensors[base_channels_name(prefix)].long()
    keep = keep_channel(channels).nonzero()[:, 0]
    tensors = dict(ckpt.tensors)
    tensors[base_channels_name(prefix)] = channels[keep].to(torch.int32)
    for proj in ("gate", "up"):
        tensors[base_name(prefix, names[proj])] = ckpt.tensors[base_name(prefix, names[proj])][keep]
    tensors[base_name(prefix, names["down"])] = ckpt.tensors[base_name(prefix, names["down"])][:, keep]
    qc = copy.deepcopy(ckpt.qc)
    qc["layers"][str(LAYER)]["base_channels"] = len(keep)
    return qc, tensors, len(keep)


def test_tensor_parallel_rank_without_base_channels(ckpt, tmp_path, torch_strategy):
    """Every kept channel in rank 0's half: rank 1 holds an empty base ([0, H] and [H, 0])."""
    spec = ckpt.spec(LAYER)
    part = spec.intermediate_size // 2
    qc, tensors, kept = restrict_base(ckpt, lambda c: c < part)
    ranks = check_variant(qc, write_variant(ckpt, tmp_path, tensors), tensors, LAYER, seed=30)
    assert ranks[1][1].w13_base.shape == (0, spec.hidden_size) and ranks[1][1].w2_base.shape == (spec.hidden_size, 0)
    assert ranks[0][1].w2_base.shape == (spec.hidden_size, kept)


def test_dynamic_pruning_on_rank_with_few_base_channels(ckpt, tmp_path, backend):
    """VLLM_MOE_COMPRESS_DYNAMIC_PRUNE=1 under TP: rank 1 keeps one channel but is asked to drop more."""
    spec = ckpt.spec(LAYER)
    part = spec.intermediate_size // 2
    last = int(ckpt.tensors[base_channels_name(spec.prefix)][-1])
    assert last >= part
    qc, tensors, _ = restrict_base(ckpt, lambda c: (c < part) | (c == last))
    cfg = make_config(qc, write_variant(ckpt, tmp_path, tensors))
    method = CompressedMoEMethod(fake_moe(1, 2), cfg.layers[LAYER], cfg.info.proj_names, cfg.indices[LAYER],
                                 cfg.info.dynamic_prune_ratio)
    module = torch.nn.Module()
    method.create_weights(module, spec.num_experts, spec.hidden_size, part, torch.float32)
    load_layer(method, module, {k: v for k, v in tensors.items() if k.startswith(spec.prefix + ".")})
    method.process_weights_after_loading(module)
    assert module.moe_compress_channels.tolist() == [last - part]
    assert method.scheme.num_dynamic_drop == 1  # capped at the one channel this rank keeps
    for x, ids, weights in routings(spec, seed=50):
        assert torch.isfinite(plugin_forward(method, module, x, ids, weights)).all()


def test_dynamic_pruning_matches_reference_at_tp1(ckpt, backend):
    """With the config's dynamic_prune_ratio (the plugin's opt-in), T=1 drops what the reference drops."""
    cfg = make_config(ckpt.qc, ckpt.dir)
    ratio = cfg.info.dynamic_prune_ratio
    assert ratio > 0
    spec = cfg.layers[LAYER]
    method = CompressedMoEMethod(fake_moe(), spec, cfg.info.proj_names, cfg.indices[LAYER], ratio)
    module = torch.nn.Module()
    method.create_weights(module, spec.num_experts, spec.hidden_size, spec.intermediate_size, torch.float32)
    load_layer(method, module, ckpt.layer_tensors(LAYER))
    method.process_weights_after_loading(module)
    assert method.scheme.num_dynamic_drop == round(ratio * spec.intermediate_size) > 0
    compressed = BaseDeltaLayer.from_tensors(spec, ckpt.info.proj_names, ckpt.tensors.__getitem__)
    reference = BaseDeltaExperts(compressed, dynamic_prune_ratio=ratio)
    static = BaseDeltaExperts(compressed)
    for x, ids, weights in routings(spec, seed=40):
        got = plugin_forward(method, module, x, ids, weights)
        torch.testing.assert_close(got, reference(x, ids, weights), atol=1e-5, rtol=0)
        assert not torch.allclose(got, static(x, ids, weights), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- 2. memory


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("layer", LAYERS)
def test_resident_bytes_equal_checkpoint_bytes(ckpt, layer, backend, monkeypatch):
    """The floating-point bytes a layer keeps (its parameters, plus the C++ CPU op's layout, which replaces the
    parameters it copies) are the checkpoint's: no second copy of the weights. The layout's one addition, the
    base down's C column norms (D²-MoE's dynamic pruning), is counted apart."""
    monkeypatch.setattr(CompressedMoEScheme, "default_backend", lambda self, device: backend)
    cfg = make_config(ckpt.qc, ckpt.dir)
    method, module = make_layer(cfg, layer)
    tensors = ckpt.layer_tensors(layer)
    loaded = load_layer(method, module, tensors)
    method.process_weights_after_loading(module)
    assert method.scheme.backend == backend
    floating = {k: v for k, v in tensors.items() if v.is_floating_point()}
    assert sorted(loaded) == sorted(floating)  # only the int32 channel index is not loaded into a parameter
    assert [k for k in tensors if k not in floating] == [base_channels_name(ckpt.spec(layer).prefix)]
    buffers = dict(module.named_buffers(remove_duplicate=False))
    norms = buffers.pop("moe_compress_cpu_base_down_norms", None)
    layout = [b for name, b in buffers.items() if name.startswith("moe_compress_cpu_") and b.is_floating_point()]
    assert bool(layout) == (backend == "cpu") == (norms is not None)
    if norms is not None:
        assert norms.shape == (ckpt.spec(layer).base_channels,) and norms.dtype == torch.float32
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # a layout tensor may be a parameter
                for t in [*module.parameters(), *layout] if t.numel()}
    assert sum(storages.values()) == sum(nbytes(t) for t in floating.values())
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in module.parameters())


# ---------------------------------------------------------------------------------------------- 3. tensor parallel


SHARDED = {"w13_delta_u": 0, "w2_delta_v": 1, "w13_base": None, "w2_base": 1}  # param -> concat dim over ranks
REPLICATED = ("w13_delta_v", "w2_delta_u")


@pytest.mark.parametrize("layer", LAYERS)
def test_tensor_parallel_ranks_sum_to_full_output(ckpt, layer, torch_strategy):
    tp = 2
    cfg = make_config(ckpt.qc, ckpt.dir)
    spec = ckpt.spec(layer)
    h, part = spec.hidden_size, spec.intermediate_size // tp
    channels = cfg.indices[layer][base_channels_name(spec.prefix)]
    full_method, full = loaded_layer(cfg, ckpt, layer)
    ranks = [loaded_layer(cfg, ckpt, layer, tp_rank=t, tp_size=tp) for t in range(tp)]

    # Shapes per base_delta.py's docstring: U rows of gate/up and V columns of down sharded, other factors
    # replicated, base rows/columns of the kept channels inside the rank's slice (ragged, not padded).
    r13 = sum(spec.ranks["gate"]) + sum(spec.ranks["up"])
    rd = sum(spec.ranks["down"])
    local_counts = []
    for t, (method, module) in enumerate(ranks):
        local = [c - t * part for c in channels if t * part <= c < (t + 1) * part]
        local_counts.append(len(local))
        assert module.moe_compress_channels.tolist() == local
        assert {n: tuple(p.shape) for n, p in module.named_parameters()} == {
            "w13_delta_u": (part, r13), "w13_delta_v": (r13, h), "w2_delta_u": (h, rd), "w2_delta_v": (rd, part),
            "w13_base": (2 * len(local), h), "w2_base": (h, len(local)),
        }
    assert sum(local_counts) == spec.base_channels and min(local_counts) > 0

    # Values: sharded tensors concatenate to the TP=1 tensors, replicated ones equal them.
    for name, dim in SHARDED.items():
        parts = [getattr(m, name) for _, m in ranks]
        if name == "w13_base":  # gate rows then up rows on every rank
            halves = [p.chunk(2) for p in parts]
            whole = torch.cat([torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])])
        else:
            whole = torch.cat(parts, dim)
        assert torch.equal(whole, getattr(full, name)), name
        assert sum(nbytes(p) for p in parts) == nbytes(getattr(full, name)), name
    for name in REPLICATED:
        for _, m in ranks:
            assert torch.equal(getattr(m, name), getattr(full, name)), name

    for x, ids, weights in routings(spec, seed=10 + layer):
        want = plugin_forward(full_method, full, x, ids, weights)
        got = sum(plugin_forward(method, module, x, ids, weights) for method, module in ranks)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_tensor_parallel_size_must_divide_intermediate(ckpt):
    cfg = make_config(ckpt.qc, ckpt.dir)
    with pytest.raises(ValueError, match="not divisible by tensor-parallel size 3"):
        make_layer(cfg, 0, tp_rank=0, tp_size=3)


# ---------------------------------------------------------------------------------------------- 4. bad checkpoints



def with_tensor(tensors: dict, name: str, value: torch.Tensor | None) -> dict:
    """A copy of ``tensors`` with ``name`` replaced (or dropped when ``value`` is None), in the same order."""
    out = {}
    for k, v in tensors.items():
        if k != name:
            out[k] = v
        elif value is not None:
            out[k] = value
    return out


def with_nan(t: torch.Tensor, index: tuple[int, int]) -> torch.Tensor:
    t = t.clone()
    t[index] = float("nan")
    return t


# Each case: (id, where = the tensor the error must name, make_bad(layer tensors, name) -> bad tensors, stage).
# stage "load" = the parameter loader raises; "check" = process_weights_after_loading raises.
BAD_TENSORS = [
    ("missing-gate-delta_v", (3, "gate", "delta_v"), lambda t, n: with_tensor(t, n, None), "check"),
    ("missing-up-delta_v", (5, "up", "delta_v"), lambda t, n: with_tensor(t, n, None), "check"),
    ("missing-down-delta_v", (7, "down", "delta_v"), lambda t, n: with_tensor(t, n, None), "check"),
    ("missing-down-delta_u", (2, "down", "delta_u"), lambda t, n: with_tensor(t, n, None), "check"),
    ("missing-base-up", ("base", "up", None), lambda t, n: with_tensor(t, n, None), "check"),
    ("shape-extra-column", (4, "gate", "delta_u"),
     lambda t, n: with_tensor(t, n, torch.cat([t[n], t[n][:, :1]], dim=1)), "load"),
    ("shape-down-delta_v", (1, "down", "delta_v"), lambda t, n: with_tensor(t, n, t[n][:-1]), "load"),
    ("shape-base-down", ("base", "down", None), lambda t, n: with_tensor(t, n, t[n][:, :-1]), "load"),
    ("dtype-int32", (6, "up", "delta_v"), lambda t, n: with_tensor(t, n, torch.ones_like(t[n], dtype=torch.int32)),
     "load"),
    ("inf-gate-delta_v", (5, "gate", "delta_v"), lambda t, n: with_tensor(t, n, t[n].clone().index_fill_(0, torch.tensor([0]), float("inf"))), "load"),
    ("nan-gate-delta_u", (4, "gate", "delta_u"), lambda t, n: with_tensor(t, n, with_nan(t[n], (3, 2))), "load"),
    ("nan-up-delta_v", (6, "up", "delta_v"), lambda t, n: with_tensor(t, n, with_nan(t[n], (1, 5))), "load"),
    ("nan-down-delta_v", (0, "down", "delta_v"), lambda t, n: with_tensor(t, n, with_nan(t[n], (0, 31))), "load"),
    ("nan-base-up", ("base", "up", None), lambda t, n: with_tensor(t, n, with_nan(t[n], (2, 7))), "load"),
]


def run_bad_case(ckpt, where, make_bad):
    """Load the bad tensors into a fresh layer; return (tensor name, stage that raised or None, message)."""
    name = ckpt.name(LAYER, *where)
    bad = make_bad(ckpt.layer_tensors(LAYER), name)
    method, module = make_layer(make_config(ckpt.qc, ckpt.dir), LAYER)
    try:
        load_layer(method, module, bad)
    except ValueError as err:
        return name, "load", str(err)
    try:
        method.process_weights_after_loading(module)
    except ValueError as err:
        return name, "check", str(err)
    return name, None, None


@pytest.mark.parametrize("case_id, where, make_bad, stage", BAD_TENSORS, ids=[c[0] for c in BAD_TENSORS])
def test_bad_tensor_is_rejected(ckpt, case_id, where, make_bad, stage):
    name, raised_at, message = run_bad_case(ckpt, where, make_bad)
    assert raised_at == stage, f"{name}: expected an error at {stage}, got {raised_at}: {message}"
    assert message.startswith("moe_compress: tensor ")


@pytest.mark.parametrize("case_id, where, make_bad, stage", BAD_TENSORS, ids=[c[0] for c in BAD_TENSORS])
def test_bad_tensor_error_names_the_checkpoint_tensor(ckpt, case_id, where, make_bad, stage):
    name, raised_at, message = run_bad_case(ckpt, where, make_bad)
    assert raised_at == stage
    assert re.search(re.escape(name) + r"\b", message), f"{name} not in: {message}"


def rank_zero_case(ckpt):
    qc = copy.deepcopy(ckpt.qc)
    qc["layers"][str(LAYER)]["ranks"]["gate"][2] = 0
    cfg = make_config(qc, ckpt.dir)
    assert cfg.layers[LAYER].ranks["gate"][2] == 0
    # The same spec built with dataclasses.replace on the unmodified config.
    plain = make_config(ckpt.qc, ckpt.dir)
    ranks = copy.deepcopy(plain.layers[LAYER].ranks)
    ranks["gate"][2] = 0
    assert dataclasses.replace(plain.layers[LAYER], ranks=ranks) == cfg.layers[LAYER]
    method, module = make_layer(cfg, LAYER)
    name = ckpt.name(LAYER, 2, "gate", "delta_u")
    return method, module, name


def test_tensor_of_rank_zero_expert_is_rejected(ckpt):
    method, module, name = rank_zero_case(ckpt)
    # every other tensor of the layer loads
    load_layer(method, module, {k: v for k, v in ckpt.layer_tensors(LAYER).items()
                                if ".experts.2.gate_proj." not in k})
    method.process_weights_after_loading(module)
    with pytest.raises(ValueError, match=r"^moe_compress: tensor .* present but quantization_config gives expert 2 "
                                         r"rank 0"):
        load_layer(method, module, {name: ckpt.tensors[name]})


def test_tensor_of_rank_zero_expert_error_names_it(ckpt):
    method, module, name = rank_zero_case(ckpt)
    with pytest.raises(ValueError) as err:
        load_layer(method, module, {name: ckpt.tensors[name]})
    assert re.search(re.escape(name) + r"\b", str(err.value)), str(err.value)


def test_rank_larger_than_matrix_is_rejected(ckpt):
    qc = copy.deepcopy(ckpt.qc)
    spec = qc["layers"]["1"]
    spec["ranks"]["down"][4] = min(spec["hidden_size"], spec["intermediate_size"]) + 1
    with pytest.raises(ValueError) as err:
        MoECompressConfig.from_config(qc)
    message = str(err.value)
    assert "layer 1" in message and "ranks" in message and "'down'" in message


@pytest.mark.parametrize("where", ["from_config", "method"])
def test_unknown_scheme_is_rejected(ckpt, where):
    if where == "from_config":
        qc = copy.deepcopy(ckpt.qc)
        qc["layers"]["0"]["scheme"] = "tucker_cp"
        with pytest.raises(ValueError, match="tucker_cp"):
            MoECompressConfig.from_config(qc)
    else:
        cfg = make_config(ckpt.qc, ckpt.dir)
        spec = copy.copy(cfg.layers[0])
        spec.scheme = "tucker_cp"  # the class's scheme, shadowed on this instance
        with pytest.raises(ValueError, match="tucker_cp.*base_delta"):
            CompressedMoEMethod(fake_moe(), spec, cfg.info.proj_names, cfg.indices[0], 0.0)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_format_version_is_rejected(ckpt, version):
    qc = copy.deepcopy(ckpt.qc)
    if version is None:
        del qc["format_version"]
    else:
        qc["format_version"] = version
    with pytest.raises(ValueError, match="format_version"):
        MoECompressConfig.from_config(qc)


def test_dense_model_with_quantization_flag_is_rejected():
    # vLLM calls quant_cls() when config.json has no quantization_config (get_config_filenames() is empty).
    with pytest.raises(NotCompressedError, match="moe_compress") as err:
        MoECompressConfig()
    assert "quantization_config" in str(err.value)
    assert isinstance(err.value, ValueError)
    for qc in ({}, {"quant_method": "fp8"}):
        with pytest.raises(ValueError, match="not a moe_compress checkpoint"):
            MoECompressConfig.from_config(qc)


def channel_cases(channels: list[int], size: int) -> dict[str, list[int] | None]:
    return {
        "duplicated": channels[:1] + channels[:-1],
        "unsorted": [channels[1], channels[0], *channels[2:]],
        "out-of-range": [*channels[:-1], size],
        "negative": [-1, *channels[1:]],
        "too-few": channels[:-1],
        "missing": None,
    }


@pytest.mark.parametrize("case", list(channel_cases(list(range(10)), 10)))
def test_bad_channel_index_is_rejected(ckpt, tmp_path, case):
    spec = ckpt.spec(LAYER)
    name = base_channels_name(spec.prefix)
    channels = ckpt.tensors[name].tolist()
    bad = channel_cases(channels, spec.intermediate_size)[case]
    tensors = {k: v for k, v in ckpt.tensors.items() if k != name}
    if bad is not None:
        tensors[name] = torch.tensor(bad, dtype=torch.int32)
    save_file(tensors, str(tmp_path / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    cfg = MoECompressConfig.from_config(copy.deepcopy(ckpt.qc))
    with pytest.raises(ValueError) as err:
        cfg.maybe_update_config(str(tmp_path))
    assert re.search(re.escape(name) + r"\b", str(err.value)), str(err.value)


def test_no_safetensors_is_rejected(ckpt, tmp_path):
    cfg = MoECompressConfig.from_config(copy.deepcopy(ckpt.qc))
    with pytest.raises(ValueError, match="no safetensors files"):
        cfg.maybe_update_config(str(tmp_path))


def test_layer_shape_mismatch_and_expert_parallel_are_rejected(ckpt):
    cfg = make_config(ckpt.qc, ckpt.dir)
    spec = cfg.layers[0]
    method = CompressedMoEMethod(fake_moe(), spec, cfg.info.proj_names, cfg.indices[0], 0.0)
    with pytest.raises(ValueError, match=re.escape(spec.prefix)):
        method.create_weights(torch.nn.Module(), spec.num_experts + 1, spec.hidden_size, spec.intermediate_size,
                              torch.float32)
    ep = SimpleNamespace(moe_parallel_config=SimpleNamespace(use_ep=True, tp_rank=0), tp_size=1)
    with pytest.raises(ValueError, match="expert parallelism"):
        CompressedMoEMethod(ep, spec, cfg.info.proj_names, cfg.indices[0], 0.0)


# ---------------------------------------------------------------------------------------------- 5. weight mapper


MAPPED = {
    "model.layers.3.mlp.experts.base.gate_proj.weight": "model.layers.3.mlp.experts.0.gate_proj.base",
    "model.layers.3.mlp.experts.base.up_proj.weight": "model.layers.3.mlp.experts.0.up_proj.base",
    "model.layers.3.mlp.experts.base.down_proj.weight": "model.layers.3.mlp.experts.0.down_proj.base",
    "model.layers.3.block_sparse_moe.experts.base.w1.weight": "model.layers.3.block_sparse_moe.experts.0.w1.base",
    "model.layers.3.block_sparse_moe.experts.base.w2.weight": "model.layers.3.block_sparse_moe.experts.0.w2.base",
    "model.layers.3.block_sparse_moe.experts.base.w3.weight": "model.layers.3.block_sparse_moe.experts.0.w3.base",
    "model.layers.3.mlp.experts.base.channels": None,
    "model.layers.3.block_sparse_moe.experts.base.channels": None,
    "model.layers.3.mlp.experts.5.up_proj.delta_u": "model.layers.3.mlp.experts.5.up_proj.delta_u",
    "model.layers.3.mlp.experts.0.gate_proj.delta_v": "model.layers.3.mlp.experts.0.gate_proj.delta_v",
    "model.layers.3.block_sparse_moe.experts.7.w2.delta_v": "model.layers.3.block_sparse_moe.experts.7.w2.delta_v",
    "model.layers.3.mlp.gate.weight": "model.layers.3.mlp.gate.weight",
    "model.layers.3.self_attn.q_proj.weight": "model.layers.3.self_attn.q_proj.weight",
}


def test_checkpoint_weight_mapper():
    mapper = MoECompressConfig.get_checkpoint_weight_mapper()
    for name, want in MAPPED.items():
        got = mapper.map_name(name)
        assert got == want, name
        if got is not None:
            assert mapper.map_name(got) == got, f"not idempotent on {name}"
    once = list(mapper.apply((name, torch.zeros(1)) for name in MAPPED))
    twice = list(mapper.apply(iter(once)))
    assert [n for n, _ in once] == [w for w in MAPPED.values() if w is not None]
    assert [n for n, _ in twice] == [n for n, _ in once]


def test_every_checkpoint_tensor_reaches_a_parameter(ckpt):
    """Through mapper + vLLM's expert mapping, each factor and base weight lands on one of the six parameters."""
    for layer in LAYERS:
        spec = ckpt.spec(layer)
        seen = set()
        for name, tensor in ckpt.layer_tensors(layer).items():
            target = route(name, spec.num_experts)
            if target is None:
                assert name == base_channels_name(spec.prefix)
                continue
            param, shard_id, expert_id = target
            seen.add(param)
            if ".base." in name:
                assert param in ("w13_base", "w2_base") and expert_id == 0
            else:
                assert param == ("w2_" if shard_id == "w2" else "w13_") + name.rsplit(".", 1)[1]
                assert name.startswith(f"{spec.prefix}.{expert_id}.")
        assert seen == {"w13_delta_u", "w13_delta_v", "w2_delta_u", "w2_delta_v", "w13_base", "w2_base"}


@pytest.mark.parametrize("has_amx", [True, False])
def test_register_requests_the_amx_tile_state_where_the_cpu_has_amx(has_amx, monkeypatch):
    """vLLM CPU's AMX attention kernel does not ask Linux for the AMX registers; a worker whose first AMX
    instruction is that kernel's dies of SIGILL (seen on an AMX Xeon: the quick start's first request). register()
    runs in every vLLM process and asks there, only on CPUs that have AMX."""
    requests = []
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: has_amx)
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: requests.append(True) or True)
    vllm_moe_compress.register()
    assert requests == ([True] if has_amx else [])
