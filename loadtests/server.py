"""One `vllm serve DIR` on 127.0.0.1 for a load test: start, wait until ready, sample its memory, stop.

The server runs in its own session (process group), so Ctrl-C in the terminal reaches only the runner, which
then stops the server itself; stopping sends SIGTERM to the whole group (API server, engine core, workers),
waits, then SIGKILLs the group and any process of the tree still alive. Memory is the RSS summed over the
server's process tree (psutil), sampled by a background thread: pages shared between those processes (the
torch libraries) count once per process, so the figure is an upper bound, but its growth over time is what a
soak watches.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import psutil

STOP_TIMEOUT_S = 30.0
IN_FLIGHT_METRIC = re.compile(r"vllm:num_requests_(running|waiting)[{ ]")
"""The Prometheus samples of the requests an engine runs or queues (not ``..._waiting_by_reason``)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_bytes(process: psutil.Process) -> int:
    """RSS of ``process`` and all its descendants (processes that vanish meanwhile count 0)."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class RssSampler(threading.Thread):
    """Samples tree_rss_bytes every ``interval_s``; ``samples`` holds (epoch seconds, bytes)."""

    def __init__(self, pid: int, interval_s: float):
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.samples.append((time.time(), tree_rss_bytes(self.process)))
            except psutil.Error:
                return
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()

    def window(self, start: float, end: float) -> list[tuple[float, int]]:
        """Samples taken between epoch seconds ``start`` and ``end``."""
        return [(t, rss) for t, rss in list(self.samples) if start <= t <= end]


class VllmServer:
    """`vllm serve MODEL_DIR` for one model; use as a context manager (stops on exit, also on errors)."""

    def __init__(self, model_dir: Path, served_name: str, log_path: Path, *, port: int = 0, kv_cache_gib: float = 1,
                 max_model_len: int = 1024, extra_args: Sequence[str] = (), rss_interval_s: float = 1.0):
        self.model_dir = Path(model_dir)
        self.served_name = served_name
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.command = ["vllm", "serve", str(self.model_dir), "--host", "127.0.0.1", "--port", str(self.port),
                        "--served-model-name", served_name, "--max-model-len", str(max_model_len), *extra_args]
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib:g}", "HF_HUB_OFFLINE": "1",
                    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                    # the `vllm` script of this interpreter's environment, not another one on PATH
                    "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
        self.rss_interval_s = rss_interval_s
        self.process: subprocess.Popen | None = None
        self.rss: RssSampler | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        self.rss = RssSampler(self.process.pid, self.rss_interval_s)
        self.rss.start()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float) -> None:
        """Return once /health answers 200 and /v1/models lists the served name; raise if the server dies or
        ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"`{' '.join(self.command)}` exited with {self.process.returncode} before "
                                   f"serving; log {self.log_path}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"`{' '.join(self.command)}` not ready after {timeout_s:.0f} s; log "
                                   f"{self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as health:
                    healthy = health.status == 200
                with urllib.request.urlopen(f"{self.base_url}/v1/models", timeout=5) as models:
                    names = [m["id"] for m in json.load(models)["data"]]
                if healthy and self.served_name in names:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError, KeyError):
                pass
            time.sleep(1.0)

    def warm_up(self, timeout_s: float = 300.0) -> None:
        """One short completion, so first-request costs do not land in the first measured cell."""
        body = json.dumps({"model": self.served_name, "prompt": "Hello", "max_tokens": 4}).encode()
        request = urllib.request.Request(f"{self.base_url}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            json.load(answer)

    def requests_in_flight(self) -> int:
        """Requests the engine is running or holding in its queue, from the server's Prometheus ``/metrics``
        (``vllm:num_requests_running`` + ``vllm:num_requests_waiting``)."""
        with urllib.request.urlopen(f"{self.base_url}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        return round(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if IN_FLIGHT_METRIC.match(line)))

    def wait_idle(self, timeout_s: float) -> float:
        """Wait until the engine holds no request: Locust stops its users at the end of a cell, but the server
        finishes (or only slowly aborts) what they had sent, which would otherwise share the CPU with the next
        cell. Returns the seconds waited; raises if the server dies or is still busy after ``timeout_s``."""
        start = time.monotonic()
        while (busy := self.requests_in_flight()) > 0:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server of {self.served_name} died; log {self.log_path}:\n{self.log_tail()}")
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"the server of {self.served_name} still holds {busy} requests {timeout_s:.0f} s "
                                   f"after the previous cell ended; log {self.log_path}")
            time.sleep(1.0)
        return time.monotonic() - start

    def stop(self) -> None:
        """Stop the RSS sampler and the whole server (stop_process_group)."""
        if self.rss is not None:
            self.rss.stop()
        if self.process is not None:
            stop_process_group(self.process)

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_process_group(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group led by ``process`` (started with start_new_session=True), wait up to
    ``timeout_s`` for the whole tree, then SIGKILL the group and whatever of the tree is left."""
    try:
        leader = psutil.Process(process.pid)
        tree = [leader, *leader.children(recursive=True)]
    except psutil.Error:
        tree = []
    _signal_group(process.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=timeout_s)
    _signal_group(process.pid, signal.SIGKILL)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    process.wait(timeout=30)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
