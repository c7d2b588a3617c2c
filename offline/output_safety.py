"""Where ``moe-compress compress`` may write: never over its input, never over a directory it did not write.

The rule behind every check: nothing outside what the command itself created is ever removed. So

- the output may not be the input model directory, contain it, or lie inside it (paths are compared after
  resolving symlinks, so ``-o link-to-model`` is caught like ``-o model``);
- an existing output path must be a directory, and ``--overwrite`` replaces it only if it is empty or is
  recognisably a previous ``moe-compress`` output (its config.json has
  ``quantization_config.quant_method == "moe_compress"``). There is deliberately no flag to replace any other
  directory: deleting a directory the tool did not write is the user's decision, made with ``rm``.

Torch-free, so the checks run before anything is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

QUANT_METHOD = "moe_compress"  # vllm_moe_compress.format.QUANT_METHOD; repeated here so this module imports no torch


class OutputPathError(ValueError):
    """The output path would overwrite the input or a directory this tool did not write."""


def is_previous_output(path: Path) -> bool:
    """True if ``path`` is a directory whose config.json says it is a ``moe_compress`` checkpoint."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def check_replaceable(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing ``out_dir`` unless ``overwrite`` and it is empty or a previous moe-compress output.

    Called before the run starts and again just before the finished output is renamed onto ``out_dir``
    (the directory may have changed in between)."""
    if not os.path.lexists(out_dir):
        return
    if not out_dir.is_dir():
        raise OutputPathError(f"output path {out_dir} exists and is not a directory: choose another -o")
    if not overwrite:
        raise OutputPathError(
            f"output directory {out_dir} already exists (--overwrite replaces it if it is a previous "
            "moe-compress output or empty)")
    if any(out_dir.iterdir()) and not is_previous_output(out_dir):
        raise OutputPathError(
            f"output directory {out_dir} is not empty and not a previous moe-compress output (its config.json has "
            f"no quantization_config.quant_method {QUANT_METHOD!r}), so --overwrite will not delete it: choose "
            "another -o, or remove the directory yourself if you really mean to")


def _first_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_output_path(model_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Every check that can be made on the paths alone, before anything is read or written."""
    model = Path(model_dir).resolve()
    out = Path(out_dir).resolve()
    if out == model:
        raise OutputPathError(f"output directory {out_dir} is the input model directory {model}: choose another -o")
    if model.is_relative_to(out):
        raise OutputPathError(
            f"output directory {out_dir} contains the input model directory {model}: writing there would replace "
            "the input; choose a directory outside it")
    if out.is_relative_to(model):
        raise OutputPathError(
            f"output directory {out_dir} is inside the input model directory {model}: choose a directory outside it")
    check_replaceable(out, overwrite)
    ancestor = _first_existing(out.parent)
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot create output directory {out_dir}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot create output directory {out_dir}: no write permission in {ancestor} "
                              "(or its file system is read-only)")


def check_result_file(path: Path, option: str, what: str, is_previous) -> None:
    """Refuse to replace an existing ``path`` unless ``is_previous(its JSON)`` says this command wrote it.

    For the result files of ``eval-zeroshot --out`` and ``report --out``: checked before the (long) evaluation,
    so a typo in ``--out`` costs nothing."""
    if not os.path.lexists(path):
        return
    if path.is_dir():
        raise OutputPathError(f"{option} {path} is a directory, not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not (isinstance(data, dict) and is_previous(data)):
        raise OutputPathError(f"{path} exists and is not {what}, so it will not be replaced: choose another {option}, "
                              "or remove the file yourself if you really mean to")
