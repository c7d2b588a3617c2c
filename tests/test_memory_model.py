"""The memory model (offline/memory_model.py): what it counts, and the refusal before anything is written."""

from __future__ import annotations

import pytest
import torch

from vllm_moe_compress.offline import memory_model
from vllm_moe_compress.offline.architectures import architecture_for
from vllm_moe_compress.offline.budget import LayerShape
from vllm_moe_compress.offline.checkpoint_io import SafetensorsCheckpoint, read_config
from vllm_moe_compress.offline.compress import CalibrationOptions, build_method, compress_checkpoint, find_moe_layers
from vllm_moe_compress.offline.memory_model import MemoryBudgetError, check_memory, estimate_peak
from vllm_moe_compress.offline.methods import base
from vllm_moe_compress.offline.methods.base import (
    PARALLEL_WORKING_SET, expert_working_set, factorization_workers,
)
from vllm_moe_compress.offline.methods.group_basis import group_working_set

from conftest import CALIBRATION_FILE, tiny_config, write_tiny_model


def estimate(path, method="whitened-svd", samples=8, chunk=4, dtype="bfloat16", fisher_batch=None):
    from transformers import AutoConfig

    ckpt = SafetensorsCheckpoint(path)
    layout = find_moe_layers(ckpt, architecture_for(read_config(path)), AutoConfig.from_pretrained(path))
    calibration = CalibrationOptions(file=CALIBRATION_FILE, samples=samples, seqlen=32, fisher_samples=4,
                                     fisher_batch_size=fisher_batch)
    return estimate_peak(ckpt, layout, read_config(path)["num_hidden_layers"], build_method(method), calibration,
                         chunk, dtype=dtype)


@pytest.fixture(scope="module")
def depths(tmp_path_factory):
    models = {}
    for layers in (2, 6):
        config = tiny_config("qwen3_moe")
        config.num_hidden_layers = layers
        models[layers] = write_tiny_model(config, tmp_path_factory.mktemp(f"depth{layers}") / "m")
    return models


def test_estimate_does_not_grow_with_depth_but_with_samples_and_chunk(depths):
    shallow, deep = estimate(depths[2]), estimate(depths[6])
    assert (shallow.parts, shallow.phases) == (deep.parts, deep.phases)  # one layer's worth, whatever the depth
    bigger = estimate(depths[2], samples=64)
    assert bigger.parts["calibration activations (float32)"] == 8 * shallow.parts["calibration activations (float32)"]
    assert sum(estimate(depths[2], chunk=8).phases["compression"].values()) > sum(
        shallow.phases["compression"].values())
    # H = 64, I = 32, E = 8; hidden states and cached expert inputs in float32
    compression = shallow.phases["compression"]
    assert compression["Grams of 4 experts (float64)"] == 4 * (64**2 + 32**2) * 8
    for method in ("svd", "rfid", "mobe"):  # they read no Gram, so none is computed
        assert not any(name.startswith("Grams of") for name in estimate(depths[2], method=method).phases["compression"])
    # per worker one expert's working set of each pass (gate/up first: [32, 64] matrices, a 64 x 64 Gram; then
    # down: [64, 32], 32 x 32), with the float32 factors (cast as formed) held by the pass's end: 2 of 3
    # projections' after gate/up, all after down; the kept (1 - ratio) share of the experts, ratio 0 here
    factors = 8 * 3 * 64 * 32 * 4
    passes = {"gate/up": (expert_working_set((32, 64), 64, 2), factors * 2 // 3),
              "down": (expert_working_set((64, 32), 32, 1), factors)}
    held = {name: factorization_workers(ws) * ws + done for name, (ws, done) in passes.items()}
    largest = max(held, key=held.get)
    workers, done = factorization_workers(passes[largest][0]), {"gate/up": 2, "down": 3}[largest]
    assert compression[f"{largest} pass: {workers} factorisation worker(s) (float64) + {done} of 3 projections' "
                       "factors (float32)"] == held[largest]
    assert shallow.phases["writing"]["compressed layer (float32 factors + bfloat16 copy)"] == 8 * 3 * 64 * 32 * (4 + 2)
    # safetensors.torch.save: the stored tensors, the file built from them and its copy into bytes
    assert shallow.phases["serialisation"]["compressed layer (bfloat16) + 2 copies of its file"] == 8 * 3 * 64 * 32 * 2 * 3
    # the experts are read through the checkpoint's mapped pages as in calibration; rs also reads the next layer
    pages = shallow.phases["calibration"]["mapped checkpoint pages"]
    ckpt = SafetensorsCheckpoint(depths[2])  # a small layer maps at most its own stored size
    assert pages == sum(ckpt.numel(k) * ckpt.dtype(k).itemsize for k in ckpt.keys() if ".layers.0." in k)
    assert compression["mapped checkpoint pages (the layer)"] == pages
    assert estimate(depths[2], method="rs").phases["compression"][
        "mapped checkpoint pages (this and the next layer)"] == 2 * pages
    assert estimate(depths[2], method="rs").phases["compression"][
        "8 expert-sized matrices (float64)"] == 8 * 64 * 32 * 8  # per expert, not the layer
    assert shallow.parts["calibration activations (float32)"] == 2 * 8 * 32 * 64 * 4
    # one batch (8 windows of 32 tokens) through the layer: per routed pair (top_k 2) the larger of 4 hidden-sized
    # vectors and 1 hidden- + 4 intermediate-sized (max(256, 192)), per token 8 hidden-sized
    assert shallow.phases["calibration"]["layer forward, 8 windows of 32 tokens (float32)"] == (
        8 * 32 * (2 * 4 * 64 + 8 * 64) * 4)
    rs = estimate(depths[2], method="rs").phases["compression"]  # the next layer's V_in, 16 of its experts
    assert rs["next layer's V_in for 16 experts and 2 products (float32)"] == 16 * 32 * (64 + 2 * 32) * 4
    rfid = estimate(depths[2], method="rfid").phases["compression"]  # ratio 0: the fit's state at full size
    gate_group = group_working_set(4 * 32, 64)  # the largest group matrix: gate/up's [k·I, H], not down's [k·H, I]
    assert gate_group > group_working_set(4 * 64, 32)
    initialisation = {"one projection's parameters (float32)": 8 * 64 * 32 * 4,
                      f"groups' initialisation: {factorization_workers(gate_group)} worker(s)' group matrix, Gram "
                      "and eigendecomposition (float64)": factorization_workers(gate_group) * gate_group}
    # Adam's step temporaries: the largest tensor is a group's coefficients [k·I, K] at the largest rank,
    # min(k·I, H) = 64, or down's [k·H, K] at min(k·H, I) = 32: 8192 elements either way
    fit = {"one projection's fit: parameters, gradients, 2 Adam moments, best state (float32)": 5 * 8 * 64 * 32 * 4,
           "Adam step's 2 temporaries of the largest parameter (float32)": 2 * 4 * 32 * 64 * 4,
           "one group's target, prediction, error (float32)": 4 * 64 * 32 * 3 * 4,
           "freed heap kept by glibc, 2 x the parameters": 2 * 8 * 64 * 32 * 4}
    larger = max(initialisation, fit, key=lambda step: sum(step.values()))
    assert {name: rfid[name] for name in larger} == larger
    assert not set(rfid) & (set(initialisation) | set(fit)) - set(larger)  # the smaller step is not counted
    # the larger phase counts, not their sum
    assert shallow.total == memory_model.RUNTIME_ALLOWANCE + sum(shallow.parts.values()) + max(
        sum(p.values()) for p in shallow.phases.values())
    fisher = estimate(depths[6], method="d2")
    assert fisher.parts["Fisher layer inputs (float32)"] == 7 * 4 * 32 * 64 * 4
    # the Fisher backward's phase: a layer as in calibration, and one batch's activations (top_k 2, H 64, I 32):
    # per routed pair 5 hidden- and 6 intermediate-sized vectors, per token 8 hidden-sized; the default batch
    # (1024 tokens: 32 windows of 32) holds the 4 Fisher windows, a smaller one fewer
    assert "Fisher backward" not in shallow.phases
    backward, calibration = fisher.phases["Fisher backward"], fisher.phases["calibration"]
    forward = "layer forward, 8 windows of 32 tokens (float32)"  # counted in the backward's activations instead
    heap = f"freed heap the forward keeps after a compressed layer, {memory_model.FORWARD_HEAP_RETAINED} x its activations"
    assert calibration[heap] == round(memory_model.FORWARD_HEAP_RETAINED * calibration[forward])
    assert {k: backward[k] for k in calibration if k not in (forward, heap)} == {
        k: v for k, v in calibration.items() if k not in (forward, heap)}
    assert forward not in backward and heap not in backward
    per_window = 32 * (2 * (5 * 64 + 6 * 32) + 8 * 64) * 4
    assert backward["Fisher backward, 4 windows of 32 tokens (float32)"] == 4 * per_window
    assert estimate(depths[6], method="d2", fisher_batch=3).phases["Fisher backward"][
        "Fisher backward, 3 windows of 32 tokens (float32)"] == 3 * per_window


def test_refusal_names_the_options_and_writes_nothing(depths, tmp_path, monkeypatch):
    with pytest.raises(MemoryBudgetError, match="--calib-samples or --expert-chunk"):
        check_memory(estimate(depths[2]), available=1)

    class Tiny:
        available = 1

    monkeypatch.setattr(memory_model.psutil, "virtual_memory", lambda: Tiny)
    calibration = CalibrationOptions(file=CALIBRATION_FILE, samples=4, seqlen=32)
    with pytest.raises(MemoryBudgetError, match=r"expected peak memory [\d.]+ GiB exceeds"):
        compress_checkpoint(depths[2], tmp_path / "out", build_method("svd"), 0.1, calibration, progress=False)
    assert list(tmp_path.iterdir()) == []


INITIALISATION = "one projection's parameters (float32)"
FIT = "one projection's fit: parameters, gradients, 2 Adam moments, best state (float32)"
ADAM_STEP = "Adam step's 2 temporaries of the largest parameter (float32)"
HEAP = "freed heap kept by glibc, 2 x the parameters"


@pytest.mark.parametrize("method", ["svd", "whitened-svd", "d2", "rs", "rfid", "mobe"])
@pytest.mark.parametrize("experts,step", [((4, 8), INITIALISATION), ((64, 128), FIT)])
def test_working_set_does_not_grow_with_the_experts(method, experts, step):
    """Only the fitted parameters (the compressed projection itself, with its Adam state and the heap glibc keeps
    in the fit, and MoBE's bases, shared by all experts, in its Adam step's temporaries) may scale with the
    experts of a layer. MoBE /
    RFID-MoE count the larger of their initialisation (two workers' group Grams here: the larger at few experts)
    and their fit (at many)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        few, many = (memory_model.method_working_set(build_method(method), LayerShape(e, 64, 32), 0.5)
                     for e in experts)
    finally:
        torch.set_num_threads(threads)
    assert few.keys() == many.keys()
    grows = {name for name in few if many[name] != few[name]}
    fit = {FIT, HEAP}
    assert grows == {"rfid": fit if step == FIT else {step},
                     "mobe": {*fit, ADAM_STEP} if step == FIT else {step}}.get(method, set())


def test_float32_output_needs_no_copy_and_one_expert_chunk_no_grams_part(depths):
    """float32 factors written as float32 are the written tensors themselves; with one expert per chunk the worker
    takes the chunk (counted in its working set)."""
    phases = estimate(depths[2], dtype="float32", chunk=1).phases
    assert phases["writing"]["compressed layer (float32 factors + float32 copy)"] == 8 * 3 * 64 * 32 * 4
    assert phases["serialisation"]["compressed layer (float32) + 2 copies of its file"] == 8 * 3 * 64 * 32 * 4 * 3
    assert not any(name.startswith("Grams of") for name in phases["compression"])


def test_mixtral_shapes_factorise_one_expert_at_a_time():
    """At Mixtral-8x7B's shapes the down pass holds the 14336 x 14336 Gram and its factor (3 GiB): one worker."""
    shape = LayerShape(8, 4096, 14336)
    down = expert_working_set((4096, 14336), 14336, 1)
    assert down >= 2 * 14336**2 * 8 and down >= PARALLEL_WORKING_SET
    assert factorization_workers(down) == 1
    parts = memory_model.method_working_set(build_method("whitened-svd"), shape, 0.6)
    assert parts == {"down pass: 1 factorisation worker(s) (float64)": down}
    assert base.pass_order(4096, 14336)[0] == ("down",)  # the larger Gram's pass first, beside fewer factors
