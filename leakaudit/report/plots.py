"""Figures for the HTML report, returned as inline PNG data URIs (the page must work offline).

Why PNG data URIs: one self-contained file that any browser shows without network access or scripts.
"""

from __future__ import annotations

import base64
import io
import math
import tempfile
from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _data_uri(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def roc_figure(curves: dict[str, Any], title: str) -> str:
    """ROC curves (name → metrics.RocMetrics) on a log-scale FPR axis, drawn by metrics.plot_roc."""
    from leakaudit.metrics import plot_roc

    with tempfile.TemporaryDirectory() as tmp:
        return png_uri(plot_roc(curves, Path(tmp) / "roc.png", title=title))


def heatmap_figure(rows: list[str], cols: list[str], values: dict[tuple[str, str], float], title: str,
                   xlabel: str, ylabel: str, fmt: str = "{:.3f}") -> str:
    """A labelled heatmap (e.g. PII match rate by template × temperature); missing cells stay blank."""
    import numpy as np

    plt = _plt()
    grid = np.full((len(rows), len(cols)), np.nan)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            if (r, c) in values:
                grid[i, j] = values[(r, c)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(cols) + 2.5), max(2.2, 0.45 * len(rows) + 1.4)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), labels=cols)
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    finite = grid[np.isfinite(grid)]
    mid = float(finite.mean()) if finite.size else 0.0
    for i in range(len(rows)):
        for j in range(len(cols)):
            if math.isfinite(grid[i, j]):
                ax.text(j, i, fmt.format(grid[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] < mid else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _data_uri(fig)


def lines_figure(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
                 log_y: bool = False, bands: dict[str, list[tuple[float, float, float]]] | None = None,
                 xticks: list[tuple[float, str]] | None = None) -> str:
    """One line per series of (x, y) points, e.g. perplexity per checkpoint for each variant; `bands` adds a
    shaded (x, low, high) interval per series (a CI), `xticks` names positions (e.g. m = 1, 2, ..., all)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, points in series.items():
        pts = sorted(points)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        band = sorted((bands or {}).get(name) or [])
        if band:
            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    if log_y:
        ax.set_yscale("log")
    if xticks:
        ax.set_xticks([t[0] for t in xticks], labels=[t[1] for t in xticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _data_uri(fig)


def scatter_figure(x: list[float], y: list[float], title: str, xlabel: str, ylabel: str,
                   log_x: bool = False) -> str:
    """Points of two per-item measures (e.g. a user's score against their number of training samples)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.scatter(x, y, s=14, alpha=0.7)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _data_uri(fig)


def bars_figure(values: dict[str, float], title: str, ylabel: str) -> str:
    """Simple labelled bars (e.g. backdoor match ratio per variant)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(values) + 2), 3.5))
    names = list(values)
    ax.bar(range(len(names)), [values[n] for n in names])
    ax.set_xticks(range(len(names)), labels=names, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return _data_uri(fig)
