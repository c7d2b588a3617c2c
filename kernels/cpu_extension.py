"""The C++ CPU MoE ops (``kernels/csrc/lowrank_moe_cpu.cpp``), compiled at first use and cached.

``torch.utils.cpp_extension.load`` builds the source with the machine's C++ compiler (g++, which vLLM's CPU
backend already needs for its compiled mode) into ``$MOE_COMPRESS_CPU_BUILD`` (default
``~/.cache/vllm_moe_compress/cpu-<torch version>``), once per source change; later processes load the cached
library (~0.1 s). Concurrent first builds (vLLM's worker processes, parallel tests) wait on torch's build
lock. The ops register as ``torch.ops.moe_compress_cpu.*``.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "lowrank_moe_cpu.cpp"


def build_directory() -> Path:
    default = Path.home() / ".cache" / "vllm_moe_compress" / f"cpu-{torch.__version__}"
    path = Path(os.environ.get("MOE_COMPRESS_CPU_BUILD", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def cpu_ops():
    """``torch.ops.moe_compress_cpu``, building the extension first if this machine has no cached build."""
    from torch.utils.cpp_extension import load

    load(name="moe_compress_cpu", sources=[str(SOURCE)], extra_cflags=["-O2"], is_python_module=False,
         build_directory=str(build_directory()), verbose=False)
    return torch.ops.moe_compress_cpu


@functools.cache
def available() -> bool:
    """Whether the ops build (or load) here; if not (no C++ compiler, no ninja), say why once: the plugin then
    keeps the torch paths for its CPU layers."""
    try:
        cpu_ops()
    except (OSError, RuntimeError, ImportError) as err:  # what cpp_extension raises for a missing/failed toolchain
        logger.warning("moe_compress: the C++ CPU MoE ops could not be built (%s); CPU layers use the slower "
                       "torch path", err)
        return False
    return True
