"""Only safetensors and JSON are read: nothing is ever unpickled.

Two checks: a static one (no module of offline/, vllm_moe_compress/ or kernels/ imports a pickle-based
loader or calls ``torch.load``), and a dynamic one (compressing, loading with the reference loader and
loading through the plugin path all succeed while every unpickling entry point raises).
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch

from vllm_moe_compress.offline.compress import CalibrationOptions, build_method, compress_checkpoint
from vllm_moe_compress.offline.loading import load_compressed_model

from conftest import CALIBRATION_FILE, REPO
from test_broken_checkpoints import plugin_load

PACKAGES = ("offline", "vllm_moe_compress", "kernels")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
FORBIDDEN_CALLS = {("torch", "load"), ("torch.serialization", "load"), ("torch.jit", "load"), ("numpy", "load"),
                   ("np", "load")}


def dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        owner = dotted(node.value)
        return f"{owner}.{node.attr}" if owner else None
    return None


def unpickling_uses(path: Path) -> list[str]:
    """``file:line what`` for every pickle-module import and forbidden loader call in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
            if node.module in ("torch", "torch.serialization") and any(a.name == "load" for a in node.names):
                found.append(f"{path}:{node.lineno} from {node.module} import load")
        found += [f"{path}:{node.lineno} import {m}" for m in modules if m.split(".")[0] in PICKLE_MODULES]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = dotted(node.func.value)
            if (owner, node.func.attr) in FORBIDDEN_CALLS:
                found.append(f"{path}:{node.lineno} {owner}.{node.func.attr}()")
    return found


def test_scanner_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import pickle\nimport torch\nfrom torch import load\nx = torch.load('a.bin')\n")
    assert len(unpickling_uses(sample)) == 3


def test_no_module_unpickles():
    files = [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    assert len(files) > 10
    assert [use for path in files for use in unpickling_uses(path)] == []


@pytest.fixture
def unpickling_forbidden(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"),
                         (torch.serialization, "load")]:
        monkeypatch.setattr(module, name, refuse)


def test_compress_and_load_without_unpickling(tiny_moe, tmp_path, unpickling_forbidden):
    with pytest.raises(AssertionError, match="unpickle"):
        torch.load(tmp_path / "nothing.bin")  # the patch is in force
    out = tmp_path / "out"
    calibration = CalibrationOptions(file=CALIBRATION_FILE, samples=4, seqlen=64, batch_size=4, fisher_samples=2)
    compress_checkpoint(tiny_moe("qwen3_moe"), out, build_method("d2", base_prune=0.2), 0.05, calibration,
                        dtype="float32", progress=False)
    assert load_compressed_model(out) is not None
    plugin_load(out)
