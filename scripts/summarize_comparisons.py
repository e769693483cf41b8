"""Tables of a study's paired comparisons (summary.json `comparisons`) over its seeds, e.g. study 1
(leakaudit/resources/experiments/fake-privacy-cpu.yaml, or the demo).

Reads only each output dir's summary.json and prints Markdown: per evaluation and metric, one row per variant
with every seed's Δ [95% paired CI] → verdict and relative change, then the mean Δ over seeds and the largest
of the seeds' CI half-widths h (every seed detects a true |Δ| of 1.43 h with 80% power, one of h only about
half of the time); then the values behind them (baseline and variant).

    python scripts/summarize_comparisons.py out/fp-s0 out/fp-s1 out/fp-s2 > table.md
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def f(x, d=3):
    return "–" if x is None else f"{x:+.{d}f}" if d < 0 else f"{x:.{d}f}"


def signed(x, d=3):
    return "–" if x is None else f"{x:+.{d}f}"


def short_verdict(v: str) -> str:
    """The verdict without the interval's reading: "increase", "no detectable change", "too few targets"."""
    if ": too few " in v:
        return "too few " + v.split(": too few ")[1].split(" (")[0]
    return v.split(" (")[0].replace(" at this size", "")


def main(dirs: list[str]) -> None:
    runs = []
    for d in dirs:
        summary = json.loads((Path(d) / "summary.json").read_text())
        record = json.loads((Path(d) / "run.json").read_text())
        runs.append((record["experiment"]["seed"], summary["comparisons"]))
    seeds = [s for s, _ in runs]
    keys: dict[tuple[str, str], list[str]] = {}
    for _, comps in runs:
        for c in comps:
            variants = keys.setdefault((c["evaluation"], c["metric"]), [])
            if c["variant"] not in variants:
                variants.append(c["variant"])
    print(f"Paired difference against each evaluation's baseline per seed (seeds {', '.join(map(str, seeds))}): "
          "Δ [95% paired bootstrap CI] (relative change) → verdict.\n")
    for (evaluation, metric), variants in keys.items():
        baselines = sorted({c["baseline"] for _, comps in runs for c in comps
                            if (c["evaluation"], c["metric"]) == (evaluation, metric)})
        print(f"**{evaluation}: {metric}** (against {', '.join(f'`{b}`' for b in baselines)})\n")
        print("| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean Δ over seeds (SD) | largest CI half-width |")
        print("|---|" + "---|" * len(seeds) + "---|---|")
        for v in variants:
            cells, deltas, halves = [], [], []
            for _, comps in runs:
                c = next((c for c in comps if (c["evaluation"], c["metric"], c["variant"]) == (evaluation, metric, v)),
                         None)
                if c is None or c.get("delta") is None:
                    cells.append("–")
                    continue
                rel = "" if c.get("relative") is None else f" ({c['relative'] * 100:+.0f}%)"
                ci = c.get("delta_ci") or c.get("ci") or [None, None]
                cells.append(f"{signed(c['delta'])} [{signed(ci[0])}, {signed(ci[1])}]{rel} → "
                             f"{short_verdict(c['verdict'])}")
                deltas.append(c["delta"])
                if ci[0] is not None:  # from the bounds: summaries before 2026-12-05 kept the half-width
                    halves.append((ci[1] - ci[0]) / 2)  # as detectable_effect, later ones 1.43 x it
            sd = f" ({statistics.stdev(deltas):.3f})" if len(deltas) > 1 else ""
            mean = f"{statistics.mean(deltas):+.3f}{sd}" if deltas else "–"
            print(f"| {v} | " + " | ".join(cells) + f" | {mean} | {f(max(halves)) if halves else '–'} |")
        print()
    print("Values behind the differences (baseline → variant), per seed:\n")
    print("| evaluation | metric | variant | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|---|---|" + "---|" * len(seeds))
    for (evaluation, metric), variants in keys.items():
        for v in variants:
            cells = []
            for _, comps in runs:
                c = next((c for c in comps if (c["evaluation"], c["metric"], c["variant"]) == (evaluation, metric, v)),
                         None)
                cells.append("–" if c is None or c.get("value_baseline", c.get("auc_baseline")) is None
                             else f"{c.get('value_baseline', c.get('auc_baseline')):.3f} → {c.get('value_variant', c.get('auc_variant')):.3f}")
            print(f"| {evaluation} | {metric} | {v} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
