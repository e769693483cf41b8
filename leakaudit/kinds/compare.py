"""Paired comparisons between the targets of one evaluation: every target against the one its `compare_to`
option names (e.g. each fine-tune against the model it started from, or each mitigation against none).

Why paired: two models scored on the same texts, targets or users share most of their variance (which items
are easy); resampling the items once and computing both models' statistics on every resample cancels it, so
the interval of the difference is far narrower than two separate intervals would suggest. A verdict claims
a direction only when that interval excludes 0 and there are enough resampling units for the interval to be
trusted (MIN_UNITS for a mean, MIN_PER_LABEL of each label for an AUC: with fewer, a percentile bootstrap has
no room to cover its nominal 95%, e.g. one item gives a zero-width interval); otherwise it says how large an
effect the interval still allows (its far end from 0), which is what "no change" means at this sample size.
Each row also carries `detectable_effect`: the true |Δ| this design detects 80% of the time at the 5% level,
(z(0.975) + z(0.8)) / z(0.975) ≈ 1.43 times the CI half-width (normal approximation); an effect as large as
the half-width itself is detected only about half of the time.

A kind supplies, per finished stage, its per-item values as `Series` (one per metric); `comparisons` pairs
them and returns the rows summary.json lists and the report's verdict section reads (see Result.comparisons).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from leakaudit.kinds.base import StageView

#: verdict wording: "change" (a fine-tune against its base: study 1), "effect" (a mitigation against none)
Style = Literal["change", "effect"]
_WORDS = {"change": ("decrease", "increase", "no detectable change at this size"),
          "effect": ("reduces", "increases", "no detectable effect")}
#: fewest resampling units (items, or clusters when items cluster) for a mean's verdict to claim a direction
MIN_UNITS = 10
#: fewest items of each label for an AUC's verdict to claim a direction
MIN_PER_LABEL = 5
#: detectable effect at 80% power, two-sided 5%, per CI half-width: (z(0.975) + z(0.8)) / z(0.975)
POWER_80 = (1.959964 + 0.841621) / 1.959964


@dataclass
class Series:
    """One metric's per-item values on one target: item key -> value. With `labels`, the statistic is the
    AUC of the values against them (items are pairs only when both targets give the same label); else the
    mean. `cluster` maps an item key to its resampling unit (e.g. a target x template row to its target);
    `items` names the resampling units ("texts", "targets", "users") in verdicts."""

    metric: str
    values: dict[Hashable, float]
    labels: dict[Hashable, int] | None = None
    cluster: Callable[[Hashable], Hashable] | None = None
    items: str = "items"
    extra: dict[str, Any] = field(default_factory=dict)  # copied into each comparison row (e.g. {"m": "all"})
    #: the values are log-probabilities (nats): Δ of their mean is the log of a likelihood ratio, so a row
    #: also gives e^Δ, "the variant finds the text e^Δ times as likely" (geometric mean over items), which
    #: reads better than a percent of a log p
    log_scale: bool = False
    #: item key -> weight in the mean (with `cluster`), e.g. 1 / its cell's targets, so that the mean over a
    #: grid's target x cell items is the mean of the cells' rates when cells hold different targets
    weights: dict[Hashable, float] | None = None


def unique(rows: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Hashable]) -> dict[Hashable, dict[str, Any]]:
    """Rows by key, leaving out every key that occurs twice: an ambiguous item (e.g. two ids that masking
    made equal) cannot be paired."""
    out: dict[Hashable, dict[str, Any]] = {}
    twice: set[Hashable] = set()
    for r in rows:
        k = key(r)
        if k in out:
            twice.add(k)
        out[k] = r
    return {k: r for k, r in out.items() if k not in twice}


def target_key(rows: list[dict[str, Any]]) -> Callable[[dict[str, Any]], tuple[Any, Any]]:
    """Who a PII row is about: its (masked) `target` id, with its `target_index` only where masking made
    several targets' ids alike. Rows written before `target_index` existed keep pairing by id with new ones
    (a stage cached from then, beside one run now), and their alike ids stay ambiguous, as before."""
    positions: dict[Any, set[Any]] = {}
    for r in rows:
        positions.setdefault(r.get("target"), set()).add(r.get("target_index"))
    alike = {t for t, seen in positions.items() if len(seen - {None}) > 1}
    return lambda r: (r.get("target_index") if r.get("target") in alike else None, r.get("target"))


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ----------------------------------------------------------------------------------------- verdicts
#: a [0, 0] interval: both at a ceiling or floor (AUC 1 for both, no hit by either) on every resample, which
#: says nothing of how large a change this size could miss (both AUCs at 1 on 5 + 5 texts: a true +0.09 reads
#: like this a third of the time) — so not "no change"
ZERO_WIDTH = "no detectable change at this size (Δ is 0 on every resample: the interval cannot bound an effect)"


NO_VERDICT = "no verdict: "  # how a verdict withheld for too few units begins


def verdict(ci: list[float] | None, style: Style = "change", too_few: str | None = None) -> str:
    """What a paired difference's interval supports: a direction only when it excludes 0 (and `too_few`, the
    reason the units are too few to trust it, is None); otherwise how large an effect it still allows."""
    down, up, none = _WORDS[style]
    if not ci:
        return "no CI (n_bootstrap = 0 or no usable resample)"
    lo, hi = ci
    if too_few is not None:  # not "no detectable change": the interval may well exclude 0
        return f"{NO_VERDICT}{too_few}"
    if hi < 0:
        return down
    if lo > 0:
        return up
    if lo == hi == 0:  # e.g. both AUCs at 1, or no extraction by either: not evidence that the change is 0
        return ZERO_WIDTH
    return f"{none} (the CI allows |Δ| up to {max(abs(lo), abs(hi)):.3g})"


def direction(verdict_text: Any) -> str:
    """'increase', 'decrease' or 'none': what a comparison's verdict claims, read from verdict()'s own wording
    in either style (asked of it, so a rewording cannot silently change it). A verdict that its units are too
    few for claims none, whatever its interval."""
    for style in get_args(Style):
        if verdict_text == verdict([0.5, 1.0], style):
            return "increase"
        if verdict_text == verdict([-1.0, -0.5], style):
            return "decrease"
    return "none"


def too_few_units(n_units: int, n_pos: int | None = None, n_neg: int | None = None, items: str = "items") -> str | None:
    """Why a comparison has too few resampling units for its interval to claim a direction, or None."""
    if n_pos is not None and n_neg is not None:
        if min(n_pos, n_neg) < MIN_PER_LABEL:
            return f"too few {items} ({n_pos} members, {n_neg} non-members; a verdict needs {MIN_PER_LABEL} of each)"
        return None
    if n_units < MIN_UNITS:
        return f"too few {items} ({n_units}; a verdict needs {MIN_UNITS})"
    return None


# ----------------------------------------------------------------------------------------- stages
def by_evaluation(stages: list[StageView]) -> dict[str, list[StageView]]:
    groups: dict[str, list[StageView]] = {}
    for s in stages:
        groups.setdefault(s.evaluation, []).append(s)
    return groups


def option(s: StageView, name: str) -> Any:
    """An option of the stage: from its result, else from the options the plan gave it."""
    if name in s.result:
        return s.result[name]
    return (s.record.get("params", {}).get("options") or {}).get(name)


def baseline(group: list[StageView]) -> tuple[StageView | None, str | None]:
    """The stage `compare_to` names in one evaluation, or a note saying why there is none."""
    wanted = next((v for v in (option(s, "compare_to") for s in group) if v), None)
    if wanted is None:
        return None, None
    for s in group:
        if s.target == wanted:
            return s, None
    return None, (f"compare_to '{wanted}' names no finished target of evaluation '{group[0].evaluation}' "
                  f"(finished: {', '.join(s.target for s in group)}); no comparison drawn.")


def notes(stages: list[StageView]) -> list[str]:
    """Why an evaluation with `compare_to` has no comparison (for the kind's section note)."""
    return [n for n in (baseline(g)[1] for g in by_evaluation(stages).values()) if n]


# ----------------------------------------------------------------------------------------- pairing
def compare(base: StageView, other: StageView, a: Series, b: Series, style: Style = "change") -> dict[str, Any]:
    """One comparison row: `b` (other's values) against `a` (base's) on the items both have, paired."""
    from leakaudit.metrics import paired_difference

    keys = [k for k, v in a.values.items() if finite(v) and finite(b.values.get(k))]
    if a.labels is not None:
        keys = [k for k in keys if a.labels.get(k) in (0, 1) and (b.labels or {}).get(k) == a.labels[k]]
    entry: dict[str, Any] = {"evaluation": base.evaluation, "metric": a.metric, "baseline": base.target,
                             "variant": other.target, **a.extra, "value_baseline": None, "value_variant": None,
                             "delta": None, "delta_ci": None, "ci": None, "relative": None, "relative_ci": None,
                             "n": len(keys), "ci_half_width": None, "detectable_effect": None}
    if a.log_scale:
        entry.update(likelihood_ratio=None, likelihood_ratio_ci=None)
    labels = [int(a.labels[k]) for k in keys] if a.labels is not None else None
    if labels is not None:
        n_pos = sum(labels)
        entry.update(n_pos=n_pos, n_neg=len(keys) - n_pos)
        if n_pos == 0 or n_pos == len(keys):
            return {**entry, "verdict": f"not comparable: the two targets share no {a.items} of both groups"}
    elif not keys:
        return {**entry, "verdict": f"not comparable: the two targets share no {a.items}"}
    clusters = [a.cluster(k) for k in keys] if a.cluster is not None else None
    if clusters is not None:
        entry["n_units"] = len(set(clusters))
    too_few = (too_few_units(len(keys), entry["n_pos"], entry["n_neg"], a.items) if labels is not None
               else too_few_units(entry.get("n_units", len(keys)), items=a.items))
    n_boot, seed = option(base, "n_bootstrap"), option(base, "seed")
    d = paired_difference([a.values[k] for k in keys], [b.values[k] for k in keys], labels,
                          n_bootstrap=1000 if n_boot is None else int(n_boot), seed=0 if seed is None else int(seed),
                          clusters=clusters, weights=[a.weights[k] for k in keys] if a.weights is not None else None)
    ci = d["ci"]
    half = (ci[1] - ci[0]) / 2 if ci else None
    # no power statement where the verdict cannot claim a direction anyway (too few units) or the interval
    # has no width (it bounds nothing: "0 detected with 80% power" would be false)
    detectable = None if half is None or half == 0 or too_few is not None else POWER_80 * half
    if a.log_scale:
        entry.update(likelihood_ratio=math.exp(d["delta"]), likelihood_ratio_ci=[math.exp(x) for x in ci] if ci else None)
    return {**entry, "value_baseline": d["value_a"], "value_variant": d["value_b"], "delta": d["delta"],
            "delta_ci": ci, "ci": ci, "relative": d["relative"], "relative_ci": d["relative_ci"],
            "n_bootstrap": d["n_bootstrap"], "ci_half_width": half,
            "detectable_effect": detectable, "verdict": verdict(ci, style, too_few)}


def comparisons(stages: list[StageView], series: Callable[[StageView, StageView], list[Series]],
                style: Style = "change") -> list[dict[str, Any]]:
    """Per evaluation with `compare_to`: every other target against it, per metric both give.
    `series(stage, base)` is a stage's per-item values, read as the base stage says where that matters
    (e.g. at the base's headline m).

    Row keys: evaluation, metric, baseline, variant, value_baseline, value_variant, delta, delta_ci (also as
    `ci`), relative (delta / |value_baseline|), relative_ci, n (items paired), n_pos/n_neg (AUC), n_units
    (resampling units when items cluster), likelihood_ratio and likelihood_ratio_ci (e^Δ and its CI, for
    log-probability metrics only), ci_half_width, detectable_effect (the |Δ| detected with 80% power:
    POWER_80 x the half-width; None when the units are too few for a verdict or the interval has no width),
    verdict.
    """
    out = []
    for group in by_evaluation(stages).values():
        base, _ = baseline(group)
        if base is None:
            continue
        base_series = {x.metric: x for x in series(base, base)}
        for s in group:
            if s is base:
                continue
            for x in series(s, base):
                if x.metric in base_series:
                    out.append(compare(base, s, base_series[x.metric], x, style))
    return out
