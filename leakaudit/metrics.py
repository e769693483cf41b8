"""Statistics of attack scores: ROC, AUC with a bootstrap CI, TPR at low FPR, attacker advantage.

Why TPR at low FPR: an attack that confidently identifies a few members matters more for privacy than
one that is slightly better than chance on everyone; AUC averages those two apart (Carlini et al.,
"Membership Inference Attacks From First Principles", 2022). Every result is oriented so that a
higher score means "member" (label 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_FPRS = (0.01, 0.001)


@dataclass
class RocMetrics:
    """ROC summary of one score list against binary labels (1 = member, higher score = member)."""

    auc: float
    auc_ci: tuple[float, float]
    tpr_at_fpr: dict[float, float]
    advantage: float
    fpr: np.ndarray
    tpr: np.ndarray
    n_pos: int
    n_neg: int
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """The documented shape (docs/attacks.md): tpr_at_fpr keys are the FPRs as strings ("0.01", "0.001")."""
        ci = None if any(math.isnan(x) for x in self.auc_ci) else list(self.auc_ci)  # no bootstrap: null
        return {"auc": self.auc, "auc_ci": ci,
                "tpr_at_fpr": {_fpr_key(f): v for f, v in self.tpr_at_fpr.items()},
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


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Highest TPR over thresholds whose FPR does not exceed `target` (no interpolation)."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def roc_metrics(scores: Sequence[float], labels: Sequence[int], n_bootstrap: int = 1000, seed: int = 0,
                fprs: Sequence[float] = DEFAULT_FPRS, ci: float = 0.95) -> RocMetrics:
    """ROC curve, AUC with a percentile bootstrap CI (members and non-members resampled separately),
    TPR at each FPR in `fprs`, and attacker advantage max_t (TPR - FPR).

    A TPR at FPR f needs at least 1/f non-members to mean anything; with fewer the result carries a warning.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    s, y = _check(scores, labels)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    auc = float(roc_auc_score(y, s))
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    warnings = [f"only {n_neg} non-members: TPR at FPR {f:g} needs at least {math.ceil(1 / f)} to be resolved"
                for f in fprs if n_neg < math.ceil(1 / f - 1e-9)]
    lo, hi = bootstrap_auc_ci(s, y, n_bootstrap, seed, ci) if n_bootstrap > 0 else (float("nan"), float("nan"))
    return RocMetrics(auc=auc, auc_ci=(lo, hi), tpr_at_fpr={float(f): tpr_at_fpr(fpr, tpr, f) for f in fprs},
                      advantage=float(np.max(tpr - fpr)), fpr=fpr, tpr=tpr, n_pos=n_pos, n_neg=n_neg,
                      warnings=warnings)


def _auc_by_ranks(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUC of many resamples at once (rows), by the Mann-Whitney U statistic with tie-averaged ranks."""
    from scipy.stats import rankdata

    both = np.concatenate([pos, neg], axis=1)
    ranks = rankdata(both, axis=1)
    n_pos, n_neg = pos.shape[1], neg.shape[1]
    u = ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def bootstrap_auc_ci(scores: np.ndarray, labels: np.ndarray, n_bootstrap: int = 1000, seed: int = 0,
                     ci: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC, resampling members and non-members separately."""
    rng = np.random.default_rng(seed)
    pos, neg = scores[labels == 1], scores[labels == 0]
    aucs = []
    rows = max(1, 2_000_000 // max(len(scores), 1))  # bounded memory per chunk
    for start in range(0, n_bootstrap, rows):
        n = min(rows, n_bootstrap - start)
        p = pos[rng.integers(0, len(pos), size=(n, len(pos)))]
        q = neg[rng.integers(0, len(neg), size=(n, len(neg)))]
        aucs.append(_auc_by_ranks(p, q))
    all_aucs = np.concatenate(aucs)
    alpha = (1 - ci) / 2
    return float(np.quantile(all_aucs, alpha)), float(np.quantile(all_aucs, 1 - alpha))


def binomial_ci(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided 1-alpha confidence interval of a proportion k/n."""
    from scipy.stats import beta

    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0 (got k={k}, n={n})")
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def plot_roc(curves: dict[str, RocMetrics], path: str | Path, title: str = "ROC") -> Path:
    """Draw ROC curves on a log-scale FPR axis (where low-FPR differences are visible) to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    floor = 1e-4
    for name, m in curves.items():
        ax.plot(np.clip(m.fpr, floor, 1), m.tpr, label=f"{name} (AUC {m.auc:.3f})")
    grid = np.logspace(-4, 0, 100)
    ax.plot(grid, grid, "k--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("false positive rate (log scale)")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = p.with_name(p.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(p)
    return p
