"""From Locust's CSVs to the numbers of a load test: per-cell metrics, medians over rounds, ratios, soak trends.

A *cell* is one Locust run: one model at one user count in one round. Its metrics come from the ``llm`` rows
the locustfile writes to ``<prefix>_stats.csv``:

- ``requests_per_s``: successful requests / duration, where duration = Request Count / Requests/s of the
  ``latency`` row (Locust's own span from the test start to the last recorded request);
- ``output_tokens_per_s``: output tokens of successful requests (Average Content Size x Request Count; a failed
  request records 0) / duration;
- ``ttft_p50``/``ttft_p99`` (streamed requests), ``latency_p50``/``latency_p99``, ``itl_p50``/``itl_p99``:
  Locust's percentiles, in seconds (None when no request of that kind finished);
- ``failures``: failed good requests; ``bad_requests``/``bad_request_failures``: the ``bad-request: ...`` rows
  (a failure there is a non-4xx answer).

Rounds are combined by the median of each rate and percentile; counts are summed and peaks maximised.

Soak: the *warm-up* is the first ``warmup_fraction`` (default 10 %) of a cell's duration, counted
from the moment Locust starts the load. Growth after
warm-up = (peak RSS after the warm-up - RSS at the end of the warm-up) / RSS at the end of the warm-up, where
RSS is the server's whole process tree (see loadtests/server.py).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import statistics
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

METRIC_TYPE = "llm"
"""Locust request type of the rows the locustfile records for good requests."""
LATENCY, TTFT, ITL = "latency", "ttft", "itl"
BAD_REQUEST_PREFIX = "bad-request"
"""Name prefix of the BadRequestUser rows."""

RATE_KEYS = ("requests_per_s", "output_tokens_per_s")
PERCENTILE_KEYS = ("ttft_p50", "ttft_p99", "latency_p50", "latency_p99", "itl_p50", "itl_p99")
COUNT_KEYS = ("requests", "output_tokens", "failures", "bad_requests", "bad_request_failures")
METRIC_KEYS = RATE_KEYS + PERCENTILE_KEYS + COUNT_KEYS + ("server_peak_rss_bytes",)
"""Every key of a cell's (and of a combined user count's) metrics."""


def bucket_three_digits(response_time_ms: float) -> int:
    """Round a response time (ms) to 3 significant digits, exact below 1 s: the locustfile's replacement for
    Locust's 2-digit histogram buckets (``locust.stats.bucket_response_time``)."""
    digits = len(str(int(response_time_ms)))
    return int(round(response_time_ms, min(0, 3 - digits)))


def read_stats_rows(stats_csv: Path) -> dict[tuple[str, str], dict[str, str]]:
    """Rows of a Locust ``*_stats.csv`` keyed by (Type, Name)."""
    with open(stats_csv, newline="", encoding="utf-8") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def _percentile_s(row: dict[str, str] | None, column: str) -> float | None:
    if row is None or int(row["Request Count"]) - int(row["Failure Count"]) == 0 or row[column] == "N/A":
        return None
    return float(row[column]) / 1000.0


def cell_metrics(stats_csv: Path, server_peak_rss_bytes: int) -> dict:
    """The metrics of one cell from its ``*_stats.csv`` (see the module docstring)."""
    rows = read_stats_rows(stats_csv)
    latency = rows.get((METRIC_TYPE, LATENCY))
    count = int(latency["Request Count"]) if latency else 0
    failures = int(latency["Failure Count"]) if latency else 0
    rate = float(latency["Requests/s"]) if latency else 0.0
    duration_s = count / rate if rate > 0 else 0.0
    output_tokens = round(float(latency["Average Content Size"]) * count) if latency else 0
    bad = [row for (_, name), row in rows.items() if name.startswith(BAD_REQUEST_PREFIX)]
    metrics = {
        "requests_per_s": (count - failures) / duration_s if duration_s else 0.0,
        "output_tokens_per_s": output_tokens / duration_s if duration_s else 0.0,
        "requests": count - failures,
        "output_tokens": output_tokens,
        "failures": failures,
        "bad_requests": sum(int(row["Request Count"]) for row in bad),
        "bad_request_failures": sum(int(row["Failure Count"]) for row in bad),
        "server_peak_rss_bytes": int(server_peak_rss_bytes),
    }
    for name in (TTFT, LATENCY, ITL):
        row = rows.get((METRIC_TYPE, name))
        metrics[f"{name}_p50"] = _percentile_s(row, "50%")
        metrics[f"{name}_p99"] = _percentile_s(row, "99%")
    return metrics


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def combine_rounds(cells: Sequence[dict]) -> dict:
    """One user count's metrics over rounds: medians of rates and percentiles, sums of counts, peak of peaks."""
    combined = {key: _median(c[key] for c in cells) for key in RATE_KEYS + PERCENTILE_KEYS}
    combined.update({key: sum(c[key] for c in cells) for key in COUNT_KEYS})
    combined["server_peak_rss_bytes"] = max(c["server_peak_rss_bytes"] for c in cells)
    combined["rounds"] = list(cells)
    return combined


RATIO_COLUMNS = (("output_tokens_per_s", "output tok/s"), ("requests_per_s", "req/s"), ("ttft_p50", "TTFT p50 s"),
                 ("ttft_p99", "TTFT p99 s"), ("latency_p50", "latency p50 s"), ("latency_p99", "latency p99 s"))
"""(metric, column title) of the ratio table; a ratio is model / baseline (above 1: more throughput or slower)."""


def ratios(models: dict[str, dict], baseline: str) -> dict[str, dict[str, dict[str, float | None]]]:
    """model -> users -> metric -> value / baseline value (None where either is missing or the baseline is 0)."""
    out = {}
    for label, model in models.items():
        out[label] = {}
        for users, metrics in model["users"].items():
            base = models[baseline]["users"].get(users, {})
            out[label][users] = {key: metrics[key] / base[key] if metrics.get(key) is not None and base.get(key)
                                 else None for key, _ in RATIO_COLUMNS}
    return out


def _cell(value: float | None, ratio: float | None, show_ratio: bool) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.3g}"
    return f"{text} ({ratio:.2f}x)" if show_ratio and ratio is not None else text


def ratio_table(models: dict[str, dict], baseline: str) -> str:
    """Markdown table of every model and user count; each value carries its ratio to the baseline model."""
    table = ratios(models, baseline)
    head = ["model", "users", *(title for _, title in RATIO_COLUMNS), "failures", "peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, model in models.items():
        for users, metrics in model["users"].items():
            cells = [_cell(metrics[key], table[label][users][key], label != baseline) for key, _ in RATIO_COLUMNS]
            lines.append("| " + " | ".join([label, users, *cells, str(metrics["failures"]),
                                            f"{metrics['server_peak_rss_bytes'] / 2**20:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def rss_growth(series: Sequence[tuple[float, int]], duration_s: float, warmup_fraction: float) -> dict:
    """RSS after the warm-up of a soak cell; ``series`` holds (seconds since the cell's start, bytes)."""
    warmup_s = warmup_fraction * duration_s
    after = [(t, rss) for t, rss in series if t >= warmup_s]
    if not after:
        raise ValueError(f"no RSS sample after the warm-up ({warmup_s:.0f} s of a {duration_s:.0f} s run)")
    start = after[0][1]
    peak = max(rss for _, rss in after)
    return {"warmup_s": warmup_s, "rss_at_warmup_end_bytes": start, "rss_peak_after_warmup_bytes": peak,
            "rss_final_bytes": after[-1][1], "rss_growth_after_warmup": (peak - start) / start}


def failure_series(history_csv: Path, start_epoch_s: float) -> list[tuple[float, int, int]]:
    """(seconds since ``start_epoch_s``, requests so far, failures so far) of the good requests, from Locust's
    ``*_stats_history.csv`` (written with --csv-full-history)."""
    with open(history_csv, newline="", encoding="utf-8") as f:
        return [(float(row["Timestamp"]) - start_epoch_s, int(row["Total Request Count"]),
                 int(row["Total Failure Count"]))
                for row in csv.DictReader(f) if (row["Type"], row["Name"]) == (METRIC_TYPE, LATENCY)]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it over ``path`` when the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")
