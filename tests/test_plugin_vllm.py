"""The vLLM plugin against the reference forward: greedy tokens and prompt logprobs, every architecture and scheme.

Every model below runs in ONE vLLM subprocess (tests/vllm_models.py: vLLM imports once, each engine starts in
seconds), except TP=2, which needs its worker processes. Dynamic base pruning is off on both sides (the plugin's
default), so outputs must not depend on batching. None of the jobs passes a quantization method: vLLM must take
``moe_compress`` from config.json.
"""

import json
from pathlib import Path

import pytest

from conftest import FAMILIES
from vllm_models import (EVERY_SCHEME, assert_same, compress_for_vllm, job, materialize_dense, mixed_scheme_checkpoint,
                         outputs, reference, run_vllm)

pytestmark = pytest.mark.slow

GREEDY_FAMILIES = [f for f in FAMILIES if f != "deepseek_v2"]
"""D²-MoE (base_delta with a pruned base) in eager mode, one model per family; DeepSeek-V2 has its own oracle."""

BASIS_RESIDUAL_VARIANTS = {"rfid-down": ("rfid", {"factorize_down": True, "residual_fraction": 0.03}),
                           "mobe": ("mobe", {})}
"""basis_residual beyond the hashed residual with a dense down (in EVERY_SCHEME): factorised down, MoBE's mixed bases."""

DEEPSEEK = dict(eager=True, max_num_seqs=1, cpu_mla=True)
"""One sequence at a time (batched MLA on CPU is not deterministic), reference MLA backend in float32."""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-models")
    models = {family: compress_for_vllm(family, root) for family in FAMILIES}
    models["every-scheme"] = mixed_scheme_checkpoint(root / "every-scheme", EVERY_SCHEME)
    for name, (method, options) in BASIS_RESIDUAL_VARIANTS.items():
        models[name] = compress_for_vllm("qwen3_moe", root / name, method, **options)
    models["deepseek-dense"] = materialize_dense(models["deepseek_v2"], root / "deepseek-dense")
    return models


@pytest.fixture(scope="module")
def engines(models) -> dict[str, dict]:
    """Each model's vLLM result, by the names of ``models``; all engines eager but ``every-scheme`` (compiled)."""
    jobs = {name: job(models[name], eager=True) for name in [*GREEDY_FAMILIES, *BASIS_RESIDUAL_VARIANTS]}
    jobs["every-scheme"] = job(models["every-scheme"])
    jobs["deepseek_v2"] = job(models["deepseek_v2"], **DEEPSEEK)
    jobs["deepseek-dense"] = job(models["deepseek-dense"], **DEEPSEEK)
    return dict(zip(jobs, run_vllm(list(jobs.values())), strict=True))


@pytest.mark.parametrize("family", GREEDY_FAMILIES)
def test_greedy_equals_reference(family, models, engines):
    assert_same(outputs(engines[family]), reference(models[family]))


def test_deepseek_equals_vllm_dense_reconstruction(engines):
    """vLLM's DeepSeek-V2 differs from transformers' even uncompressed (MLA), so the oracle here is vLLM's own
    dense path on the materialised experts (a plain checkpoint: the plugin installed must not get in its way)."""
    assert_same(outputs(engines["deepseek_v2"]), outputs(engines["deepseek-dense"]))


def test_compiled_mode_every_scheme(models, engines):
    """vLLM's default CPU mode compiles the model (Dynamo fullgraph): every scheme's custom op must hold there,
    in one model whose layers are whitened-svd (base_delta without a base), rs (sparse_lowrank) and rfid
    (basis_residual, with its cached residual index table)."""
    assert [layer["scheme"] for layer in _layers(models["every-scheme"])] == ["base_delta", "sparse_lowrank",
                                                                              "basis_residual"]
    assert_same(outputs(engines["every-scheme"]), reference(models["every-scheme"]))


@pytest.mark.parametrize("variant", list(BASIS_RESIDUAL_VARIANTS))
def test_basis_residual_variants_equal_reference(variant, models, engines):
    assert_same(outputs(engines[variant]), reference(models[variant]))


def test_quantization_method_comes_from_config(engines):
    """No job names a quantization method: vLLM reads it from config.json (and leaves a plain checkpoint alone)."""
    assert {name: result.get("quantization") for name, result in engines.items()} == {
        name: None if name == "deepseek-dense" else "moe_compress" for name in engines}


def test_tensor_parallel_2_equals_reference(models):
    """Compressed factors sharded on the intermediate dimension: TP=2 on the CPU backend (one core per rank)."""
    (tp2,) = run_vllm([job(models["mixtral"], eager=True, tp=2)],
                      env={"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    assert_same(outputs(tp2), reference(models["mixtral"]))


def _layers(model: Path) -> list[dict]:
    layers = json.loads((model / "config.json").read_text())["quantization_config"]["layers"]
    return [layers[key] for key in sorted(layers, key=int)]
