"""Statistics of attack scores: ROC, AUC with a bootstrap CI, TPR at low FPR, attacker advantage.

Why TPR at low FPR: an attack that confidently identifies a few members matters more for privacy than
one that is slightly better than chance on everyone; AUC averages those two apart (Carlini et al.,
"Membership Inference Attacks From First Principles", 2022). Every result is oriented so that a
higher score means "member" (label 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_FPRS = (0.01, 0.001)
# Below this many times 1/FPR non-members, the bootstrap interval of a TPR at that FPR undercovers: its
# threshold is one of the few highest non-member scores, an extreme the bootstrap cannot resample well
# (docs/attacks.md: 68-86% at 1x, 90-95% at 3x, simulated)
FEW_NEGATIVES = 3
#: fewer bootstrap resamples than this and an interval's ends are mostly Monte Carlo noise: warned
FEW_RESAMPLES = 200
# A class of fewer items than this, against one at least LOPSIDED times larger, leaves the AUC's bootstrap
# interval short: the few items' resamples are nearly all its variance (5 members vs 100 non-members covered
# 83-89%, 2 vs 1,000 49-53%, simulated in docs/attacks.md; one item is never varied at all), so the worst-case
# interval stands in
SMALL_CLASS = 20
LOPSIDED = 10


@dataclass
class RocMetrics:
    """ROC summary of one score list against binary labels (1 = member, higher score = member)."""

    auc: float
    auc_ci: tuple[float, float]
    tpr_at_fpr: dict[float, float | None]  # None: fewer than 1/FPR non-members, so that FPR is not resolved
    advantage: float
    fpr: np.ndarray
    tpr: np.ndarray
    n_pos: int
    n_neg: int
    warnings: list[str] = field(default_factory=list)
    #: the bootstrap interval of each resolved TPR at FPR (None where unresolved or without bootstrap)
    tpr_ci: dict[float, tuple[float, float] | None] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The documented shape (docs/attacks.md): tpr_at_fpr keys are the FPRs as strings ("0.01", "0.001"),
        values null where too few non-members resolve that FPR (`tpr_needs_nonmembers` says how many);
        `tpr_ci` holds their intervals alike."""
        ci = None if any(math.isnan(x) for x in self.auc_ci) else list(self.auc_ci)  # no bootstrap: null
        return {"auc": self.auc, "auc_ci": ci,
                "tpr_at_fpr": {_fpr_key(f): v for f, v in self.tpr_at_fpr.items()},
                "tpr_ci": {_fpr_key(f): (list(c) if (c := self.tpr_ci.get(f)) else None) for f in self.tpr_at_fpr},
                "tpr_needs_nonmembers": {_fpr_key(f): needed_negatives(f) for f in self.tpr_at_fpr},
                "advantage": self.advantage, "n_members": self.n_pos, "n_nonmembers": self.n_neg,
                "warnings": list(self.warnings)}


def _fpr_key(f: float) -> str:
    return repr(float(f))


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"scores and labels must be 1-D of equal length (got {s.shape} and {y.shape})")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (non-member) or 1 (member)")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    y = y.astype(int)
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError("need at least one member and one non-member")
    return s, y


def needed_negatives(fpr: float) -> int:
    """Non-members needed before a false-positive rate `fpr` is resolved at all (one false positive = 1/n)."""
    return math.ceil(1 / fpr - 1e-9)


def tpr_text(value: float | None, needed: int | None, unit: str = "non-members", digits: int = 3,
             ci: Sequence[float] | None = None) -> str:
    """A TPR at low FPR as the report and CLI show it, with its interval when there is one ('0.112 [0.044,
    0.212]'); 'n/a (needs ≥ N non-members)' when not resolved."""
    if value is None:
        return f"n/a (needs ≥ {needed} {unit})" if needed else "n/a"
    return f"{value:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Highest TPR over thresholds whose FPR does not exceed `target` (no interpolation)."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def roc_metrics(scores: Sequence[float], labels: Sequence[int], n_bootstrap: int = 1000, seed: int = 0,
                fprs: Sequence[float] = DEFAULT_FPRS, ci: float = 0.95, negatives: str = "non-members") -> RocMetrics:
    """ROC curve, AUC with a BCa bootstrap CI (members and non-members resampled separately),
    TPR at each FPR in `fprs` with its percentile bootstrap CI from the same resamples (the threshold is
    re-chosen in each, so the interval carries its uncertainty too), and attacker advantage max_t (TPR - FPR).

    A TPR at FPR f needs at least 1/f non-members to mean anything; with fewer it is None and the result
    carries a warning, which names the negatives as `negatives` says ("non-member users" for user inference).
    When every resample gives the same AUC (a sample AUC of 1 or 0: perfect separation survives resampling),
    or one class is a handful of items against many (SMALL_CLASS, LOPSIDED), the bootstrap interval has no
    width or runs short; the worst case over score distributions stands in (`worst_case_auc_interval`).
    """
    from sklearn.metrics import roc_curve

    s, y = _check(scores, labels)
    if bad := [f for f in fprs if not 0 < f < 1]:
        raise ValueError(f"false-positive rates must lie strictly between 0 and 1 (got {bad[0]})")
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    # by ranks, as every resample's: sklearn's trapezoid sum gave 0.9999999999999999 for some perfectly separated
    # scores with ties, which missed the AUC-1 check below and left the interval [1, 1]
    auc = float(_auc_by_ranks(s[y == 1][None], s[y == 0][None])[0])
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    warnings = [f"only {n_neg} {negatives}: TPR at FPR {f:g} needs at least {needed_negatives(f)} to be resolved"
                for f in fprs if n_neg < needed_negatives(f)]
    resolved = [float(f) for f in fprs if n_neg >= needed_negatives(f)]
    warnings += [f"only {n_neg} {negatives}: the interval of TPR at FPR {f:g} is too narrow below about "
                 f"{FEW_NEGATIVES * needed_negatives(f)} (it covered 68-86% of true values at "
                 f"{needed_negatives(f)}, simulated)"
                 for f in resolved if n_neg < FEW_NEGATIVES * needed_negatives(f) and n_bootstrap > 0]
    if 0 < n_bootstrap < FEW_RESAMPLES:
        warnings.append(f"only {n_bootstrap} bootstrap resamples: the interval's ends move from seed to seed "
                        f"(use {FEW_RESAMPLES} or more)")
    tprs = {float(f): tpr_at_fpr(fpr, tpr, f) if float(f) in resolved else None for f in fprs}
    lo = hi = float("nan")
    tpr_ci: dict[float, tuple[float, float] | None] = {float(f): None for f in fprs}
    if n_bootstrap > 0:
        (lo, hi), boot_tprs = _bootstrap_roc(s, y, n_bootstrap, seed, ci, resolved)
        tpr_ci.update(boot_tprs)
        k, other = min(n_pos, n_neg), max(n_pos, n_neg)
        if auc in (0.0, 1.0) or np.ptp(s) == 0:  # every resample repeats the AUC: the percentile CI has no width
            lo, hi = worst_case_auc_interval(auc, n_pos, n_neg, ci)
            warnings.append(f"AUC {auc:.3g} (perfect separation, or every score alike) is the same on every "
                            "resample: its interval is the worst case over score distributions")
        elif k == 1 or (k < SMALL_CLASS and other >= LOPSIDED * k):
            lo, hi = worst_case_auc_interval(auc, n_pos, n_neg, ci)
            few = negatives.replace("non-member", "member") if n_pos == k else negatives
            warnings.append(f"only {k} {few if k > 1 else few.removesuffix('s')} against {other}: a bootstrap "
                            "interval of the AUC runs short with one class this small, so its interval is the "
                            "worst case over score distributions (wide)")
        for f, (t_lo, t_hi) in boot_tprs.items():
            if t_lo == t_hi:  # e.g. every member above every non-member: TPR 1 on every resample
                tpr_ci[f] = binomial_ci(round(tprs[f] * n_pos), n_pos, 1 - ci)
                warnings.append(f"TPR at FPR {f:g} is the same on every resample: its interval is the exact "
                                "binomial one over the members (the threshold's own uncertainty left out)")
    return RocMetrics(auc=auc, auc_ci=(lo, hi), tpr_at_fpr=tprs,
                      advantage=float(np.max(tpr - fpr)), fpr=fpr, tpr=tpr, n_pos=n_pos, n_neg=n_neg,
                      warnings=warnings, tpr_ci=tpr_ci)


def worst_case_auc_interval(auc: float, n_pos: int, n_neg: int, ci: float = 0.95) -> tuple[float, float]:
    """An AUC interval that holds whatever the score distributions, for where the bootstrap's cannot: it has
    no width (every resample repeats the AUC) or one class is a handful against many (SMALL_CLASS). At AUC 1
    (0 alike) the exact bound: k = min(n_pos, n_neg) disjoint member/non-member pairs are independent and each
    ordered right with probability at most θ, so P(AUC = 1) ≤ θ^k and the lower end is ((1 − ci)/2)^(1/k):
    0.025 at 1 per class, 0.69 at 10, 0.96 at 100 (the normal form below gave 0.21 at 1 per class, where 1 vs
    1 separates with probability θ itself). Otherwise the AUCs θ with (AUC − θ)² ≤ z²·θ(1 − θ)/k, the largest
    variance any score distributions allow (Birnbaum & McCarty 1956), in Wilson's form: it covered 99-100% of
    true AUCs 0.64-0.98 with 1-19 items against 100-1,000 (simulated, docs/attacks.md)."""
    from scipy.stats import norm

    k = min(n_pos, n_neg)
    if auc in (0.0, 1.0):
        end = ((1 - ci) / 2) ** (1 / k)
        return (end, 1.0) if auc == 1.0 else (0.0, 1 - end)
    z2 = float(norm.ppf(1 - (1 - ci) / 2)) ** 2
    a, b, c = k + z2, -(2 * auc * k + z2), k * auc * auc
    root = math.sqrt(max(b * b - 4 * a * c, 0.0))
    lo, hi = max(0.0, (-b - root) / (2 * a)), min(1.0, (-b + root) / (2 * a))
    return (0.0 if auc <= 0 else lo), (1.0 if auc >= 1 else hi)  # the observed end exactly, not 1 - 2e-16


def _auc_by_ranks(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUC of many resamples at once (rows), by the Mann-Whitney U statistic with tie-averaged ranks."""
    from scipy.stats import rankdata

    both = np.concatenate([pos, neg], axis=1)
    ranks = rankdata(both, axis=1)
    n_pos, n_neg = pos.shape[1], neg.shape[1]
    u = ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def _tpr_rows(pos: np.ndarray, neg: np.ndarray, fpr: float) -> np.ndarray:
    """`tpr_at_fpr` of many resamples at once (rows): the share of members scoring above the non-member
    score that the threshold must exceed to let at most floor(fpr · n) non-members through."""
    allowed = math.floor(fpr * neg.shape[1] + 1e-9)
    if allowed >= neg.shape[1]:
        return np.ones(pos.shape[0])
    threshold = -np.partition(-neg, allowed, axis=1)[:, allowed]  # the (allowed + 1)-th highest
    return (pos > threshold[:, None]).mean(axis=1)


def _bootstrap_roc(scores: np.ndarray, labels: np.ndarray, n_bootstrap: int, seed: int, ci: float,
                   fprs: Sequence[float]) -> tuple[tuple[float, float], dict[float, tuple[float, float]]]:
    """Intervals of the AUC (BCa) and of the TPR at each FPR in `fprs` (percentile), from the same resamples
    (members and non-members resampled separately)."""
    rng = np.random.default_rng(seed)
    # sorted: the resamples (and so the interval) depend on the seed and the scores, not the input's order
    pos, neg = np.sort(scores[labels == 1]), np.sort(scores[labels == 0])
    aucs, tprs = [], {f: [] for f in fprs}
    rows = max(1, 2_000_000 // max(len(scores), 1))  # bounded memory per chunk
    for start in range(0, n_bootstrap, rows):
        n = min(rows, n_bootstrap - start)
        p = pos[rng.integers(0, len(pos), size=(n, len(pos)))]
        q = neg[rng.integers(0, len(neg), size=(n, len(neg)))]
        aucs.append(_auc_by_ranks(p, q))
        for f in fprs:
            tprs[f].append(_tpr_rows(p, q, f))
    return (_bca_auc_interval(pos, neg, np.concatenate(aucs), ci),
            {f: tuple(_percentile_ci(np.concatenate(v), ci)) for f, v in tprs.items()})


def _bca_auc_interval(pos: np.ndarray, neg: np.ndarray, boot: np.ndarray, ci: float) -> tuple[float, float]:
    """Efron's bias-corrected and accelerated interval of the AUC from its bootstrap values `boot`. Why not the
    plain percentile interval: near a ceiling the AUC's bootstrap distribution is skewed and the percentile
    interval runs short (0.89 coverage at a true AUC of 0.99 with 100 per class, simulated; BCa 0.94). The
    acceleration comes from the jackknife, each leave-one-out AUC from placement values (no refitting)."""
    from scipy.stats import norm, rankdata

    n_pos, n_neg = len(pos), len(neg)
    ranks = rankdata(np.concatenate([pos, neg]))
    below = ranks[:n_pos] - rankdata(pos)               # per member: non-members below it (ties count half)
    above = n_pos - (ranks[n_pos:] - rankdata(neg))     # per non-member: members above it (ties count half)
    u = below.sum()
    auc = u / (n_pos * n_neg)
    loo = np.concatenate([(u - below) / max((n_pos - 1) * n_neg, 1), (u - above) / max(n_pos * (n_neg - 1), 1)])
    if n_pos < 2 or n_neg < 2:  # no jackknife: no acceleration
        loo = np.full(1, auc)
    d = loo.mean() - loo
    spread = float((d ** 2).sum())
    accel = float((d ** 3).sum()) / (6 * spread ** 1.5) if spread > 0 else 0.0
    share = float((boot < auc).mean() + 0.5 * (boot == auc).mean())
    z0 = float(norm.ppf(min(max(share, 1e-6), 1 - 1e-6)))
    alpha = (1 - ci) / 2

    def end(z: float) -> float:
        return float(np.quantile(boot, norm.cdf(z0 + (z0 + z) / (1 - accel * (z0 + z)))))

    return end(float(norm.ppf(alpha))), end(float(norm.ppf(1 - alpha)))


def _auc_rows(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUC of each row of `scores` against the same row of `labels` (class sizes may differ by row; a row
    with one class gives NaN), by tie-averaged ranks."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=1)
    n_pos = labels.sum(axis=1).astype(np.float64)
    n_neg = labels.shape[1] - n_pos
    u = (ranks * labels).sum(axis=1) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def _bounded_away_from_zero(values: np.ndarray, level: float) -> bool:
    """Whether the central `level` share of a statistic's resampled values keeps one sign. A relative change
    divides by the baseline's statistic: where that could be 0, the ratio is unbounded and its interval
    meaningless (a baseline mean of 0.001 made a +5000% point beside a [+1%, +146%] interval)."""
    ends = _percentile_ci(values, level)
    return ends is not None and (ends[0] > 0 or ends[1] < 0)


def _percentile_ci(values: np.ndarray, ci: float, keep_infinite: bool = False) -> list[float] | None:
    values = values[~np.isnan(values)] if keep_infinite else values[np.isfinite(values)]
    if values.size == 0:
        return None
    alpha = (1 - ci) / 2
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]


def paired_difference(values_a: Sequence[float], values_b: Sequence[float], labels: Sequence[int] | None = None,
                      n_bootstrap: int = 1000, seed: int = 0, ci: float = 0.95,
                      clusters: Sequence[object] | None = None, weights: Sequence[float] | None = None) -> dict:
    """stat(b) − stat(a) on the same items (two models scored on the same texts, targets or users), with a
    paired percentile bootstrap: each resample draws items once and computes both statistics on it, so what
    the two share (which items are easy) cancels. stat is the AUC against `labels` when they are given (members
    and non-members resampled separately, as `roc_metrics` resamples them: the two groups' sizes are the
    design's, not drawn), else the mean. `clusters` (one key per item, e.g. the target of
    a target x template row) makes the resampling unit the cluster: its items are drawn together. `weights`
    (one per item, with `clusters` only) make the mean a weighted one, on the data and on every resample:
    e.g. each cell of a grid counted once however many targets it holds.

    A mean's interval is Hesterberg's expanded percentile interval: the quantiles are moved out so that it
    has a t-interval's width for the number of units n (z = sqrt(n / (n - 1)) t(n - 1)), because the plain
    percentile interval is too narrow below ~30 units (simulated here: a direction claimed for a zero
    difference 10% of the time at 10 units, 5.5% expanded, nominal 5%).

    The relative change is delta / |stat(a)| (so its sign is the delta's, also for a negative log p), its
    interval computed per resample; both None when stat(a) is 0, or could be (its resampled values' central
    `ci` share does not keep one sign: a ratio to a value near 0 is unbounded, its interval meaningless).
    Returns {value_a, value_b, delta, ci, relative, relative_ci, n, n_bootstrap (resamples used)} (ci and
    relative_ci None without resamples).
    """
    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"values must be 1-D of equal length (got {a.shape} and {b.shape})")
    for name, v in (("values_a", a), ("values_b", b)):  # a NaN made the delta NaN and every resample dropped
        if not np.isfinite(v).all():
            raise ValueError(f"{name}: {int((~np.isfinite(v)).sum())} values are NaN or infinite")
    y = None
    if labels is not None:
        a, y = _check(a, labels)
        b, _ = _check(b, labels)
    if y is not None and clusters is not None:
        raise ValueError("clusters are for means; an AUC resamples single items")
    if clusters is not None and len(clusters) != len(a):  # numpy's broadcast error named no argument
        raise ValueError(f"clusters: one key per item expected ({len(a)} items), got {len(clusters)}")
    if weights is not None and (clusters is None or len(weights) != len(a)):
        raise ValueError("weights: one per item, and clusters with them")
    iw = np.ones(len(a)) if weights is None else np.asarray(weights, dtype=np.float64)
    if clusters is None:
        # items sorted by their values: the resamples depend on the seed and the data, not the items' order;
        # by (min, max) of the pair first, so that b against a mirrors a against b (but for pairs that tie
        # on both and differ only in which side holds which value)
        keys = (b, a, np.maximum(a, b), np.minimum(a, b))
        order = np.lexsort(keys if y is None else (*keys, y))
        a, b, y = a[order], b[order], None if y is None else y[order]
        groups = np.arange(len(a))
    else:
        _, groups = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    n_groups = int(groups.max()) + 1 if len(a) else 0
    if y is None:
        value_a, value_b = ((float((iw * a).sum() / iw.sum()), float((iw * b).sum() / iw.sum())) if len(a)
                            else (math.nan, math.nan))
    else:
        value_a, value_b = (float(v) for v in _auc_rows(np.stack([a, b]), np.stack([y, y])))
    rng = np.random.default_rng(seed)
    sa, sb = [], []
    rows = max(1, 1_000_000 // max(len(a), 1))  # bounded memory per chunk
    strata = [np.flatnonzero(y == c) for c in (1, 0)] if y is not None else []
    for start in range(0, n_bootstrap if n_groups else 0, rows):
        size = min(rows, n_bootstrap - start)
        if y is not None:  # index rows, each group drawn within itself: an item drawn k times is k tied copies
            draw = np.concatenate([g[rng.integers(0, len(g), size=(size, len(g)))] for g in strata], axis=1)
            sa.append(_auc_rows(a[draw], y[draw]))
            sb.append(_auc_rows(b[draw], y[draw]))
            continue
        draw = rng.integers(0, n_groups, size=(size, n_groups))
        # weight rows: how often each item's cluster was drawn
        w = np.stack([np.bincount(d, minlength=n_groups) for d in draw])[:, groups].astype(np.float64) * iw
        sa.append((w * a).sum(axis=1) / w.sum(axis=1))
        sb.append((w * b).sum(axis=1) / w.sum(axis=1))
    ra = np.concatenate(sa) if sa else np.empty(0)
    rb = np.concatenate(sb) if sb else np.empty(0)
    d = rb - ra
    delta = value_b - value_a
    level = ci if y is not None else expanded_level(ci, n_groups)
    relative = relative_ci = None
    if value_a != 0 and math.isfinite(value_a) and (ra.size == 0 or _bounded_away_from_zero(ra, level)):
        relative = delta / abs(value_a)
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample with stat(a) = 0: ±inf (0 if d = 0)
            ratio = np.where(ra != 0, d / np.abs(ra), np.where(d == 0, 0.0, np.sign(d) * np.inf))
        relative_ci = _percentile_ci(ratio, level, keep_infinite=True)
        if relative_ci is not None and not all(map(math.isfinite, relative_ci)):
            relative = relative_ci = None
    return {"value_a": value_a, "value_b": value_b, "delta": delta, "ci": _percentile_ci(d, level),
            "relative": relative, "relative_ci": relative_ci, "n": len(a), "n_bootstrap": int(np.isfinite(d).sum())}


def bootstrap_ci(stat: Callable[[np.ndarray], float], n: int, seed: int, n_resamples: int = 1000,
                 ci: float = 0.95) -> list[float] | None:
    """Interval of a mean-like `stat(indices)` over n resampled units (e.g. targets): the expanded percentile
    interval of `paired_difference`. None without units, or when no resample gives a finite value."""
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, n)) for _ in range(n_resamples)], dtype=np.float64)
    return _percentile_ci(values, expanded_level(ci, n))


def expanded_level(ci: float, n: int) -> float:
    """The percentile level that gives a bootstrap distribution of a mean over n units the width of a
    t-interval at `ci` (Hesterberg 2015, "What teachers should know about the bootstrap", sec. 4.1)."""
    from scipy.stats import norm, t

    if n < 2:
        return ci
    z = math.sqrt(n / (n - 1)) * float(t.ppf(1 - (1 - ci) / 2, n - 1))
    return 1 - 2 * float(norm.cdf(-z))


def paired_auc_difference(scores_a: Sequence[float], scores_b: Sequence[float], labels: Sequence[int],
                          n_bootstrap: int = 1000, seed: int = 0, ci: float = 0.95) -> dict:
    """AUC(b) − AUC(a) on the same items (e.g. the same users attacked on two models) with a paired
    percentile bootstrap (`paired_difference` with labels: members and non-members resampled separately).

    Returns {delta, ci ([lo, hi], None without resamples), auc_a, auc_b, relative, relative_ci, n, n_pos,
    n_neg, n_bootstrap (used)}.
    """
    d = paired_difference(scores_a, scores_b, labels, n_bootstrap=n_bootstrap, seed=seed, ci=ci)
    n_pos = int(np.asarray(labels).sum())
    return {"delta": d["delta"], "ci": d["ci"], "auc_a": d["value_a"], "auc_b": d["value_b"],
            "relative": d["relative"], "relative_ci": d["relative_ci"], "n": d["n"], "n_pos": n_pos,
            "n_neg": d["n"] - n_pos, "n_bootstrap": d["n_bootstrap"]}


def spearman_with_ci(x: Sequence[float], y: Sequence[float], n_bootstrap: int = 1000, seed: int = 0,
                     ci: float = 0.95) -> dict:
    """Spearman rank correlation of paired values with a percentile bootstrap CI over pairs (resamples where
    either side is constant are skipped). {rho, ci, n}; rho None with fewer than 3 pairs or a constant side; ci
    None, with a `note`, when every resample gives the same ρ or more than (1 - ci) / 2 of them have a
    constant side (a few pairs give that side all its spread). NaN or infinite pairs are left out (n counts
    the rest)."""
    from scipy.stats import rankdata

    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length (got {xs.shape} and {ys.shape})")
    ok = np.isfinite(xs) & np.isfinite(ys)
    order = np.lexsort((ys[ok], xs[ok]))  # the resamples depend on the seed and the pairs, not their order
    xs, ys = xs[ok][order], ys[ok][order]
    n = len(xs)

    def rho_rows(px: np.ndarray, py: np.ndarray) -> np.ndarray:
        rx, ry = rankdata(px, axis=1), rankdata(py, axis=1)
        rx -= rx.mean(axis=1, keepdims=True)
        ry -= ry.mean(axis=1, keepdims=True)
        den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, (rx * ry).sum(axis=1) / den, np.nan)

    if n < 3:
        return {"rho": None, "ci": None, "n": n}
    rho = float(rho_rows(xs[None], ys[None])[0])
    if not math.isfinite(rho):
        return {"rho": None, "ci": None, "n": n}
    rng = np.random.default_rng(seed)
    rhos = []
    rows = max(1, 1_000_000 // n)
    for start in range(0, n_bootstrap, rows):
        idx = rng.integers(0, n, size=(min(rows, n_bootstrap - start), n))
        rhos.append(rho_rows(xs[idx], ys[idx]))
    values = np.concatenate(rhos) if rhos else np.array([])
    undefined = float(np.isnan(values).mean()) if len(values) else 0.0
    if undefined > (1 - ci) / 2:
        # resamples that leave out the few units giving one side its spread have no ρ; the interval over the
        # rest is conditioned on those units and can miss ρ itself (ρ 0.52, [0.53, 0.88] with one user of
        # ten differing): no interval
        return {"rho": rho, "ci": None, "n": n,
                "note": f"{undefined:.0%} of resamples have no spread on one side (a few of the {n} pairs give "
                        "it all): no interval"}
    interval = _percentile_ci(values, ci) if rhos else None
    if interval is not None and interval[0] == interval[1]:
        # every resample kept the ranks' order (pairs in perfect rank order): a zero-width interval would
        # claim a certainty that 5 such pairs cannot give; no interval instead
        return {"rho": rho, "ci": None, "n": n,
                "note": f"every resample gives ρ = {rho:.3g} (the {n} pairs are in perfect rank order): "
                        "no interval"}
    return {"rho": rho, "ci": interval, "n": n}


def binomial_ci(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided 1-alpha confidence interval of a proportion k/n."""
    from scipy.stats import beta

    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0 (got k={k}, n={n})")
    if not 0 < alpha < 1:  # alpha=2 gave the interval (1.0, 0.0)
        raise ValueError(f"alpha must be between 0 and 1 (got {alpha})")
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi
