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


def _matplotlib_dir() -> None:
    """MPLCONFIGDIR in leakaudit's cache when matplotlib's own folders (~/.config/matplotlib, ~/.cache/matplotlib)
    cannot be made: with a read-only HOME (a cluster's, a container's) matplotlib printed two lines on every
    command that draws ("mkdir -p failed ...", "Matplotlib created a temporary cache directory ..."). Set only
    before matplotlib is imported, and never over the user's own MPLCONFIGDIR."""
    import os
    import sys

    if "MPLCONFIGDIR" in os.environ or "matplotlib" in sys.modules:
        return
    try:
        home = Path.home()
    except (RuntimeError, KeyError):
        home = None
    for base, default in (("XDG_CONFIG_HOME", ".config"), ("XDG_CACHE_HOME", ".cache")):
        folder = Path(os.environ[base]) if os.environ.get(base) else home / default if home else None
        existing = folder / "matplotlib" if folder else None
        while existing is not None and not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
            break
    else:
        return
    from leakaudit.errors import InputError
    from leakaudit.models.fingerprint import cache_dir

    try:
        mine = cache_dir() / "matplotlib"
        mine.mkdir(exist_ok=True)
    except (OSError, InputError):  # no cache either: matplotlib's own temporary folder, and its lines
        return
    os.environ["MPLCONFIGDIR"] = str(mine)


def _plt():
    import warnings

    _matplotlib_dir()
    import matplotlib

    # a title or legend naming a path or model in a script the font lacks (日本, a run dir named in Japanese):
    # the figure shows boxes there (the report's text shows the name), and four UserWarnings per figure, each
    # with a line of plots.py, filled a run's stderr
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)

    matplotlib.use("Agg")
    # titles and labels hold model paths and names: "$5_vs_$10" is text, not TeX (mathtext raised on it)
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


#: characters per line of a variant's label, and of a title per inch of its figure's width: a grid label such
#: as "ft[learning_rate=0.0001,epochs=3,...]" on one line pushed a forest plot's panels to a sliver and ran a
#: ROC's title off the figure's edge
LABEL_CHARS, TITLE_CHARS_PER_INCH = 32, 9
#: a bar chart's labels up to this many characters are drawn slanted on one line, as they always were
SHORT_LABEL = 16


def _wrap(text: Any, width: int = LABEL_CHARS) -> str:
    """`text` in lines of at most `width` characters, a word longer than that broken (labels have no spaces)."""
    import textwrap

    text = str(text)
    return "\n".join(textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False)) or text


def _title(ax, title: Any, **kwargs: Any) -> None:
    """A one-plot figure's title, wrapped to the figure's width and centred on the figure (over the axes, a
    plot pushed right by long tick labels pushed its title off the right edge); with `kwargs` (a panel of
    several) the axes' own title."""
    text = _wrap(title, int(ax.figure.get_figwidth() * TITLE_CHARS_PER_INCH))
    if kwargs:
        ax.set_title(text, **kwargs)
    else:
        import matplotlib

        ax.figure.suptitle(text, fontsize=matplotlib.rcParams["axes.titlesize"])


def _log_scale(ax, which: str) -> None:
    """A log-scale axis whose tick labels are plain text ("1e-04", "20"): the default formatter writes TeX
    ("$\\mathdefault{10^{-4}}$"), shown raw since parse_math is off for the user text around it."""
    from matplotlib.ticker import LogFormatter

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(LogFormatter())
    # minor ticks labelled only on an axis of under one decade (over more they crowded into each other)
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _data_uri(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def roc_figure(curves: dict[str, Any], title: str) -> str:
    """ROC curves (name → metrics.RocMetrics) on a log-scale FPR axis, drawn by plot_roc."""
    with tempfile.TemporaryDirectory() as tmp:
        return png_uri(plot_roc(curves, Path(tmp) / "roc.png", title=title))


def heatmap_figure(rows: list[str], cols: list[str], values: dict[tuple[str, str], float], title: str,
                   xlabel: str, ylabel: str, fmt: str = "{:.3f}", limits: tuple[float, float] | None = None) -> str:
    """A labelled heatmap (e.g. PII match rate by template × temperature); missing cells stay blank. `limits`
    fixes the colour scale (a rate's 0-1), so one colour means one value in every heatmap of a report."""
    import numpy as np

    plt = _plt()
    grid = np.full((len(rows), len(cols)), np.nan)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            if (r, c) in values:
                grid[i, j] = values[(r, c)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(cols) + 2.5), max(2.2, 0.45 * len(rows) + 1.4)))
    vmin, vmax = limits or (None, None)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(cols)), labels=cols)
    ax.set_yticks(range(len(rows)), labels=[_wrap(r) for r in rows])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _title(ax, title)
    finite = grid[np.isfinite(grid)]
    mid = sum(limits) / 2 if limits else float(finite.mean()) if finite.size else 0.0
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
                 xticks: list[tuple[float, str]] | None = None, chance: float | None = None,
                 levels: dict[str, float] | None = None) -> str:
    """One line per series of (x, y) points, e.g. perplexity per checkpoint for each variant; `bands` adds a
    shaded (x, low, high) interval per series (a CI), `xticks` names positions (e.g. m = 1, 2, ..., all),
    `chance` draws the level that means no signal (an AUC's 0.5), `levels` a dotted line per value with no x
    (a base model's perplexity, the reference the checkpoints move from). The legend sits beside the plot."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    if chance is not None:
        ax.axhline(chance, color="k", ls="--", lw=0.8, label="chance")
    for name, points in series.items():
        pts = sorted(points)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        band = sorted((bands or {}).get(name) or [])
        if band:
            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    for i, (name, value) in enumerate((levels or {}).items(), start=len(series)):
        ax.axhline(value, ls=":", lw=1.4, color=f"C{i % 10}", label=name)
    if log_y:
        _log_scale(ax, "y")
    if xticks:
        ax.set_xticks([t[0] for t in xticks], labels=[t[1] for t in xticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _title(ax, title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return _data_uri(fig)


def scatter_figure(x: list[float], y: list[float], title: str, xlabel: str, ylabel: str,
                   log_x: bool = False) -> str:
    """Points of two per-item measures (e.g. a user's score against their number of training samples)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.scatter(x, y, s=14, alpha=0.7)
    if log_x:
        _log_scale(ax, "x")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _title(ax, title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _data_uri(fig)


def bars_figure(values: dict[str, float] | dict[str, dict[str, float]], title: str, ylabel: str,
                xlabel: str | None = None) -> str:
    """Labelled bars (e.g. backdoor match ratio per variant). Grouped bars when each value is itself a dict
    (group -> bar name -> value, e.g. target -> template -> match rate): one colour per bar name, a legend;
    a bar a group lacks is left out."""
    import numpy as np

    plt = _plt()
    groups = list(values)
    nested = any(isinstance(v, dict) for v in values.values())
    names = list(dict.fromkeys(k for v in values.values() for k in v)) if nested else [""]
    width = 0.8 / len(names)
    n_bars = len(groups) * len(names)
    fig_width = min(12.0, max(4.0, 0.35 * n_bars + 0.5 * len(groups) + 2))
    # labels longer than SHORT_LABEL (a grid's variants) wrap inside their bar's slot, upright: slanted, their
    # lines ran into each other and off the figure's left edge
    long_labels = max(len(str(g)) for g in groups) > SHORT_LABEL
    if long_labels:
        fig_width = min(12.0, max(fig_width, 1.6 * len(groups) + 2))
        per_line = max(8, int((fig_width - 2) / len(groups) * 11))
        labels = [_wrap(g, per_line) for g in groups]
    fig, ax = plt.subplots(figsize=(fig_width, 3.5 + (0.16 * max(x.count("\n") for x in labels)
                                                      if long_labels else 0)))
    for j, name in enumerate(names):
        heights = [(values[g].get(name, np.nan) if nested else values[g]) for g in groups]
        ax.bar(np.arange(len(groups)) + (j - (len(names) - 1) / 2) * width, heights, width,
               label=name if nested else None)
    if long_labels:
        ax.set_xticks(range(len(groups)), labels=labels, fontsize=8)
    else:
        ax.set_xticks(range(len(groups)), labels=groups, rotation=20 if len(groups) > 1 else 0,
                      ha="right" if len(groups) > 1 else "center")
    ax.axhline(0, color="k", lw=0.6)  # a bar of 0 sits on a visible line, not in empty space
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    _title(ax, title)
    if nested:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return _data_uri(fig)


#: forest-plot colours by verdict direction (compare.verdict): up, down, CI containing 0
FOREST_COLOURS = {"increase": "#c0392b", "decrease": "#2166ac", "none": "#8c8c8c"}
_FOREST_LABELS = {"increase": "increase (CI > 0)", "decrease": "decrease (CI < 0)",
                  "none": "no detectable change (CI contains 0)"}


def forest_figure(panels: list[dict[str, Any]]) -> str:
    """Paired differences at a glance: one panel per {title, xlabel, rows}, each row (label, delta, ci_low,
    ci_high, direction) a point at Δ with its CI as a horizontal bar, a vertical line at 0, coloured by
    direction ('increase', 'decrease', 'none'). Panels are stacked, each on its own x scale (Δ AUC and
    Δ mean log p do not share one), rows top to bottom in the given order."""
    plt = _plt()
    lines = [max((_wrap(r[0]).count("\n") + 1 for r in p["rows"]), default=1) for p in panels]
    heights = [len(p["rows"]) * 0.32 * n + 0.9 for p, n in zip(panels, lines, strict=True)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    seen: set[str] = set()
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        rows = panel["rows"]
        ys = list(range(len(rows) - 1, -1, -1))
        for y, (_label, delta, lo, hi, direction) in zip(ys, rows, strict=True):
            colour = FOREST_COLOURS.get(direction, FOREST_COLOURS["none"])
            ax.hlines(y, lo, hi, color=colour, linewidth=2.2)
            ax.plot([delta], [y], "o", color=colour, markersize=6)
            seen.add(direction if direction in FOREST_COLOURS else "none")
        ax.axvline(0, color="black", linewidth=0.8)
        left = min(0.0, *(r[2] for r in rows), *(r[1] for r in rows))
        right = max(0.0, *(r[3] for r in rows), *(r[1] for r in rows))
        pad = (right - left) * 0.08 or 0.05
        ax.set_xlim(left - pad, right + pad)
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.set_yticks(ys, labels=[_wrap(r[0]) for r in rows])
        _title(ax, panel["title"], fontsize=10, loc="left")
        ax.set_xlabel(panel.get("xlabel", "Δ"), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Line2D([], [], color=FOREST_COLOURS[d], marker="o", linewidth=2.2, label=_FOREST_LABELS[d])
               for d in FOREST_COLOURS if d in seen]
    fig.legend(handles=handles, loc="upper center", ncols=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return _data_uri(fig)


def _linear_segments(fpr, tpr, floor: float):
    """The ROC's points with each segment filled in linearly in FPR, so that a run of tied scores (a straight
    segment of the ROC) stays straight in FPR on the log axis: drawn point to point, an attack whose scores
    are all alike went from (1e-4, 0) straight to (1, 1) and looked like TPR 0.5 at 1% FPR."""
    import numpy as np

    xs, ys = [max(float(fpr[0]), floor)], [float(tpr[0])]
    for f0, t0, f1, t1 in zip(fpr[:-1], tpr[:-1], fpr[1:], tpr[1:], strict=True):
        if f1 > f0 and t1 != t0 and f1 > floor:  # a diagonal (tied) segment; flat and vertical ones stay as drawn
            grid = np.logspace(np.log10(max(f0, floor)), np.log10(f1), 24)[1:]
            xs += grid.tolist()
            ys += (t0 + (t1 - t0) * (grid - f0) / (f1 - f0)).tolist()
        else:
            xs.append(max(float(f1), floor))
            ys.append(float(t1))
    return np.array(xs), np.array(ys)


def plot_roc(curves: dict[str, Any], path: str | Path, title: str = "ROC") -> Path:
    """Draw ROC curves on a log-scale FPR axis (where low-FPR differences are visible) to a PNG file."""
    import numpy as np

    plt = _plt()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.2, 5))
    # the axis starts at one non-member's share: below it the data say nothing (it started at 1e-4 whatever n)
    n_neg = max((getattr(m, "n_neg", 0) for m in curves.values()), default=0)
    floor = 1.0 / n_neg if n_neg > 1 else 1e-4
    styles = ["-", "--", "-.", ":"]
    for i, (name, m) in enumerate(curves.items()):
        fpr, tpr = _linear_segments(np.asarray(m.fpr, float), np.asarray(m.tpr, float), floor)
        ax.plot(fpr, tpr, styles[i % len(styles)], label=f"{name} (AUC {m.auc:.3f})")
    grid = np.logspace(np.log10(floor), 0, 100)
    ax.plot(grid, grid, "k--", lw=0.8, label="chance")
    _log_scale(ax, "x")
    ax.set_xlim(floor, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("false positive rate (log scale, from 1 / non-members)")
    ax.set_ylabel("true positive rate")
    _title(ax, title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    tmp = p.with_name(p.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(p)
    return p
