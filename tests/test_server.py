"""`vllm serve` on a compressed checkpoint, end to end through the OpenAI API.

One tiny compressed Qwen3-MoE is served with the documented command line; its greedy completions must
equal vLLM's offline engine on the same checkpoint (computed first, in a subprocess: vLLM is never
imported in the pytest process), streamed answers must equal non-streamed ones, and SIGTERM must stop
the server. `vllm serve DIR` without `--quantization` must pick the method up from config.json, and
checkpoints the plugin cannot serve must stop start-up with a message that names the problem.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import vllm_tiny_config, write_tiny_model
from test_plugin_vllm import compress_for_vllm
from test_vllm_command import _free_port, _kill_group, _server_output

pytestmark = pytest.mark.slow

READY_TIMEOUT_S = 300
EXIT_TIMEOUT_S = 60
FAIL_TIMEOUT_S = 180
MAX_TOKENS = 12
SERVED_NAME = "tiny"
PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,", "1, 2, 3, 4,"]
LONG_SENTENCE = "The small model reads the same sentence again and again. "
LOADER_EXTRA = '{"enable_weights_track": true}'


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The `vllm` script lives next to this interpreter in a virtualenv; make sure it is the one found.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    return env


_OFFLINE_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
model, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = LLM(model=model, quantization="moe_compress", max_model_len=512, dtype="float32", enforce_eager=True,
          model_loader_extra_config={"enable_weights_track": True})
outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))
print("RESULT " + json.dumps([o.outputs[0].text for o in outputs]))
"""


def offline_greedy(model: Path, prompts: list[str], max_tokens: int = MAX_TOKENS) -> list[str]:
    """Greedy texts of vLLM's offline LLM for ``prompts`` (a subprocess: one engine per process)."""
    done = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT, str(model), json.dumps(prompts), str(max_tokens)],
                          capture_output=True, text=True, timeout=600, env=_env(), stdin=subprocess.DEVNULL)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"offline LLM failed ({done.returncode}):\n{done.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


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
    return compress_for_vllm("qwen3_moe", tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def offline_texts(compressed) -> list[str]:
    return offline_greedy(compressed, PROMPTS)


@pytest.fixture(scope="module")
def server(compressed, offline_texts, tmp_path_factory):
    """The compressed model behind the documented command line (with --quantization moe_compress)."""
    port = _free_port()
    cmd = _serve_cmd(compressed, port, "--quantization", "moe_compress", "--served-model-name", SERVED_NAME,
                     "--model-loader-extra-config", LOADER_EXTRA)
    log = tmp_path_factory.mktemp("server-log") / "vllm-serve.log"
    with serving(cmd, port, log) as (proc, base):
        yield _client(base)
        assert_sigterm_exits(proc, log)


def test_serve_without_quantization_flag_reads_config(compressed, offline_texts, tmp_path):
    """`vllm serve DIR`: the method comes from config.json's quantization_config."""
    port = _free_port()
    log = tmp_path / "vllm-serve.log"
    with serving(_serve_cmd(compressed, port), port, log) as (proc, base):
        client = _client(base)
        (model_id,) = [m.id for m in client.models.list().data]
        done = client.completions.create(model=model_id, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
        assert done.choices[0].text == offline_texts[0]
        assert "quantization=moe_compress" in _server_output(log, 10**7)
        assert_sigterm_exits(proc, log)


def _edit_quantization_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _set_scheme(qc: dict) -> None:
    qc["layers"][sorted(qc["layers"])[-1]]["scheme"] = "mystery"


@pytest.mark.parametrize("case", ["uncompressed", "format_version", "scheme"])
def test_startup_failure_names_the_problem(case, compressed, tmp_path):
    extra: tuple[str, ...] = ()
    if case == "uncompressed":
        model = write_tiny_model(vllm_tiny_config("qwen3_moe"), tmp_path / "plain")
        extra = ("--quantization", "moe_compress")
        expected = ("needs a checkpoint written by `moe-compress compress`", "not a moe_compress checkpoint")
    elif case == "format_version":
        model = _edit_quantization_config(compressed, tmp_path / "v99", lambda qc: qc.update(format_version=99))
        expected = ("format_version 99",)
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


def test_completions_equal_offline_engine_and_stream(server, offline_texts):
    assert [m.id for m in server.models.list().data] == [SERVED_NAME]
    for prompt, want in zip(PROMPTS, offline_texts, strict=True):
        done = server.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        text = done.choices[0].text
        assert text == want, f"server and offline engine disagree on {prompt!r}: {text!r} != {want!r}"
        assert done.usage.completion_tokens > 0
        streamed = "".join(c.choices[0].text for c in server.completions.create(
            model=SERVED_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True) if c.choices)
        assert streamed == text


def test_chat_completion_streamed_equals_non_streamed(server):
    messages = [{"role": "user", "content": "Hello! Who are you?"}]
    done = server.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    text = done.choices[0].message.content
    assert text, f"empty chat answer: {done!r}"
    assert done.choices[0].finish_reason in ("length", "stop")
    streamed = "".join(c.choices[0].delta.content or "" for c in server.chat.completions.create(
        model=SERVED_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True) if c.choices)
    assert streamed == text


def test_n2_greedy_choices_equal_n1(server, offline_texts):
    """vLLM 0.32 refuses n > 1 with temperature 0 (SamplingParams._verify_greedy_sampling); the request must
    fail cleanly (400), and n=2 under top_k=1 sampling (greedy by construction) gives the n=1 text twice."""
    import openai

    with pytest.raises(openai.BadRequestError, match="n must be 1 when using greedy sampling"):
        server.completions.create(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, n=2)
    done = server.completions.create(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, n=2,
                                     temperature=1.0, extra_body={"top_k": 1})
    assert sorted(c.index for c in done.choices) == [0, 1]
    assert [c.text for c in done.choices] == [offline_texts[0]] * 2


def test_long_prompt(server):
    prompt = LONG_SENTENCE * 28  # about 14 tokens a sentence: ~390 tokens
    done = server.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=16, temperature=0)
    assert 350 <= done.usage.prompt_tokens <= 512 - 16, done.usage
    assert done.choices[0].finish_reason in ("length", "stop")
    assert done.choices[0].text, f"empty answer to a {done.usage.prompt_tokens}-token prompt"


def test_rs_checkpoint_served_equals_offline_engine(tmp_path):
    """An RS-MoE checkpoint (scheme sparse_lowrank, its own custom op) behind `vllm serve`."""
    model = compress_for_vllm("qwen3_moe", tmp_path, method="rs")
    want = offline_greedy(model, PROMPTS)
    port = _free_port()
    log = tmp_path / "vllm-serve.log"
    cmd = _serve_cmd(model, port, "--quantization", "moe_compress", "--model-loader-extra-config", LOADER_EXTRA)
    with serving(cmd, port, log) as (proc, base):
        client = _client(base)
        (model_id,) = [m.id for m in client.models.list().data]
        got = [client.completions.create(model=model_id, prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
               for p in PROMPTS]
        assert got == want
        assert_sigterm_exits(proc, log)
