"""PNG plots of what the compressor did, drawn with matplotlib (Agg backend, no display needed).

- :func:`plot_routing`: share of routed tokens per expert and layer during calibration (heat map), from
  ``moe_compress_stats.json`` ``layers[*].routing_counts``.
- :func:`plot_allocation`: what each method kept, per expert and layer. Every per-layer field that holds one
  number per expert (``ranks`` per projection; fields other schemes add, e.g. kept channels or group ranks)
  becomes a heat map; every per-layer scalar (``base_channels``, ...) a bar chart. Missing fields are skipped,
  so checkpoints of any scheme can be drawn.
- :func:`plot_energy`: cumulative singular-value energy of original experts, shared base and deltas
  (D²-MoE Figures 1–2; numbers from :mod:`.spectrum`).

Every figure is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..checkpoint_io import atomic_file  # noqa: E402
from .spectrum import ProjectionSpectra  # noqa: E402

ROUTING_FIELDS = ("routing_counts", "routing_weight_sums")
"""Per-layer statistics fields that describe the calibration data, not the allocation."""


def _save(fig, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _layer_order(layers: dict) -> list[str]:
    return sorted(layers, key=int)


def plot_routing(layers: dict, title: str, path: Path) -> Path:
    """Heat map, layers x experts, of the share of routing assignments each expert received in its layer."""
    order = _layer_order(layers)
    rows = []
    for layer in order:
        counts = layers[layer]["routing_counts"]
        total = sum(counts) or 1
        rows.append([c / total for c in counts])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(rows[0]) + 2), 0.45 * len(rows) + 1.6))
    image = ax.imshow(rows, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(order)), order)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{title}: routing frequency (calibration)")
    fig.colorbar(image, ax=ax, label="share of routed tokens")
    return _save(fig, path)


def allocation_fields(layers: dict) -> tuple[dict[str, list[list[float]]], dict[str, list[float]]]:
    """Split per-layer entries into per-expert fields (name -> [layer][expert]) and per-layer scalars.

    ``ranks`` (a dict projection -> list) becomes ``rank gate`` / ``rank up`` / ``rank down``; any other
    dict of lists is flattened the same way. A field missing from some layers is dropped (it cannot be drawn
    as one grid); fields of calibration data (routing counts) are left out.
    """
    order = _layer_order(layers)
    per_expert: dict[str, dict[str, list[float]]] = {}
    per_layer: dict[str, dict[str, float]] = {}
    for layer in order:
        for key, value in layers[layer].items():
            if key in ROUTING_FIELDS:
                continue
            name = "rank" if key == "ranks" else key.replace("_", " ")
            if isinstance(value, dict):
                for sub, values in value.items():
                    if _numbers(values):
                        per_expert.setdefault(f"{name} {sub}", {})[layer] = values
            elif _numbers(value):
                per_expert.setdefault(name, {})[layer] = value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                per_layer.setdefault(name, {})[layer] = value
    grids = {k: [v[layer] for layer in order] for k, v in per_expert.items() if len(v) == len(order)}
    bars = {k: [v[layer] for layer in order] for k, v in per_layer.items() if len(v) == len(order)}
    return grids, bars


def _numbers(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)


def plot_allocation(layers: dict, title: str, path: Path) -> Path | None:
    """One panel per allocation field (heat map per expert, bars per layer); None if the layers hold none."""
    grids, bars = allocation_fields(layers)
    panels = len(grids) + len(bars)
    if not panels:
        return None
    order = _layer_order(layers)
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig = plt.figure(figsize=(5.2 * cols, 0.4 * len(order) * rows + 2.4 * rows), layout="constrained")
    flat = _panel_axes(fig, panels, cols)
    for ax, (name, grid) in zip(flat, grids.items()):
        image = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_yticks(range(len(order)), order)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(name)
        integer = all(float(x).is_integer() for row in grid for x in row)
        fig.colorbar(image, ax=ax, label=name, ticks=MaxNLocator(integer=True) if integer else None)
    for ax, (name, values) in zip(flat[len(grids):], bars.items()):
        ax.bar(range(len(order)), values, color="tab:blue")
        ax.set_xticks(range(len(order)), order)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel(name)
        ax.set_title(name)
    fig.suptitle(f"{title}: allocation per expert and layer")
    return _save(fig, path)


def _panel_axes(fig, panels: int, cols: int) -> list:
    """``panels`` axes, ``cols`` per row; the last row's panels widen to fill it, so no slot stays empty."""
    rows = math.ceil(panels / cols)
    units = 6  # divisible by every row length 1..3
    grid = fig.add_gridspec(rows, units)
    axes = []
    for index in range(panels):
        row, col = divmod(index, cols)
        in_row = cols if row < rows - 1 else panels - cols * (rows - 1)
        width = units // in_row
        axes.append(fig.add_subplot(grid[row, col * width:(col + 1) * width]))
    return axes


def _band(ax, curves, label: str, color: str) -> None:
    """Mean over experts with the min-max range shaded; x is k / full rank."""
    k = curves.shape[1]
    x = [(i + 1) / k for i in range(k)]
    ax.fill_between(x, curves.min(0).values.tolist(), curves.max(0).values.tolist(), color=color, alpha=0.2)
    ax.plot(x, curves.mean(0).tolist(), color=color, label=label)


def plot_energy(spectra: dict[str, ProjectionSpectra], title: str, path: Path) -> Path:
    """Cumulative energy E(k) per projection: original experts, shared base, deltas, and the mean stored rank."""
    fig, axes = plt.subplots(1, len(spectra), figsize=(5 * len(spectra), 4), squeeze=False)
    for ax, (proj, s) in zip(axes[0], spectra.items()):
        full = s.original.shape[1]
        _band(ax, s.original, "original experts W_i", "tab:blue")
        if s.base is not None:
            _band(ax, s.delta, "deltas W_i - B", "tab:red")
            ax.plot([(i + 1) / s.base.numel() for i in range(s.base.numel())], s.base.tolist(),
                    color="tab:green", label="shared base B")
        mean_rank = sum(s.stored_rank) / len(s.stored_rank)
        ax.axvline(mean_rank / full, color="gray", linestyle="--", label=f"mean stored rank {mean_rank:.1f}/{full}")
        ax.set_title(proj)
        ax.set_xlabel("k / full rank")
        ax.set_ylabel("cumulative energy E(k)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{title}: singular-value energy")
    return _save(fig, path)
