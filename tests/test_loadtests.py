"""Load tests (loadtests/): the pure parts, and the runner end to end against a tiny compressed model.

The fast tests never import locust (it monkey-patches the standard library at import); the Locust CSVs they
read are written here with Locust's column layout, so the expected numbers can be worked out by hand.
"""

from __future__ import annotations

import csv
import json
import random
import statistics
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from conftest import REPO, TOKENIZER_DIR
from loadtests.distributions import LengthDistribution
from loadtests.prompts import PromptSource
from loadtests.run import Cell, model_labels, parse_args, schedule
from loadtests.server import VllmServer
from loadtests.summary import (METRIC_KEYS, bucket_three_digits, cell_metrics, combine_rounds, failure_series,
                               ratio_table, ratios, rss_growth)
from loadtests.workload import TEMPLATE_MARGIN, Workload

TEXT = (REPO / "offline" / "data" / "brown-calibration-sample.txt").read_text(encoding="utf-8")


# --- length distributions ---------------------------------------------------------------------------------


def test_fixed_and_uniform_lengths():
    rng = random.Random(0)
    assert {LengthDistribution.parse("fixed:7").sample(rng) for _ in range(20)} == {7}
    uniform = [LengthDistribution.parse("uniform:3:6").sample(rng) for _ in range(2000)]
    assert set(uniform) == {3, 4, 5, 6}


def test_normal_and_lognormal_lengths_match_their_parameters():
    rng = random.Random(1)
    normal = [LengthDistribution.parse("normal:200:20").sample(rng) for _ in range(4000)]
    assert abs(statistics.mean(normal) - 200) < 2 and abs(statistics.stdev(normal) - 20) < 2
    lognormal = [LengthDistribution.parse("lognormal:100:0.5").sample(rng) for _ in range(4000)]
    assert abs(statistics.median(lognormal) - 100) < 5 and min(lognormal) >= 1
    assert min(LengthDistribution.parse("normal:2:50").sample(rng) for _ in range(200)) == 1  # clipped at 1


def test_same_seed_same_lengths():
    dist = LengthDistribution.parse("lognormal:64:1")
    first, second = random.Random(5), random.Random(5)
    assert [dist.sample(first) for _ in range(50)] == [dist.sample(second) for _ in range(50)]


@pytest.mark.parametrize("spec", ["", "fixed", "fixed:0", "fixed:2.5", "uniform:9:3", "uniform:1", "normal:a:b",
                                  "gamma:1:2", "normal:0:1", "lognormal:10:-1"])
def test_bad_length_specs_are_refused(spec):
    with pytest.raises(ValueError, match="bad length distribution"):
        LengthDistribution.parse(spec)


# --- prompts and the workload ------------------------------------------------------------------------------


def test_token_prompts_have_the_drawn_length():
    from tokenizers import Tokenizer

    source = PromptSource.from_files(REPO / "offline" / "data" / "brown-calibration-sample.txt", TOKENIZER_DIR)
    assert source.counts_tokens
    tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    rng = random.Random(0)
    for length in (1, 17, 100, 400):
        got = len(tokenizer.encode(source.prompt(rng, length), add_special_tokens=False).ids)
        assert abs(got - length) <= 3, (length, got)


def test_word_prompts_without_tokenizer(tmp_path):
    source = PromptSource.from_files(REPO / "offline" / "data" / "brown-calibration-sample.txt", tmp_path)
    assert not source.counts_tokens
    assert len(source.prompt(random.Random(0), 25).split()) == 25
    assert len(source.prompt(random.Random(0), 10**9).split()) == len(source)


def _workload(**overrides) -> Workload:
    options = dict(prompts=PromptSource(TEXT), prompt_tokens=LengthDistribution.parse("uniform:50:400"),
                   output_tokens=LengthDistribution.parse("uniform:50:300"), chat_share=0.3, stream_share=0.6,
                   max_model_len=512)
    return Workload(**(options | overrides))


def test_workload_requests_fit_the_context_and_follow_the_shares():
    workload = _workload()
    rng = random.Random(0)
    requests = [workload.draw(rng) for _ in range(2000)]
    assert all(len(r.prompt.split()) + r.max_tokens <= 512 - TEMPLATE_MARGIN for r in requests)
    assert abs(sum(r.chat for r in requests) / 2000 - 0.3) < 0.04
    assert abs(sum(r.stream for r in requests) / 2000 - 0.6) < 0.04
    assert {r.kind for r in requests} == {"completions", "completions-stream", "chat", "chat-stream"}
    again = [workload.draw(random.Random(0)) for _ in range(1)]
    assert again[0] == requests[0]


def test_workload_rejects_bad_shares():
    with pytest.raises(ValueError, match="chat_share"):
        _workload(chat_share=1.5)


# --- summaries from Locust CSVs ------------------------------------------------------------------------------

STATS_COLUMNS = ["Type", "Name", "Request Count", "Failure Count", "Median Response Time", "Average Response Time",
                 "Min Response Time", "Max Response Time", "Average Content Size", "Requests/s", "Failures/s",
                 "50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%"]


def _row(type_, name, count, failures, content, rps, p50, p99):
    values = dict(zip(STATS_COLUMNS, [type_, name, count, failures, p50, p50, p50, p99, content, rps, 0]))
    return values | {p: p50 for p in STATS_COLUMNS[11:]} | {"99%": p99}


def write_stats_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, STATS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_cell_metrics_from_a_locust_csv(tmp_path):
    # 10 latency events (2 failed) at 2 req/s -> 5 s; 8 successes with 400 tokens in all (failures record 0).
    stats = write_stats_csv(tmp_path / "c_stats.csv", [
        _row("POST", "bad-request: unknown model", 3, 1, 150, 0.6, 20, 25),
        _row("POST", "bad-request: invalid JSON", 2, 0, 90, 0.4, 10, 12),
        _row("llm", "itl", 4, 0, 0, 0.8, 12, 30),
        _row("llm", "latency", 10, 2, 40.0, 2.0, 1500, 4200),
        _row("llm", "ttft", 4, 0, 0, 0.8, 250, 900),
        _row("", "Aggregated", 23, 3, 20, 4.6, 100, 4200),
    ])
    metrics = cell_metrics(stats, server_peak_rss_bytes=123)
    assert set(metrics) == set(METRIC_KEYS)
    assert metrics["requests_per_s"] == pytest.approx(8 / 5)
    assert metrics["output_tokens_per_s"] == pytest.approx(400 / 5)
    assert (metrics["requests"], metrics["output_tokens"], metrics["failures"]) == (8, 400, 2)
    assert (metrics["bad_requests"], metrics["bad_request_failures"]) == (5, 1)
    assert (metrics["latency_p50"], metrics["latency_p99"]) == (1.5, 4.2)
    assert (metrics["ttft_p50"], metrics["ttft_p99"]) == (0.25, 0.9)
    assert (metrics["itl_p50"], metrics["itl_p99"]) == (0.012, 0.03)
    assert metrics["server_peak_rss_bytes"] == 123


def test_cell_metrics_without_streamed_requests(tmp_path):
    stats = write_stats_csv(tmp_path / "c_stats.csv", [_row("llm", "latency", 4, 0, 10, 1.0, 800, 900)])
    metrics = cell_metrics(stats, 0)
    assert metrics["ttft_p50"] is None and metrics["itl_p99"] is None
    assert metrics["bad_requests"] == 0 and metrics["output_tokens_per_s"] == pytest.approx(10.0)


def _cell(rate, p50, failures=0, rss=100):
    return {"requests_per_s": rate, "output_tokens_per_s": 10 * rate, "ttft_p50": p50, "ttft_p99": None,
            "latency_p50": p50, "latency_p99": 2 * p50, "itl_p50": None, "itl_p99": None, "requests": 5,
            "output_tokens": 50, "failures": failures, "bad_requests": 1, "bad_request_failures": 0,
            "server_peak_rss_bytes": rss}


def test_rounds_combine_by_median_sum_and_peak():
    combined = combine_rounds([_cell(1.0, 3.0, 1, 100), _cell(5.0, 1.0, 0, 300), _cell(2.0, 2.0, 2, 200)])
    assert combined["requests_per_s"] == 2.0 and combined["latency_p50"] == 2.0 and combined["ttft_p99"] is None
    assert (combined["failures"], combined["requests"], combined["server_peak_rss_bytes"]) == (3, 15, 300)
    assert len(combined["rounds"]) == 3


def test_ratio_table_compares_every_model_to_the_baseline():
    models = {"dense": {"users": {"1": _cell(2.0, 1.0), "4": _cell(4.0, 2.0)}},
              "d2-40": {"users": {"1": _cell(1.0, 4.0), "4": _cell(8.0, 1.0)}}}
    table = ratios(models, "dense")
    assert table["dense"]["4"]["output_tokens_per_s"] == 1.0
    assert table["d2-40"]["1"]["output_tokens_per_s"] == 0.5 and table["d2-40"]["1"]["latency_p50"] == 4.0
    assert table["d2-40"]["4"]["requests_per_s"] == 2.0 and table["d2-40"]["4"]["ttft_p99"] is None
    markdown = ratio_table(models, "dense").splitlines()
    assert markdown[0].startswith("| model | users | output tok/s")
    assert len(markdown) == 2 + 4
    assert "| d2-40 | 1 | 10 (0.50x) |" in markdown[4] and "(4.00x)" in markdown[4]
    assert "x)" not in markdown[2]  # the baseline's own rows carry no ratio


def test_three_digit_buckets():
    assert [bucket_three_digits(t) for t in (0.4, 7.6, 999.4, 1234.5, 98765.0)] == [0, 8, 999, 1230, 98800]


# --- soak ------------------------------------------------------------------------------------------------


def test_rss_growth_after_warmup():
    series = [(0.0, 50), (5.0, 90), (10.0, 100), (50.0, 104), (80.0, 103), (99.0, 102)]
    growth = rss_growth(series, duration_s=100.0, warmup_fraction=0.1)
    assert growth["warmup_s"] == 10.0 and growth["rss_at_warmup_end_bytes"] == 100
    assert growth["rss_peak_after_warmup_bytes"] == 104 and growth["rss_final_bytes"] == 102
    assert growth["rss_growth_after_warmup"] == pytest.approx(0.04)
    with pytest.raises(ValueError, match="no RSS sample after the warm-up"):
        rss_growth([(1.0, 5)], duration_s=100.0, warmup_fraction=0.5)


def test_failure_series_reads_the_good_requests_history(tmp_path):
    history = tmp_path / "h.csv"
    with open(history, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Timestamp", "User Count", "Type", "Name", "Total Request Count", "Total Failure Count"])
        writer.writerows([[1000, 3, "llm", "latency", 4, 0], [1000, 3, "POST", "bad-request: x", 1, 1],
                          [1000, 3, "", "Aggregated", 5, 1], [1001, 3, "llm", "latency", 9, 1]])
    assert failure_series(history, 998.0) == [(2.0, 4, 0), (3.0, 9, 1)]


# --- the runner's plan --------------------------------------------------------------------------------------


def test_models_alternate_within_each_user_count_and_rounds_reverse():
    cells = schedule(["a", "b"], [1, 4], rounds=2, one_server_at_a_time=False)
    assert [(c.round, c.users, c.model) for c in cells] == [
        (0, 1, "a"), (0, 1, "b"), (0, 4, "a"), (0, 4, "b"), (1, 1, "b"), (1, 1, "a"), (1, 4, "b"), (1, 4, "a")]
    one = schedule(["a", "b"], [1, 4], rounds=1, one_server_at_a_time=True)
    assert one == [Cell(0, 1, "a"), Cell(0, 4, "a"), Cell(0, 1, "b"), Cell(0, 4, "b")]


def test_warmup_cells_come_first_after_every_server_start_and_have_their_own_names():
    together = schedule(["a", "b"], [1, 4], rounds=2, one_server_at_a_time=False, warmup=True)
    assert [(c.warmup, c.round, c.users, c.model) for c in together[:4]] == [
        (True, 0, 1, "a"), (True, 0, 1, "b"), (True, 0, 4, "a"), (True, 0, 4, "b")]
    assert together[4:] == schedule(["a", "b"], [1, 4], rounds=2, one_server_at_a_time=False)
    apart = schedule(["a", "b"], [1], rounds=2, one_server_at_a_time=True, warmup=True)
    assert [(c.warmup, c.round, c.model) for c in apart] == [
        (True, 0, "a"), (False, 0, "a"), (True, 0, "b"), (False, 0, "b"),
        (True, 1, "b"), (False, 1, "b"), (True, 1, "a"), (False, 1, "a")]
    for cells in (together, apart):  # every cell's CSVs get their own files
        assert len({c.name for c in cells}) == len(cells)
    assert together[0].name == "a_u1_r0_warmup"


def test_a_cell_waits_for_the_requests_left_in_flight(tmp_path):
    """requests_in_flight sums the engine's running and waiting gauges of /metrics (not the by-reason
    breakdown); wait_idle returns once they reach 0 and raises when they do not."""
    gauges = iter([(2, 1), (1, 0), (0, 0)])

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self):
            running, waiting = next(gauges, (0, 0))
            body = (f'# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name="m"}} {running}.0\n'
                    f'vllm:num_requests_waiting{{model_name="m"}} {waiting}.0\n'
                    'vllm:num_requests_waiting_by_reason{model_name="m",reason="capacity"} 5.0\n').encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        server = VllmServer(tmp_path, "m", tmp_path / "log", port=http.server_address[1])
        server.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        assert server.requests_in_flight() == 3
        assert 0.5 < server.wait_idle(timeout_s=30) < 10  # busy once more, then idle
        gauges = iter([(1, 0)] * 10)
        with pytest.raises(RuntimeError, match="still holds 1 requests"):
            server.wait_idle(timeout_s=2)
        server.process.kill()
    finally:
        http.shutdown()


def test_model_labels_are_unique_and_safe():
    assert model_labels([Path("/x/brown model"), Path("runs/d2-40"), Path("/y/brown model")]) == [
        "brown-model", "d2-40", "brown-model-2"]


def test_runner_refuses_bad_options(tmp_path, capsys):
    for argv, message in (([], "--model"), (["--model", str(tmp_path)], "no config.json"),
                          (["--model", str(TOKENIZER_DIR), "--prompt-tokens", "uniform:5"], "bad length"),
                          (["--model", str(TOKENIZER_DIR), "--users", "0"], "at least 1"),
                          (["--model", str(TOKENIZER_DIR), "--warmup-seconds", "-1"], "--warmup-seconds")):
        with pytest.raises(SystemExit):
            parse_args([*argv, "--duration", "5", "--out", str(tmp_path / "o")] if argv else [])
        assert message in capsys.readouterr().err
    assert parse_args(["--model", str(TOKENIZER_DIR), "--duration", "5", "--out", "o", "--soak"]).bad_users == 1


def test_runner_out_replaces_only_its_own_results(tmp_path, capsys):
    argv = ["--model", str(TOKENIZER_DIR), "--duration", "5", "--out", str(tmp_path)]
    (tmp_path / "summary.json").write_text('{"mine": 1}\n')
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert "is not a previous load-test summary" in capsys.readouterr().err
    assert (tmp_path / "summary.json").read_text() == '{"mine": 1}\n'
    (tmp_path / "summary.json").write_text('{"models": {}, "ratios": {}}\n')
    assert parse_args(argv).out == tmp_path


# --- end to end ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_runner_against_a_tiny_compressed_model(tmp_path):
    """A few seconds of load (soak mode, so the bad-request user and RSS series run too): a complete, well-formed
    summary with zero failures, Locust's CSVs, the plots, and no server process left behind."""
    from vllm_models import compress_for_vllm

    model = compress_for_vllm("qwen3_moe", tmp_path)
    out = tmp_path / "load"
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.run", "--model", str(model), "--users", "1", "2", "--duration", "5",
         "--out", str(out), "--enforce-eager", "--max-model-len", "256", "--prompt-tokens", "uniform:8:48",
         "--output-tokens", "uniform:2:12", "--soak", "--warmup-fraction", "0.2", "--server-arg=--dtype=float32",
         "--warmup-seconds", "2"],
        capture_output=True, text=True, timeout=600, cwd=REPO, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["baseline"] == model.name
    (label,) = summary["models"]
    result = summary["models"][label]
    assert set(result["users"]) == {"1", "2"} and result["failures"] == 0
    for users, metrics in result["users"].items():
        assert set(METRIC_KEYS) <= set(metrics), users
        assert metrics["failures"] == 0 and metrics["requests"] > 0 and metrics["output_tokens"] > 0
        assert metrics["bad_requests"] > 0 and metrics["bad_request_failures"] == 0
        assert metrics["ttft_p50"] is not None and metrics["latency_p99"] >= metrics["latency_p50"] > 0
        assert metrics["server_peak_rss_bytes"] > 0
        assert (out / "csv" / f"{label}_u{users}_r0_stats.csv").is_file()
        assert (out / "csv" / f"{label}_u{users}_r0_warmup_stats.csv").is_file()  # run, and left out:
        assert len(metrics["rounds"]) == 1
        assert summary["ratios"][label][users]["output_tokens_per_s"] == 1.0
    assert len(summary["soak"]) == 2
    for soak in summary["soak"].values():
        assert soak["rss_series"] and soak["failure_series"] and soak["failures"] == 0
        assert soak["rss_peak_after_warmup_bytes"] >= soak["rss_at_warmup_end_bytes"] > 0
    for png in ("throughput_latency.png", "soak.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| model | users |" in (out / "ratios.md").read_text() and "| model | users |" in done.stdout
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(model) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, leftovers
