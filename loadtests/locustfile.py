"""Locust users for vLLM's OpenAI-compatible server.

    locust -f loadtests/locustfile.py --headless -u 4 -r 4 -t 60s --host http://127.0.0.1:8000 \
        --model-name NAME --tokenizer MODEL_DIR OpenAIUser [BadRequestUser --bad-users 1]

``python -m loadtests.run`` starts the server and runs this file for you.

``OpenAIUser`` sends requests back to back (a closed loop: concurrency = users) through the ``openai`` client:
completions and chat completions, streamed or not, with prompt and output lengths drawn from the
distributions given on the command line (loadtests/workload.py) and a generator seeded per user from
``--seed``. Every request is recorded as Locust events of type ``llm`` (loadtests/summary.py reads them back
from Locust's CSVs):

- ``latency``: end-to-end time, from sending to the last byte; its content size is the number of output tokens
  (from the answer's ``usage``). A request that raises, or returns another number of tokens than
  ``max_tokens``, is a failure of this row.
- ``ttft``: time to the first chunk that carries text (streamed requests only: a non-streamed answer arrives
  all at once).
- ``itl``: inter-token latency of one streamed request, (latency - ttft) / (output tokens - 1), the mean gap
  between tokens after the first (vLLM's benchmark calls this TPOT).

``BadRequestUser`` (the soak's) sends, every 1-3 s, one of three malformed requests (invalid JSON,
``max_tokens`` beyond the context, an unknown model name). A 4xx answer is a success, anything else a failure;
its rows are named ``bad-request: ...`` and never mix with the ``llm`` rows.

Locust buckets response times to 2 significant digits; here they are kept to 3 (below 1 s: exact ms).
"""

from __future__ import annotations

import csv
import itertools
import random
import sys
import time
from pathlib import Path

import gevent
import httpx2  # the HTTP client package the openai SDK is built on
import locust.stats
import openai
from locust import HttpUser, User, between, events, task

# `locust -f loadtests/locustfile.py` puts loadtests/ on sys.path, not the repository root above it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.summary import (BAD_REQUEST_PREFIX, ITL, LATENCY, METRIC_TYPE, TTFT, atomic_path,  # noqa: E402
                               bucket_three_digits, write_json_atomic)
from loadtests.workload import Request, Workload, add_workload_options  # noqa: E402

CLIENT_KEEPALIVE_S = 1.0
"""Client-side expiry of idle connections, below vLLM's 5 s server keep-alive (VLLM_HTTP_TIMEOUT_KEEP_ALIVE):
with both at 5 s, a reused connection can meet the server's close and fail with 'Connection error.'."""


locust.stats.bucket_response_time = bucket_three_digits


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument("--model-name", default="", help="served model name (default: the server's first model)")
    parser.add_argument("--tokenizer", default="", help="model directory whose tokenizer.json measures prompt "
                        "lengths in tokens (default: lengths in words)")
    add_workload_options(parser)
    parser.add_argument("--max-model-len", type=int, default=1024, help="the server's context length")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request fails")
    parser.add_argument("--bad-users", type=int, default=1, help="how many BadRequestUser to run when selected")


@events.init.add_listener
def _on_init(environment, **_kwargs) -> None:
    options = environment.parsed_options
    OpenAIUser.workload = Workload.from_options(options, Path(options.tokenizer) if options.tokenizer else None)
    BadRequestUser.fixed_count = max(1, options.bad_users)
    # gevent's loop clock stands still until the loop first runs: after slow imports and tokenizing, --run-time's
    # timer (started next, relative to that clock) would fire seconds early.
    gevent.get_hub().loop.update_now()
    if options.csv_prefix:
        environment.events.quit.add_listener(lambda **_: _write_final_stats_csv(environment, options.csv_prefix))


def _write_final_stats_csv(environment, csv_prefix: str) -> None:
    """Rewrite ``<prefix>_stats.csv`` from the final stats (Locust's writer stops up to 1 s before the end), and
    write ``<prefix>_run.json`` with the epoch second the load started (Locust's start up can take seconds)."""
    with atomic_path(Path(f"{csv_prefix}_stats.csv")) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        locust.stats.StatsCSV(environment, locust.stats.PERCENTILES_TO_REPORT).requests_csv(csv.writer(f))
    write_json_atomic(Path(f"{csv_prefix}_run.json"), {"start_epoch_s": environment.stats.start_time})


class WrongLength(Exception):
    """The server returned another number of tokens than asked for (with ignore_eos it must not)."""


class OpenAIUser(User):
    """Back-to-back OpenAI requests drawn from the workload; records latency, TTFT, ITL and output tokens."""

    workload: Workload
    _user_numbers = itertools.count()

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.rng = random.Random(options.seed * 1_000_003 + next(self._user_numbers))
        # No retries (a failure must count), and idle connections expire on the client before the server's
        # keep-alive timeout closes them, so a request never races a closing socket.
        http_client = openai.DefaultHttpxClient(limits=httpx2.Limits(
            max_connections=1000, max_keepalive_connections=100, keepalive_expiry=CLIENT_KEEPALIVE_S))
        self.client = openai.OpenAI(base_url=f"{self.host.rstrip('/')}/v1", api_key="unused", max_retries=0,
                                    timeout=options.request_timeout, http_client=http_client)
        self.model = options.model_name or self.client.models.list().data[0].id

    def on_stop(self) -> None:
        self.client.close()

    @task
    def send(self) -> None:
        request = self.workload.draw(self.rng)
        start = time.perf_counter()
        try:
            first_text_s, tokens = self._send(request, start)
            if tokens != request.max_tokens:
                raise WrongLength(f"{request.kind}: asked for {request.max_tokens} tokens, got {tokens}")
        except Exception as error:  # noqa: BLE001 - every failed request is counted, whatever raised
            self._record(LATENCY, time.perf_counter() - start, 0, error)
            return
        latency = time.perf_counter() - start
        self._record(LATENCY, latency, tokens)
        if first_text_s is not None:
            self._record(TTFT, first_text_s, 0)
            if tokens > 1:
                self._record(ITL, (latency - first_text_s) / (tokens - 1), 0)

    def _send(self, request: Request, start: float) -> tuple[float | None, int]:
        """Send ``request``; return (seconds to the first text chunk or None, output tokens)."""
        common = dict(model=self.model, max_tokens=request.max_tokens, temperature=0.0, stream=request.stream,
                      extra_body={"ignore_eos": True})
        if request.stream:
            common["stream_options"] = {"include_usage": True}
        if request.chat:
            answer = self.client.chat.completions.create(messages=[{"role": "user", "content": request.prompt}],
                                                         **common)
        else:
            answer = self.client.completions.create(prompt=request.prompt, **common)
        if not request.stream:
            return None, answer.usage.completion_tokens
        first_text_s, tokens = None, 0
        for chunk in answer:
            if chunk.choices and first_text_s is None:
                text = chunk.choices[0].delta.content if request.chat else chunk.choices[0].text
                if text:
                    first_text_s = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return first_text_s, tokens

    def _record(self, name: str, seconds: float, output_tokens: int, error: Exception | None = None) -> None:
        self.environment.events.request.fire(request_type=METRIC_TYPE, name=name, response_time=seconds * 1000.0,
                                             response_length=output_tokens, exception=error, context={})


class BadRequestUser(HttpUser):
    """Malformed requests that must get a 4xx answer without disturbing the other users."""

    fixed_count = 1
    wait_time = between(1, 3)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.model = options.model_name or self.client.get("/v1/models").json()["data"][0]["id"]
        self.max_model_len = options.max_model_len

    @task
    def invalid_json(self) -> None:
        self._expect_4xx("invalid JSON", data='{"model": "unterminated', headers={"Content-Type": "application/json"})

    @task
    def max_tokens_beyond_context(self) -> None:
        self._expect_4xx("max_tokens beyond the context",
                         json={"model": self.model, "prompt": "Hello", "max_tokens": self.max_model_len + 1})

    @task
    def unknown_model(self) -> None:
        self._expect_4xx("unknown model", json={"model": f"{self.model}-does-not-exist", "prompt": "Hello",
                                                "max_tokens": 4})

    def _expect_4xx(self, what: str, headers: dict | None = None, **body) -> None:
        # A fresh connection per request: a kept-alive connection the server closed while this user waited would
        # fail on the client side and be mistaken for the server mishandling the request.
        headers = {**(headers or {}), "Connection": "close"}
        with self.client.post("/v1/completions", name=f"{BAD_REQUEST_PREFIX}: {what}", catch_response=True,
                              headers=headers, **body) as response:
            if 400 <= response.status_code < 500:
                response.success()
            else:
                response.failure(f"expected a 4xx answer, got {response.status_code} ({response.error or 'no error'})")
