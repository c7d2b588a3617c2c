"""Serve one or more models with vLLM and load them with Locust, alternately, in one run.

    python -m loadtests.run --model ORIGINAL_DIR --model COMPRESSED_DIR --users 1 4 16 --duration 60 --out runs/load

Each model gets its own vllm serve DIR on 127.0.0.1 (a free port unless --port is given). A *cell* is one
headless Locust run (loadtests/locustfile.py) of one model at one user count for --duration seconds. Cells are
measured round-robin: in every round, for every user count, each model in turn (the model order reverses in
odd rounds), so drift of the machine's speed during the run falls on all models alike; a cell starts once every
server has finished the requests the previous cell left in flight (their /metrics). By default all servers
are up at once (an idle vLLM server uses ~1 % of a CPU); --one-server-at-a-time serves one model per round
instead, for machines without memory for all. --warmup-seconds S first runs an unmeasured cell of S seconds
per model and user count on each freshly started server (a server's first batches of a new size are slow:
BENCHMARKS.md §10.7), so the measured rounds see warm servers; its CSVs are kept as csv/<model>_u<users>_r<round>_warmup_*.

Written to --out:

- csv/<model>_u<users>_r<round>_*.csv: Locust's CSVs of every cell (llm rows: latency, ttft, itl; see
  loadtests/locustfile.py); logs/: server and Locust logs;
- summary.json (rewritten atomically after every cell; complete turns true at the end):
  models.<model>.users.<U> holds requests_per_s, output_tokens_per_s, ttft_p50, ttft_p99, latency_p50,
  latency_p99, itl_p50, itl_p99 (seconds), failures, server_peak_rss_bytes and more, as medians over rounds
  (loadtests/summary.py); models.<model> also holds total failures and the peak RSS; ratios divides
  every model by the first (the baseline);
- ratios.md: the same comparison as a Markdown table (also printed); throughput_latency.png.

--soak is meant for one long cell at steady users: it adds --bad-users malformed-request users
(default 1, on top of --users, kept out of the good users' metrics), and records the server's RSS and the
failures over time (soak in summary.json, soak.png), with the RSS growth after the warm-up, the first
--warmup-fraction of the run (default 10 %).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from loadtests import plots
from vllm_moe_compress.offline.output_safety import check_result_file
from loadtests.server import VllmServer, stop_process_group
from loadtests.summary import (cell_metrics, combine_rounds, failure_series, ratio_table, ratios, rss_growth,
                               write_json_atomic, write_text_atomic)
from loadtests.workload import WORKLOAD_OPTIONS, Workload, add_workload_options

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")


@dataclass(frozen=True)
class Cell:
    round: int
    users: int
    model: str
    warmup: bool = False
    """An unmeasured cell run before ``round``'s cells (--warmup-seconds): left out of every metric."""

    @property
    def name(self) -> str:
        return f"{self.model}_u{self.users}_r{self.round}" + ("_warmup" if self.warmup else "")


def model_labels(model_dirs: list[Path]) -> list[str]:
    """Short unique names (directory names, made safe for files and URLs) for the models, in order."""
    labels: list[str] = []
    for path in model_dirs:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path).resolve().name) or "model"
        label, n = base, 2
        while label in labels:
            label, n = f"{base}-{n}", n + 1
        labels.append(label)
    return labels


def schedule(labels: list[str], users: list[int], rounds: int, one_server_at_a_time: bool,
             warmup: bool = False) -> list[Cell]:
    """The order cells run in: round by round; within a round, models alternate per user count (or, with
    one server at a time, each model runs all its user counts in turn). Odd rounds reverse the model order.
    ``warmup``: an unmeasured cell per model and user count after every server start — before round 0 when all
    servers are up at once, before each model's cells of every round when one server runs at a time."""
    cells = []
    if warmup and not one_server_at_a_time:
        cells += [Cell(0, u, m, warmup=True) for u in users for m in labels]
    for r in range(rounds):
        order = labels if r % 2 == 0 else labels[::-1]
        if one_server_at_a_time:
            cells += [Cell(r, u, m, warmup=w) for m in order for w in ([True, False] if warmup else [False])
                      for u in users]
        else:
            cells += [Cell(r, u, m) for u in users for m in order]
    return cells


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", dest="models", action="append", type=Path, required=True, metavar="DIR",
                        help="model directory to serve; repeat for more models; the first is the baseline")
    parser.add_argument("--users", type=int, nargs="+", default=[1], metavar="U",
                        help="concurrent users (closed loop), one cell per value (default 1)")
    parser.add_argument("--duration", type=int, required=True, metavar="SECONDS", help="Locust run time per cell")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT_DIR", help="where results go")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over all cells; metrics are medians (1)")
    parser.add_argument("--warmup-seconds", type=int, default=0, metavar="SECONDS",
                        help="an unmeasured cell of this length per model and user count on each freshly started "
                             "server, before its measured cells (0: none)")
    server = parser.add_argument_group("server")
    server.add_argument("--port", type=int, default=0,
                        help="port of the first model's server, +1 per further model (default: free ports)")
    server.add_argument("--kv-cache-gib", type=float, default=1.0, help="VLLM_CPU_KVCACHE_SPACE per server (1)")
    server.add_argument("--max-model-len", type=int, default=1024, help="context length of every server (1024)")
    server.add_argument("--enforce-eager", action="store_true", help="pass --enforce-eager (faster start-up)")
    server.add_argument("--server-arg", dest="server_args", action="append", default=[], metavar="ARG",
                        help="extra argument for vllm serve, e.g. --server-arg=--dtype=float32 (repeatable)")
    server.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for a server (900)")
    server.add_argument("--one-server-at-a-time", action="store_true",
                        help="serve one model at a time (per round) instead of all at once")
    server.add_argument("--rss-interval", type=float, default=1.0, help="seconds between RSS samples (1)")
    add_workload_options(parser.add_argument_group("requests (see loadtests/locustfile.py)"))
    soak = parser.add_argument_group("soak")
    soak.add_argument("--soak", action="store_true", help="record RSS and failures over time, add bad-request users")
    soak.add_argument("--bad-users", type=int, default=None,
                      help="malformed-request users on top of --users (default 1 with --soak, else 0)")
    soak.add_argument("--warmup-fraction", type=float, default=0.1,
                      help="share of a soak cell counted as warm-up for the RSS growth (0.1)")
    args = parser.parse_args(argv)
    for path in args.models:
        if not (path / "config.json").is_file():
            parser.error(f"--model {path}: no config.json there")
    if min(args.users) < 1 or args.duration < 1 or args.rounds < 1:
        parser.error("--users, --duration and --rounds must be at least 1")
    if args.warmup_seconds < 0:
        parser.error("--warmup-seconds must be at least 0")
    try:
        Workload.from_options(args, tokenizer_dir=None)
    except (OSError, ValueError) as error:
        parser.error(f"request options: {error}")
    if not 0 < args.warmup_fraction < 1:
        parser.error("--warmup-fraction must lie strictly between 0 and 1")
    try:  # results are written under fixed names: replace only a previous load test's
        check_result_file(args.out / "summary.json", "--out", "a previous load-test summary",
                          lambda d: "models" in d and "ratios" in d)
    except ValueError as error:
        parser.error(str(error))
    if (args.out / "ratios.md").exists() and not (args.out / "summary.json").exists():
        parser.error(f"--out {args.out} holds a ratios.md that no load test wrote (no summary.json): choose another --out")
    if args.bad_users is None:
        args.bad_users = 1 if args.soak else 0
    if args.bad_users < 0:
        parser.error("--bad-users must be at least 0")
    return args


class LoadTest:
    """The servers, the cells and the summary of one run; ``run()`` measures every cell."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        self.args = args
        self.command = "python -m loadtests.run " + shlex.join(argv)
        self.labels = model_labels(args.models)
        self.paths = dict(zip(self.labels, args.models))
        self.cells = schedule(self.labels, args.users, args.rounds, args.one_server_at_a_time,
                              warmup=args.warmup_seconds > 0)
        self.results: dict[Cell, dict] = {}
        self.soak: dict[str, dict] = {}
        self.servers: dict[str, VllmServer] = {}
        self.locust: subprocess.Popen | None = None
        for sub in ("csv", "logs"):
            (args.out / sub).mkdir(parents=True, exist_ok=True)

    def run(self) -> dict:
        try:
            if not self.args.one_server_at_a_time:
                self._start(self.labels)
            for i, cell in enumerate(self.cells):
                if cell.model not in self.servers:
                    self._stop_servers()
                    self._start([cell.model])
                what = "warm-up, not measured" if cell.warmup else f"round {cell.round}"
                waited = sum(server.wait_idle(self.args.ready_timeout) for server in self.servers.values())
                drained = f" (after {waited:.0f} s for earlier requests to finish)" if waited >= 1 else ""
                tqdm.write(f"[{i + 1}/{len(self.cells)}] {cell.model}: {cell.users} users, {what}{drained}")
                metrics = self._measure(cell)
                if not cell.warmup:
                    self.results[cell] = metrics
                    self._write_summary(complete=False)
        finally:
            if self.locust is not None and self.locust.poll() is None:
                stop_process_group(self.locust)
            self._stop_servers()
        return self._write_summary(complete=True)

    def _start(self, labels: list[str]) -> None:
        args = self.args
        extra = [*(["--enforce-eager"] if args.enforce_eager else []), *args.server_args]
        for label in labels:
            port = args.port + self.labels.index(label) if args.port else 0
            server = VllmServer(self.paths[label], label, args.out / "logs" / f"{label}-server.log", port=port,
                                kv_cache_gib=args.kv_cache_gib, max_model_len=args.max_model_len,
                                extra_args=extra, rss_interval_s=args.rss_interval)
            self.servers[label] = server
            server.start()
            tqdm.write(f"starting {shlex.join(server.command)}")
        for label in labels:
            start = time.monotonic()
            self.servers[label].wait_ready(args.ready_timeout)
            self.servers[label].warm_up()
            tqdm.write(f"{label} ready at {self.servers[label].base_url} ({time.monotonic() - start:.0f} s)")

    def _stop_servers(self) -> None:
        while self.servers:
            _, server = self.servers.popitem()
            server.stop()

    def _duration(self, cell: Cell) -> int:
        return self.args.warmup_seconds if cell.warmup else self.args.duration

    def _locust_command(self, cell: Cell, server: VllmServer) -> list[str]:
        args = self.args
        total = cell.users + args.bad_users
        return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--users", str(total),
                "--spawn-rate", str(total), "--run-time", f"{self._duration(cell)}s", "--host", server.base_url,
                "--csv", str(args.out / "csv" / cell.name), "--csv-full-history", "--exit-code-on-error", "0",
                "--only-summary", "--model-name", server.served_name, "--tokenizer", str(server.model_dir),
                "--max-model-len", str(args.max_model_len), "--bad-users", str(max(1, args.bad_users)),
                *(f"--{name.replace('_', '-')}={getattr(args, name)}" for name in WORKLOAD_OPTIONS),
                "OpenAIUser", *(["BadRequestUser"] if args.bad_users else [])]

    def _measure(self, cell: Cell) -> dict:
        """Run Locust for one cell, showing elapsed time and server RSS; return the cell's metrics."""
        args, server, duration = self.args, self.servers[cell.model], self._duration(cell)
        if server.process.poll() is not None:
            raise RuntimeError(f"the server of {cell.model} died; log {server.log_path}:\n{server.log_tail()}")
        log_path = args.out / "logs" / f"{cell.name}-locust.log"
        start = time.time()
        with open(log_path, "wb") as log:
            self.locust = subprocess.Popen(self._locust_command(cell, server), stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
        with tqdm(total=duration, desc=f"{cell.model} u={cell.users}", leave=False,
                  bar_format="{desc}: {n}/{total} s |{bar}| {postfix}") as bar:
            while self.locust.poll() is None:
                time.sleep(1.0)
                elapsed = int(time.time() - start)
                bar.n = min(duration, elapsed)
                rss = f"server RSS {_latest_rss(server) / 2**20:.0f} MiB"
                over = elapsed - duration
                bar.set_postfix_str(rss if over < 0 else f"{rss}; load done, Locust stopping and writing its CSVs "
                                    f"(+{over} s)")
        end = time.time()
        if self.locust.returncode != 0:
            raise RuntimeError(f"locust exited with {self.locust.returncode}; log {log_path}:\n"
                               f"{log_path.read_text(errors='replace')[-4000:]}")
        samples = server.rss.window(start, end) or server.rss.samples[-1:]
        metrics = cell_metrics(args.out / "csv" / f"{cell.name}_stats.csv", max(rss for _, rss in samples))
        tqdm.write(f"  {metrics['output_tokens_per_s']:.1f} output tok/s, {metrics['requests']} requests, "
                   f"latency p50 {_seconds(metrics['latency_p50'])}, TTFT p50 {_seconds(metrics['ttft_p50'])}, "
                   f"{metrics['failures']} failures, "
                   + (f"bad requests {metrics['bad_requests']} ({metrics['bad_request_failures']} failed), "
                      if args.soak else "")
                   + f"peak RSS {metrics['server_peak_rss_bytes'] / 2**20:.0f} MiB")
        if args.soak and not cell.warmup:
            self.soak[f"{cell.model} u{cell.users} r{cell.round}"] = self._soak_record(cell, samples, metrics)
        return metrics

    def _soak_record(self, cell: Cell, samples: list[tuple[float, int]], metrics: dict) -> dict:
        """RSS and failures over time, in seconds since Locust started the load (its ``_run.json``)."""
        prefix = self.args.out / "csv" / cell.name
        load_start = json.loads(Path(f"{prefix}_run.json").read_text())["start_epoch_s"]
        series = [(t - load_start, rss) for t, rss in samples if t >= load_start]
        return {"model": cell.model, "users": cell.users, "round": cell.round,
                **rss_growth(series, self.args.duration, self.args.warmup_fraction),
                "failures": metrics["failures"], "bad_requests": metrics["bad_requests"],
                "bad_request_failures": metrics["bad_request_failures"], "rss_series": series,
                "failure_series": failure_series(Path(f"{prefix}_stats_history.csv"), load_start)}

    def _write_summary(self, complete: bool) -> dict:
        args, out = self.args, self.args.out
        rounds: dict[tuple[str, int], list[dict]] = {}
        for cell, metrics in self.results.items():
            rounds.setdefault((cell.model, cell.users), []).append(metrics)
        models = {}
        for label in self.labels:
            by_users = {str(u): combine_rounds(rounds[label, u]) for u in args.users if (label, u) in rounds}
            models[label] = {"path": str(self.paths[label]), "users": by_users,
                             "failures": sum(m["failures"] for m in by_users.values()),
                             "server_peak_rss_bytes": max((m["server_peak_rss_bytes"] for m in by_users.values()),
                                                          default=None)}
        baseline = self.labels[0]
        summary = {
            "complete": complete, "command": self.command, "cpus": os.cpu_count(), "platform": platform.platform(),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "models"}
            | {"models": [str(m) for m in args.models]},
            "baseline": baseline, "models": models, "ratios": ratios(models, baseline),
        }
        if args.soak:
            summary["soak"] = self.soak
        write_json_atomic(out / "summary.json", summary)
        if complete and self.results:
            table = ratio_table(models, baseline)
            write_text_atomic(out / "ratios.md", table)
            plots.plot_concurrency(models, out / "throughput_latency.png")
            if self.soak:
                plots.plot_soak(self.soak, out / "soak.png")
            print(f"\nbaseline: {baseline}; each value (ratio to the baseline)\n\n{table}\n{out / 'summary.json'}")
        return summary


def _latest_rss(server: VllmServer) -> int:
    samples = server.rss.samples
    return samples[-1][1] if samples else 0


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: a backgrounded shell job starts with it ignored
        signal.signal(sig, _interrupt)
    try:
        summary = LoadTest(args, argv).run()
    except KeyboardInterrupt:
        print("interrupted: servers stopped; summary.json holds the cells measured so far", file=sys.stderr)
        return 130
    cells = [cell for model in summary["models"].values() for cell in model["users"].values()]
    return 0 if all(c["failures"] == 0 and c["bad_request_failures"] == 0 for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
