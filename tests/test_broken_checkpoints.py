"""A corpus of deliberately broken compressed checkpoints: each is refused at load with its own message.

Every case copies the good tiny checkpoint of tests/test_plugin_loading.py (its ``ckpt`` fixture), breaks
one thing (a tensor, a quantization_config field, the safetensors bytes, config.json) and loads it twice:

* through the vLLM plugin's load path without the engine (:func:`plugin_load`): config.json read by
  transformers as vLLM does, ``MoECompressConfig.from_config``, ``maybe_update_config``, ``get_quant_method``
  for each MoE layer, ``create_weights`` with the model's own sizes, every checkpoint tensor fed to its
  weight loader through the weight mapper and vLLM's expert mapping, ``process_weights_after_loading``;
* through the reference loader (offline/loading.py ``load_compressed_model``).

Each path must raise with the case's expected message, which names the tensor or the field.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

from vllm_moe_compress.offline.checkpoint_check import check_checkpoint
from vllm_moe_compress.offline.checkpoint_io import INDEX_NAME
from vllm_moe_compress.format.names import base_channels_name, base_name, delta_name
from vllm_moe_compress.offline.loading import load_compressed_model
from vllm_moe_compress.config import MoECompressConfig

from test_plugin_loading import ckpt, fake_moe, load_layer  # noqa: F401  (ckpt is the good checkpoint fixture)

PREFIX = "model.layers.{}.mlp.experts"
SHARD = "model-00001-of-00001.safetensors"


def factor(layer: int, expert: int, proj: str, kind: str) -> str:
    return delta_name(PREFIX.format(layer), expert, f"{proj}_proj", kind)


def base(layer: int, proj: str) -> str:
    return base_name(PREFIX.format(layer), f"{proj}_proj")


def channels(layer: int) -> str:
    return base_channels_name(PREFIX.format(layer))


# ------------------------------------------------------------------------------------------- ways to break


def edit_tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite the shard with ``edit(tensors)`` applied, and its index to match (as a careless tool would)."""
    def apply(directory: Path) -> None:
        tensors = load_file(directory / SHARD)
        edit(tensors)
        save_file(tensors, directory / SHARD, metadata={"format": "pt"})
        index = json.loads((directory / INDEX_NAME).read_text())
        index["weight_map"] = dict.fromkeys(sorted(tensors), SHARD)
        (directory / INDEX_NAME).write_text(json.dumps(index))
    return apply


def edit_qc(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite config.json with ``edit(quantization_config)`` applied."""
    def apply(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        edit(config["quantization_config"])
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    return apply


def edit_bytes(name: str, edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        (directory / name).write_bytes(edit((directory / name).read_bytes()))
    return apply


def header_edit(edit: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    """Safetensors bytes with their JSON header edited (and its length prefix updated)."""
    def apply(data: bytes) -> bytes:
        length = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + length])
        edit(header)
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + data[8 + length :]
    return apply


def last_tensor_overruns(header: dict) -> None:
    """The last tensor's data offsets end 64 bytes past the end of the file."""
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end + 64]


def poke(name: str, value: float) -> Callable[[dict], None]:
    def apply(tensors: dict) -> None:
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[5] = value
    return apply


def replace(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def apply(tensors: dict) -> None:
        tensors[name] = make(tensors[name]).contiguous()
    return apply


def drop(name: str) -> Callable[[dict], None]:
    return lambda tensors: tensors.pop(name)


def set_layer(layer: int, **fields) -> Callable[[dict], None]:
    return lambda qc: qc["layers"][str(layer)].update(fields)


def set_rank(layer: int, proj: str, expert: int, rank) -> Callable[[dict], None]:
    return lambda qc: qc["layers"][str(layer)]["ranks"][proj].__setitem__(expert, rank)


def fewer_experts(qc: dict) -> None:
    spec = qc["layers"]["0"]
    spec["num_experts"] -= 1
    for ranks in spec["ranks"].values():
        ranks.pop()


# ------------------------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Broken:
    id: str
    breaks: Callable[[Path], None]
    plugin: str | None  # regex the plugin's error must match (None: never reaches the plugin, see docs/reliability.md)
    reference: str      # regex the reference loader's error must match


def q(text: str) -> str:
    return re.escape(text)


CASES = [
    Broken("missing-factor", edit_tensors(drop(factor(0, 3, "gate", "delta_v"))),
           q(f"tensor {factor(0, 3, 'gate', 'delta_v')} is missing from the checkpoint"),
           q(f"tensor {factor(0, 3, 'gate', 'delta_v')} not found")),
    Broken("missing-base", edit_tensors(drop(base(1, "up"))),
           q(f"tensor {base(1, 'up')} is missing from the checkpoint"), q(f"tensor {base(1, 'up')} not found")),
    Broken("extra-factor-of-rank-0-expert", edit_qc(set_rank(0, "gate", 2, 0)),
           q(f"tensor {factor(0, 2, 'gate', 'delta_u')} present but quantization_config gives expert 2 rank 0"),
           q(f"tensor {factor(0, 2, 'gate', 'delta_')}") + r"[uv] is not part of layer 0's base_delta factors"),
    Broken("extra-factor-of-unknown-expert",
           edit_tensors(lambda t: t.update({factor(1, 99, "up", "delta_u"): t[factor(1, 0, "up", "delta_u")].clone()})),
           q(f"tensor {factor(1, 99, 'up', 'delta_u')} names expert 99, but quantization_config gives layer 1 8 experts"),
           q(f"tensor {factor(1, 99, 'up', 'delta_u')} is not part of layer 1's base_delta factors")),
    Broken("wrong-shape-factor", edit_tensors(replace(factor(0, 4, "gate", "delta_u"), lambda t: t[:, 1:])),
           q(f"tensor {factor(0, 4, 'gate', 'delta_u')} has shape"),
           q(f"tensor {factor(0, 4, 'gate', 'delta_u')} has shape")),
    Broken("wrong-shape-base", edit_tensors(replace(base(0, "down"), lambda t: t[:, :-1])),
           q(f"tensor {base(0, 'down')} has shape"), q(f"tensor {base(0, 'down')} has shape")),
    Broken("integer-factor", edit_tensors(replace(factor(1, 6, "up", "delta_v"), lambda t: t.to(torch.int32))),
           q(f"tensor {factor(1, 6, 'up', 'delta_v')} has dtype torch.int32, expected a floating-point factor"),
           q(f"tensor {factor(1, 6, 'up', 'delta_v')} is torch.int32, quantization_config.dtype says float32")),
    Broken("nan-factor", edit_tensors(poke(factor(1, 0, "down", "delta_u"), float("nan"))),
           q(f"tensor {factor(1, 0, 'down', 'delta_u')} contains NaN or Inf"),
           q(f"tensor {factor(1, 0, 'down', 'delta_u')} contains NaN or Inf")),
    Broken("inf-base", edit_tensors(poke(base(0, "gate"), float("inf"))),
           q(f"tensor {base(0, 'gate')} contains NaN or Inf"), q(f"tensor {base(0, 'gate')} contains NaN or Inf")),
    Broken("rank-list-too-short", edit_qc(lambda qc: qc["layers"]["1"]["ranks"]["up"].pop()),
           q("layer 1 (model.layers.1.mlp.experts): ranks['up'] must list one rank per expert (8)"),
           q("layer 1 (model.layers.1.mlp.experts): ranks['up'] must list one rank per expert (8)")),
    Broken("negative-rank", edit_qc(set_rank(0, "gate", 1, -1)),
           q("ranks['gate'] has -1, outside [0, 32]"), q("ranks['gate'] has -1, outside [0, 32]")),
    Broken("rank-above-min-h-i", edit_qc(set_rank(1, "down", 4, 33)),
           q("ranks['down'] has 33, outside [0, 32]"), q("ranks['down'] has 33, outside [0, 32]")),
    Broken("fractional-rank", edit_qc(set_rank(0, "up", 0, 2.5)),
           q("ranks['up'] has 2.5, outside [0, 32]"), q("ranks['up'] has 2.5, outside [0, 32]")),
    Broken("unknown-scheme", edit_qc(set_layer(0, scheme="tucker")),
           q("unknown scheme 'tucker'"), q("unknown scheme 'tucker'")),
    Broken("wrong-format-version", edit_qc(lambda qc: qc.update(format_version=2)),
           q("unsupported format_version 2; this version reads 1"), q("unsupported format_version 2")),
    Broken("missing-quant-method", edit_qc(lambda qc: qc.pop("quant_method")),
           q("not a moe_compress checkpoint (quantization_config.quant_method = None)"),
           q("not a moe_compress checkpoint (quantization_config.quant_method = None)")),
    Broken("unknown-stored-dtype", edit_qc(lambda qc: qc.update(dtype="float8")),
           q("quantization_config.dtype 'float8' is not one of"), q("quantization_config.dtype 'float8' is not one of")),
    Broken("dynamic-prune-ratio-out-of-range", edit_qc(lambda qc: qc.update(dynamic_prune_ratio=1.5)),
           q("dynamic_prune_ratio 1.5 is outside [0, 1)"), q("dynamic_prune_ratio 1.5 is outside [0, 1)")),
    Broken("proj-names-incomplete", edit_qc(lambda qc: qc["proj_names"].pop("up")),
           q("quantization_config.proj_names must map gate, up, down"),
           q("quantization_config.proj_names must map gate, up, down")),
    Broken("layer-entry-missing-field", edit_qc(lambda qc: qc["layers"]["1"].pop("prefix")),
           "malformed quantization_config.*prefix", "malformed quantization_config.*prefix"),
    Broken("layer-missing-from-quantization-config", edit_qc(lambda qc: qc["layers"].pop("1")),
           q("MoE layer model.layers.1.mlp.experts has no entry in quantization_config.layers"),
           q("tensor model.layers.1.mlp.experts.") + r"\S+ matches no parameter"),
    Broken("num-experts-mismatch", edit_qc(fewer_experts),
           q("tensor model.layers.0.mlp.experts.7.") + r"\S+" + q(" names expert 7, but quantization_config gives "
                                                                   "layer 0 7 experts"),
           q("layer 0 (model.layers.0.mlp.experts) has num_experts 7, but config.json builds 8")),
    Broken("hidden-size-mismatch", edit_qc(set_layer(1, hidden_size=48)),
           q("model.layers.1.mlp.experts is 8 experts of 48x32 in quantization_config, but the model builds 8 "
             "experts of 64x32"),
           q("layer 1 (model.layers.1.mlp.experts) has hidden_size 48, but config.json builds 64")),
    Broken("base-channels-above-intermediate", edit_qc(set_layer(0, base_channels=33)),
           q("base_channels 33 outside [0, 32]"), q("base_channels 33 outside [0, 32]")),
    Broken("base-channels-count-differs-from-index", edit_qc(lambda qc: qc["layers"]["1"].update(
               base_channels=qc["layers"]["1"]["base_channels"] - 1)),
           q(f"tensor {channels(1)} must hold sorted distinct channels"), q(f"tensor {channels(1)} has shape")),
    Broken("channel-index-unsorted", edit_tensors(replace(channels(0), lambda t: t.flip(0))),
           q(f"tensor {channels(0)} must hold sorted distinct channels"),
           q(f"tensor {channels(0)} must hold sorted distinct channels")),
    Broken("channel-index-duplicate", edit_tensors(replace(channels(1), lambda t: torch.cat([t[:1], t[:-1]]))),
           q(f"tensor {channels(1)} must hold sorted distinct channels"),
           q(f"tensor {channels(1)} must hold sorted distinct channels")),
    Broken("channel-index-out-of-range", edit_tensors(replace(channels(0), lambda t: torch.cat([t[:-1], t.new_tensor([32])]))),
           q(f"tensor {channels(0)} must hold sorted distinct channels") + r".*in \[0, 32\)",
           q(f"tensor {channels(0)} must hold sorted distinct channels") + r".*in \[0, 32\)"),
    Broken("channel-index-float", edit_tensors(replace(channels(1), lambda t: t.float())),
           q(f"tensor {channels(1)} must be a 1-D integer index, got torch.float32"),
           q(f"tensor {channels(1)} must be an integer index, got torch.float32")),
    Broken("channel-index-missing", edit_tensors(drop(channels(0))),
           q(f"tensor {channels(0)} missing from the checkpoint"), q(f"tensor {channels(0)} not found")),
    Broken("truncated-safetensors", edit_bytes(SHARD, lambda b: b[: len(b) * 2 // 3]),
           q(SHARD) + " is not a readable safetensors file.*not fully covered",
           q(SHARD) + " is not a readable safetensors file.*not fully covered"),
    Broken("header-claims-more-bytes-than-file", edit_bytes(SHARD, header_edit(last_tensor_overruns)),
           q(SHARD) + " is not a readable safetensors file", q(SHARD) + " is not a readable safetensors file"),
    Broken("header-length-beyond-file", edit_bytes(SHARD, lambda b: struct.pack("<Q", 10**9) + b[8:]),
           q(SHARD) + " is not a readable safetensors file", q(SHARD) + " is not a readable safetensors file"),
    Broken("config-not-json", edit_bytes("config.json", lambda b: b[: len(b) // 2]),
           "config.json' is not a valid JSON file", "config.json is not valid JSON"),
]


def test_corpus_is_large_and_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(c.plugin is not None for c in CASES) >= 20


# ------------------------------------------------------------------------------------------- the two load paths


def routed_experts_stub() -> RoutedExperts:
    """What ``get_quant_method`` is handed for an MoE layer: a RoutedExperts with a ``moe_config``."""
    layer = RoutedExperts.__new__(RoutedExperts)  # no engine: only isinstance and moe_config are used
    layer.__dict__["moe_config"] = fake_moe()
    return layer


def plugin_load(model_dir: Path) -> None:
    """The plugin's part of ``vllm serve model_dir --quantization moe_compress``, engine-free (module docstring)."""
    hf = transformers.AutoConfig.from_pretrained(model_dir)
    cfg = MoECompressConfig.from_config(hf.quantization_config)
    cfg.maybe_update_config(str(model_dir))
    layers = {}
    for index in range(hf.num_hidden_layers):
        method = cfg.get_quant_method(routed_experts_stub(), f"{PREFIX.format(index)}")
        module = torch.nn.Module()
        method.create_weights(module, hf.num_experts, hf.hidden_size, hf.moe_intermediate_size, torch.float32)
        layers[PREFIX.format(index) + "."] = (method, module)
    for path in sorted(model_dir.glob("*.safetensors")):  # as vLLM's safetensors weights iterator reads them
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                target = next((layer for prefix, layer in layers.items() if name.startswith(prefix)), None)
                if target is not None:
                    load_layer(*target, {name: f.get_tensor(name)})
    for method, module in layers.values():
        method.process_weights_after_loading(module)


@pytest.fixture
def broken(ckpt, tmp_path, request) -> Path:  # noqa: F811  (ckpt: the imported fixture)
    case: Broken = request.param
    directory = tmp_path / case.id
    shutil.copytree(ckpt.dir, directory)
    case.breaks(directory)
    return directory


def test_good_checkpoint_loads_on_both_paths(ckpt):  # noqa: F811
    plugin_load(ckpt.dir)
    assert load_compressed_model(ckpt.dir) is not None


PLUGIN_CASES = [c for c in CASES if c.plugin is not None]


@pytest.mark.parametrize("case, broken", [(c, c) for c in PLUGIN_CASES], ids=[c.id for c in PLUGIN_CASES],
                         indirect=["broken"])
def test_plugin_refuses(case, broken):
    with pytest.raises((ValueError, OSError), match=case.plugin) as err:
        plugin_load(broken)
    assert "config.json" in str(err.value) or str(err.value).startswith("moe_compress: ")


@pytest.mark.parametrize("case, broken", [(c, c) for c in CASES], ids=[c.id for c in CASES], indirect=["broken"])
def test_reference_loader_refuses(case, broken):
    with pytest.raises(ValueError, match=case.reference):
        load_compressed_model(broken)


# ------------------------------------------------------------------------------------------- the header check

VALUE_CASES = {"nan-factor", "inf-base"}  # only reading the values finds these (inspect --verify)
HEADER_MESSAGES = {  # where the header check words it differently from the reference loader
    "layer-missing-from-quantization-config":
        q("tensor model.layers.1.mlp.experts.") + r"\S+" + q(" belongs to a MoE layer that quantization_config.layers "
                                                            "does not list"),
}


@pytest.mark.parametrize("case, broken", [(c, c) for c in CASES], ids=[c.id for c in CASES], indirect=["broken"])
def test_header_check_refuses(case, broken):
    """offline/checkpoint_check.py: what vLLM's front end and ``inspect`` run, without reading the factors."""
    if case.id in VALUE_CASES:
        check_checkpoint(broken)
        with pytest.raises(ValueError, match=case.reference):
            check_checkpoint(broken, values=True)
    else:
        with pytest.raises(ValueError, match=HEADER_MESSAGES.get(case.id, case.reference)):
            check_checkpoint(broken)


def test_header_check_passes_the_good_checkpoint(ckpt):  # noqa: F811
    assert check_checkpoint(ckpt.dir, values=True).layers


def test_vllm_front_end_refuses_before_the_engine(ckpt, tmp_path):  # noqa: F811
    """vLLM calls override_quantization_method while building ModelConfig in the API-server process."""
    hf = transformers.AutoConfig.from_pretrained(ckpt.dir)
    qc = hf.quantization_config
    assert MoECompressConfig.override_quantization_method(qc, "moe_compress", hf_config=hf) == "moe_compress"
    directory = tmp_path / "broken"
    shutil.copytree(ckpt.dir, directory)
    edit_tensors(drop(factor(0, 3, "gate", "delta_v")))(directory)
    hf = transformers.AutoConfig.from_pretrained(directory)
    with pytest.raises(ValueError, match=q(f"cannot be served: tensor {factor(0, 3, 'gate', 'delta_v')} not found")):
        MoECompressConfig.override_quantization_method(qc, None, hf_config=hf)
    assert MoECompressConfig.override_quantization_method({"quant_method": "fp8"}, None, hf_config=hf) is None


INSPECT_CASES = [(c, c, c.id in VALUE_CASES) for c in CASES if c.id in ("missing-factor", "nan-factor")]


@pytest.mark.parametrize("case, broken, verify", INSPECT_CASES, ids=[c.id for c, _, _ in INSPECT_CASES],
                         indirect=["broken"])
def test_inspect_refuses_in_one_line(case, broken, verify, capsys):
    from vllm_moe_compress.offline.cli import main

    assert main(["inspect", str(broken), *(["--verify"] if verify else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-compress inspect: error: ") and err.count("\n") == 1
    assert re.search(case.reference, err)
