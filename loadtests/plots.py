"""PNG plots of a load test: throughput and latency against concurrency, and a soak's RSS and failures over time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loadtests.summary import atomic_path  # noqa: E402


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, format="png")
    plt.close(figure)


def plot_concurrency(models: dict[str, dict], path: Path) -> None:
    """Output tokens/s, TTFT and end-to-end latency against users, one colour per model; p50 solid with circles,
    p99 dashed with triangles (and a long legend handle, so the dashes show)."""
    figure, (throughput, ttft, latency) = plt.subplots(1, 3, figsize=(15, 4.5))
    for label, model in models.items():
        users = sorted(model["users"], key=int)
        x = [int(u) for u in users]
        metrics = [model["users"][u] for u in users]
        line, = throughput.plot(x, [m["output_tokens_per_s"] for m in metrics], marker="o", label=label)
        for axis, name in ((ttft, "ttft"), (latency, "latency")):
            for percentile, style, marker in (("p50", "-", "o"), ("p99", "--", "^")):
                values = [m[f"{name}_{percentile}"] for m in metrics]
                points = [(u, v) for u, v in zip(x, values) if v is not None]
                if points:
                    axis.plot(*zip(*points), marker=marker, linestyle=style, color=line.get_color(),
                              label=f"{label} {percentile}")
    all_users = sorted({int(u) for model in models.values() for u in model["users"]})
    for axis, title, unit in ((throughput, "throughput", "output tokens/s"), (ttft, "time to first token", "s"),
                              (latency, "end-to-end latency", "s")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(all_users, [str(u) for u in all_users])
        axis.minorticks_off()
        axis.set_xlabel("concurrent users")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7, handlelength=3.5)
    _save(figure, path)


def plot_soak(soak: dict[str, dict], path: Path) -> None:
    """Server RSS (MiB) and cumulative failed requests over time, one line per model; the warm-up is shaded."""
    figure, (rss_axis, failure_axis) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for label, cell in soak.items():
        t, rss = zip(*cell["rss_series"]) if cell["rss_series"] else ((), ())
        line, = rss_axis.plot(t, [b / 2**20 for b in rss], label=f"{label} (growth after warm-up "
                              f"{100 * cell['rss_growth_after_warmup']:.1f} %)")
        rss_axis.axvspan(0, cell["warmup_s"], color=line.get_color(), alpha=0.08)
        if cell["failure_series"]:
            t, _, failures = zip(*cell["failure_series"])
            failure_axis.plot(t, failures, color=line.get_color(), label=label)
    rss_axis.set_ylabel("server RSS, MiB (process tree)")
    rss_axis.set_title("soak: server memory (warm-up shaded) and failures")
    failure_axis.set_ylabel("failed requests (cumulative)")
    failure_axis.set_xlabel("seconds since the load started")
    for axis in (rss_axis, failure_axis):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    _save(figure, path)
