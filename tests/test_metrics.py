"""Metrics against scikit-learn, SciPy's exact binomial test and hand-made score lists with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score, roc_curve

from leakaudit.metrics import (
    _auc_by_ranks,
    binomial_ci,
    paired_auc_difference,
    paired_difference,
    roc_metrics,
    spearman_with_ci,
    tpr_at_fpr,
    tpr_text,
)


def test_small_hand_made_list():
    # members 0.9 0.8 0.7 0.4, non-members 0.6 0.5 0.3 0.2 0.1: 18 of 20 pairs ordered -> AUC 0.9;
    # three members above every non-member -> TPR 0.75 at FPR 0; advantage max(0.75-0, 1-0.4) = 0.75.
    # Five non-members resolve no FPR below 20%: TPR at 1% and 0.1% are not numbers (None, shown "n/a").
    scores = [0.9, 0.8, 0.7, 0.4, 0.6, 0.5, 0.3, 0.2, 0.1]
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0]
    m = roc_metrics(scores, labels, n_bootstrap=200)
    assert m.auc == pytest.approx(0.9)
    assert m.tpr_at_fpr == {0.01: None, 0.001: None}
    assert tpr_at_fpr(m.fpr, m.tpr, 0.01) == pytest.approx(0.75)
    assert m.advantage == pytest.approx(0.75)
    assert (m.n_pos, m.n_neg) == (4, 5)
    assert len(m.warnings) == 2 and "only 5 non-members" in m.warnings[0]
    js = m.to_json()
    assert js["tpr_at_fpr"] == {"0.01": None, "0.001": None}
    assert js["tpr_needs_nonmembers"] == {"0.01": 100, "0.001": 1000}
    assert tpr_text(js["tpr_at_fpr"]["0.01"], 100, "non-member users") == "n/a (needs ≥ 100 non-member users)"
    assert tpr_text(0.25, 100) == "0.250"
    assert js["n_members"] == 4 and js["n_nonmembers"] == 5


def test_tpr_at_one_percent_hand_made():
    # 200 non-members scored 0..199; members: 10 above all, 20 with one non-member above (FPR 0.5%),
    # 30 with two above (FPR 1%), 40 with three above (FPR 1.5%) -> TPR@1% = 0.6, TPR@0.1% = 0.1.
    neg = list(range(200))
    pos = [1000.0] * 10 + [198.5] * 20 + [197.5] * 30 + [196.5] * 40
    m = roc_metrics(pos + neg, [1] * 100 + [0] * 200, n_bootstrap=200)
    assert m.tpr_at_fpr[0.01] == pytest.approx(0.6)
    assert tpr_at_fpr(m.fpr, m.tpr, 0.001) == pytest.approx(0.1)
    # 200 non-members resolve FPR 1% but not 0.1%
    assert m.tpr_at_fpr[0.001] is None
    assert len(m.warnings) == 2 and "TPR at FPR 0.001 needs at least 1000" in m.warnings[0]
    # and 200 < 3 x 100 non-members: the 1% interval undercovers there (simulated), which it says
    assert "interval of TPR at FPR 0.01 is too narrow below about 300" in m.warnings[1]
    assert len(roc_metrics(pos + neg, [1] * 100 + [0] * 200, n_bootstrap=0).warnings) == 1  # no interval


def test_matches_sklearn_on_random_scores_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    s = np.round(rng.normal(size=400) + 0.7 * y, 1)  # rounding makes ties
    m = roc_metrics(s, y, n_bootstrap=300)
    assert m.auc == pytest.approx(roc_auc_score(y, s))
    fpr, tpr, _ = roc_curve(y, s)
    assert m.tpr_at_fpr[0.01] == pytest.approx(tpr[fpr <= 0.01].max())
    assert m.advantage == pytest.approx(np.max(tpr - fpr))
    lo, hi = m.auc_ci
    assert lo < m.auc < hi and hi - lo < 0.2
    # the vectorised rank AUC used by the bootstrap equals sklearn's AUC
    pos, neg = s[y == 1][None, :], s[y == 0][None, :]
    assert _auc_by_ranks(pos, neg)[0] == pytest.approx(roc_auc_score(y, s))


def test_bootstrap_ci_narrows_with_more_data_and_is_seeded():
    rng = np.random.default_rng(2)
    small_y = np.r_[np.ones(20), np.zeros(20)]
    big_y = np.r_[np.ones(500), np.zeros(500)]
    small = roc_metrics(rng.normal(size=40) + small_y, small_y, n_bootstrap=500)
    big = roc_metrics(rng.normal(size=1000) + big_y, big_y, n_bootstrap=500)
    assert (big.auc_ci[1] - big.auc_ci[0]) < (small.auc_ci[1] - small.auc_ci[0])
    s = np.linspace(0, 1, 40)
    assert roc_metrics(s, small_y, seed=3).auc_ci == roc_metrics(s, small_y, seed=3).auc_ci


def test_bad_input_raises():
    with pytest.raises(ValueError, match="member and one non-member"):
        roc_metrics([1, 2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        roc_metrics([1, float("nan")], [1, 0])
    with pytest.raises(ValueError, match="labels"):
        roc_metrics([1, 2], [1, 2])


def test_tpr_at_fpr_without_any_point_below():
    assert tpr_at_fpr(np.array([0.5, 1.0]), np.array([0.7, 1.0]), 0.01) == 0.0


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (5, 10), (3, 1000), (37, 120)])
def test_clopper_pearson_matches_scipy_exact(k, n):
    lo, hi = binomial_ci(k, n)
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert lo == pytest.approx(ref.low, abs=1e-9) and hi == pytest.approx(ref.high, abs=1e-9)


def test_clopper_pearson_closed_forms():
    # k = 0: upper = 1 - (alpha/2)^(1/n); k = n: lower = (alpha/2)^(1/n)
    assert binomial_ci(0, 10) == pytest.approx((0.0, 1 - 0.025 ** 0.1))
    assert binomial_ci(10, 10) == pytest.approx((0.025 ** 0.1, 1.0))
    with pytest.raises(ValueError):
        binomial_ci(3, 2)


def test_plot_roc_writes_png_whatever_the_title_holds(tmp_path):
    """A model path with dollar signs is a title, not TeX (matplotlib's mathtext raised on it, after the
    attack had run)."""
    from leakaudit.report.plots import plot_roc

    m = roc_metrics([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0], n_bootstrap=0)
    for title in ("ROC", "membership inference: /tmp/cost_$5_vs_$10", "a $\\frac{ unbalanced"):
        out = plot_roc({"loss $x": m}, tmp_path / "roc.png", title=title)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_log_axes_label_their_ticks_as_numbers_not_raw_tex(tmp_path, monkeypatch):
    """With parse_math off (for user text), the log axes' default tick labels showed as raw TeX
    ("$\\mathdefault{10^{-4}}$") in every ROC plot and the per-checkpoint perplexity plot."""
    import matplotlib.figure

    from leakaudit.report import plots

    labels: list[str] = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        fig.canvas.draw()
        labels.extend(t.get_text() for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
                      for t in axis.get_ticklabels(which="both") if t.get_text())
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    m = roc_metrics([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0], n_bootstrap=0)
    plots.plot_roc({"loss": m}, tmp_path / "roc.png")
    plots.lines_figure({"ft": [(1, 25.0), (2, 31.0)]}, "ppl", "training step", "perplexity", log_y=True)
    plots.scatter_figure([1, 10, 100], [0.1, 0.2, 0.3], "s", "n", "score", log_x=True)
    assert "1e−01" in labels and "30" in labels and "100" in labels, labels  # the ROC axis starts at 1/2
    assert not [t for t in labels if "$" in t or "mathdefault" in t], labels


def test_without_bootstrap_the_ci_is_null_in_json():
    import json

    m = roc_metrics([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0], n_bootstrap=0)
    assert json.loads(json.dumps(m.to_json(), allow_nan=False))["auc_ci"] is None


def test_paired_auc_difference_b_better_on_every_pair():
    # a orders only half the member/non-member pairs right (AUC 0.5), b orders all of them (AUC 1): on every
    # resample with both classes b is at least as good, and strictly better on most -> the CI lies above 0.
    labels = [1] * 10 + [0] * 10
    a = [i % 2 for i in range(20)]                      # ties everywhere: AUC 0.5
    b = [10 + i for i in range(10)] + list(range(10))   # members above every non-member: AUC 1
    d = paired_auc_difference(a, b, labels, n_bootstrap=500, seed=1)
    assert d["auc_a"] == pytest.approx(0.5) and d["auc_b"] == pytest.approx(1.0)
    assert d["delta"] == pytest.approx(0.5)
    assert d["ci"][0] > 0 and d["ci"][1] <= 1
    assert (d["n"], d["n_pos"], d["n_neg"]) == (20, 10, 10) and 0 < d["n_bootstrap"] <= 500
    # the same resamples: swapping a and b mirrors the interval exactly
    r = paired_auc_difference(b, a, labels, n_bootstrap=500, seed=1)
    assert r["delta"] == pytest.approx(-0.5) and r["ci"] == pytest.approx([-d["ci"][1], -d["ci"][0]])


def test_paired_auc_difference_identical_scores_and_groups_resampled_apart():
    rng = np.random.default_rng(0)
    s = rng.normal(size=6)
    labels = [1, 0, 0, 0, 0, 0]  # one member in six: a resample of all six together missed it a third of the time
    d = paired_auc_difference(s, s, labels, n_bootstrap=300)
    assert d["delta"] == 0 and d["ci"] == [0.0, 0.0]
    assert d["n_bootstrap"] == 300  # members and non-members drawn apart (as roc_metrics): every resample holds both
    assert paired_auc_difference(s, s, labels, n_bootstrap=0)["ci"] is None
    with pytest.raises(ValueError, match="equal length"):
        paired_auc_difference([1, 2], [1, 2, 3], [1, 0])


def test_spearman_with_ci():
    x = np.arange(30.0)
    up = spearman_with_ci(x, np.exp(x / 5), n_bootstrap=200)  # monotone, not linear
    # every resample keeps the rank order: no zero-width [1, 1] interval (5 such pairs would claim it too)
    assert up["rho"] == pytest.approx(1.0) and up["n"] == 30 and up["ci"] is None and "no interval" in up["note"]
    five = spearman_with_ci([1, 2, 3, 4, 5], [2, 3, 5, 8, 9])
    assert five["rho"] == pytest.approx(1.0) and five["ci"] is None
    assert spearman_with_ci(x, -x**3, n_bootstrap=50)["rho"] == pytest.approx(-1.0)
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=40), np.round(rng.normal(size=40), 0)  # ties on one side
    r = spearman_with_ci(a + b, b, n_bootstrap=300, seed=2)
    assert r["rho"] == pytest.approx(spearmanr(a + b, b).statistic)
    assert r["ci"][0] < r["rho"] < r["ci"][1]
    assert spearman_with_ci([1, 2], [2, 1])["rho"] is None  # too few pairs
    assert spearman_with_ci([1, 2, 3], [5, 5, 5])["rho"] is None  # one side constant
    # one pair of ten gives y its spread: 35% of resamples leave it out and have no ρ; the interval over the
    # rest excluded ρ itself (0.522, [0.525, 0.880])
    one = spearman_with_ci(list(range(1, 11)), [4] * 9 + [5], seed=0)
    assert one["rho"] == pytest.approx(0.5222, abs=1e-4) and one["ci"] is None and "no spread" in one["note"]


def test_tpr_at_low_fpr_has_a_bootstrap_interval_from_rechosen_thresholds():
    """The docs promised intervals for TPR at low FPR and none was computed. Each resample re-chooses its
    threshold (vectorised `_tpr_rows`), which must equal `tpr_at_fpr` on the ROC curve, ties included."""
    from sklearn.metrics import roc_curve

    from leakaudit.metrics import _tpr_rows, tpr_at_fpr

    rng = np.random.default_rng(0)
    for _ in range(300):
        n_pos, n_neg = int(rng.integers(1, 30)), int(rng.integers(1, 250))
        digits = int(rng.integers(0, 3))  # rounded scores tie
        pos, neg = np.round(rng.normal(1, 1, n_pos), digits), np.round(rng.normal(0, 1, n_neg), digits)
        fpr, tpr, _ = roc_curve(np.r_[np.ones(n_pos), np.zeros(n_neg)], np.r_[pos, neg], drop_intermediate=False)
        for f in (0.5, 0.1, 0.0333, 0.01, 0.001):
            assert _tpr_rows(pos[None], neg[None], f)[0] == tpr_at_fpr(fpr, tpr, f)
    scores = np.r_[rng.normal(1.5, 1, 400), rng.normal(0, 1, 400)]
    labels = np.r_[np.ones(400), np.zeros(400)]
    m = roc_metrics(scores, labels, n_bootstrap=300)
    lo, hi = m.tpr_ci[0.01]
    assert lo < m.tpr_at_fpr[0.01] < hi and hi - lo > 0.02
    assert m.tpr_ci[0.001] is None and m.tpr_at_fpr[0.001] is None  # 400 non-members do not resolve 0.1%
    js = m.to_json()
    assert js["tpr_ci"] == {"0.01": [lo, hi], "0.001": None}
    assert roc_metrics(scores, labels, n_bootstrap=0).to_json()["tpr_ci"] == {"0.01": None, "0.001": None}


def test_an_auc_every_resample_repeats_gets_the_distribution_free_interval():
    """Perfect separation survives every resample, so the percentile interval was [1, 1] (coverage 0.38 at
    10 per class for a true AUC of 0.99, simulated): the exact bound stands in, P(AUC = 1) ≤ θ^k over k
    disjoint pairs, so the lower end is 0.025^(1/k) (the normal-form k / (k + z²) it replaced: 0.72 at 10,
    above the exact 0.69, and 0.21 at 1 per class, where 1 vs 1 separates with probability θ)."""
    m = roc_metrics(list(range(20)), [0] * 10 + [1] * 10, n_bootstrap=200)
    assert m.auc == 1.0 and m.auc_ci == (pytest.approx(0.025 ** (1 / 10)), 1.0)
    assert any("worst case" in w for w in m.warnings)
    m = roc_metrics(list(range(30)), [1] * 10 + [0] * 20, n_bootstrap=200)  # AUC 0, 10 members
    assert m.auc == 0.0 and m.auc_ci == (0.0, pytest.approx(1 - 0.025 ** (1 / 10)))
    assert roc_metrics([0.0, 1.0], [0, 1], n_bootstrap=200).auc_ci == (pytest.approx(0.025), 1.0)  # 1 vs 1
    m = roc_metrics([0.5] * 12, [0, 1] * 6, n_bootstrap=200)  # every score alike: AUC 0.5 on every resample
    lo, hi = m.auc_ci
    assert lo < 0.5 < hi and hi - lo > 0.4
    m = roc_metrics([0.9, 0.8, 0.3, 0.1, 0.7, 0.2], [1, 0, 1, 0, 1, 0], n_bootstrap=200)  # resamples differ
    assert not any("worst case" in w for w in m.warnings)
    m = roc_metrics([0.9, 0.8, 0.3, 0.1, 0.7, 0.2], [1, 0, 1, 0, 1, 0], n_bootstrap=1)  # one resample: no width,
    assert not any("worst case" in w for w in m.warnings)  # but not for a reason the fallback speaks to
    # the same for a TPR: every member above every non-member gives TPR 1 on every resample; the exact
    # binomial interval over the members stands in for [1, 1]
    m = roc_metrics(list(range(330)), [0] * 300 + [1] * 30, n_bootstrap=200)
    assert m.tpr_at_fpr[0.01] == 1.0 and m.tpr_ci[0.01] == (pytest.approx(0.025 ** (1 / 30)), 1.0)
    assert any("TPR at FPR 0.01 is the same on every resample" in w for w in m.warnings)


def test_perfect_separation_with_ties_is_auc_1_with_the_worst_case_interval():
    """sklearn's trapezoid sum gave 0.9999999999999999 for these scores (3 members above 12 tied non-members),
    so the AUC-1 check missed it and the interval was [1, 1], with the AUC outside it."""
    members, nonmembers = [3.0] * 3, [1, 2, 2, 2, 0, 1, 1, 0, 1, 1, 2, 1]
    m = roc_metrics(members + nonmembers, [1] * 3 + [0] * 12, n_bootstrap=200)
    assert m.auc == 1.0 and m.auc_ci == (pytest.approx(0.025 ** (1 / 3)), 1.0)
    assert any("worst case" in w for w in m.warnings)


def test_the_auc_interval_is_efrons_bca_as_scipy_computes_it():
    """BCa (bias-corrected, accelerated) rather than the plain percentile interval, which runs short near a
    ceiling (simulated coverage in docs/attacks.md). Checked against scipy's own BCa bootstrap of the same
    two-sample statistic: with 20,000 resamples each the ends agree to the resampling noise."""
    from scipy.stats import bootstrap

    rng = np.random.default_rng(3)
    pos, neg = rng.normal(1.2, 1, 30), rng.normal(0, 1, 30)

    def auc(p, q, axis=-1):
        p, q = np.moveaxis(p, axis, -1), np.moveaxis(q, axis, -1)
        return ((p[..., :, None] > q[..., None, :]).mean((-1, -2))
                + 0.5 * (p[..., :, None] == q[..., None, :]).mean((-1, -2)))

    want = bootstrap((pos, neg), auc, n_resamples=20000, method="BCa", random_state=1, vectorized=True)
    lo, hi = roc_metrics(np.r_[pos, neg], np.r_[np.ones(30), np.zeros(30)], n_bootstrap=20000, fprs=()).auc_ci
    assert lo == pytest.approx(want.confidence_interval.low, abs=0.01)
    assert hi == pytest.approx(want.confidence_interval.high, abs=0.01)
    resampled = auc(pos[rng.integers(0, 30, (2000, 30))], neg[rng.integers(0, 30, (2000, 30))])  # 2,000 AUCs
    plain = np.quantile(resampled, [0.025, 0.975])
    assert lo < plain[0] and hi < plain[1]  # shifted down, away from the ceiling, as BCa is for a skewed AUC


def test_intervals_do_not_depend_on_the_order_the_items_come_in():
    """The same data and seed give the same interval whatever order a file lists the items in (the resamples
    were drawn over the input order: reversing the members moved the AUC interval from (0.5125, 0.8525) to
    (0.5133, 0.8413), and a paired verdict at the edge could flip)."""
    from leakaudit.metrics import paired_difference

    rng = np.random.default_rng(3)
    pos, neg = rng.normal(1, 1, 20), rng.normal(0, 1, 20)
    labels = [1] * 20 + [0] * 20
    a = roc_metrics(np.r_[pos, neg], labels, fprs=(0.1,))
    b = roc_metrics(np.r_[pos[::-1], neg[rng.permutation(20)]], labels, fprs=(0.1,))
    assert a.auc_ci == b.auc_ci and a.tpr_ci == b.tpr_ci
    x, y = rng.normal(size=30), rng.normal(size=30)
    perm = rng.permutation(30)
    for lab in (None, np.array([1] * 15 + [0] * 15)):
        one = paired_difference(x, x + y * 0.3 + 0.1, lab)
        two = paired_difference(x[perm], (x + y * 0.3 + 0.1)[perm], None if lab is None else lab[perm])
        assert one["ci"] == two["ci"] and one["relative_ci"] == two["relative_ci"], lab
    assert spearman_with_ci(x, y)["ci"] == spearman_with_ci(x[perm], y[perm])["ci"]


def test_a_relative_change_needs_a_baseline_bounded_away_from_zero():
    """Δ / |mean a| with a mean that could be 0: the point was +5000% beside a [+1%, +146%] interval."""
    from leakaudit.metrics import paired_difference

    a = np.arange(30) - 14.5 + 0.001
    d = paired_difference(a, a + 0.05, seed=0)
    assert d["ci"] == pytest.approx([0.05, 0.05]) and d["relative"] is None and d["relative_ci"] is None
    far = paired_difference(a + 100, a + 100.05, seed=0)  # a baseline far from 0: a ratio, inside its interval
    assert far["relative"] == pytest.approx(0.05 / 100.001)
    assert far["relative_ci"][0] <= far["relative"] <= far["relative_ci"][1]
    assert paired_difference(a + 100, a + 101, n_bootstrap=0)["relative"] == pytest.approx(1 / 100.001)


def test_bad_rates_and_too_few_resamples_are_said():
    from leakaudit.metrics import bootstrap_ci

    scores, labels = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2], [0, 1, 0, 1, 1, 0]
    for fpr in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            roc_metrics(scores, labels, fprs=(fpr,))
    assert any("only 50 bootstrap resamples" in w for w in roc_metrics(scores, labels, n_bootstrap=50).warnings)
    assert not any("bootstrap resamples" in w for w in roc_metrics(scores, labels, n_bootstrap=0).warnings)
    assert bootstrap_ci(lambda idx: 0.0, 0, seed=0) is None  # no units: no interval, not [0, 0]


def test_a_tied_roc_segment_stays_straight_in_fpr_on_the_log_axis():
    """An attack whose scores are all alike has the ROC (0, 0) -> (1, 1): drawn point to point on a log FPR axis
    it looked like TPR 0.5 at FPR 1%; filled in linearly in FPR, the drawn TPR equals the FPR everywhere."""
    from leakaudit.report.plots import _linear_segments

    x, y = _linear_segments(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.01)
    assert x[0] == 0.01 and np.allclose(y[1:], x[1:]) and x[-1] == 1.0
    x, y = _linear_segments(np.array([0.0, 0.0, 0.5, 1.0]), np.array([0.0, 0.4, 0.8, 1.0]), 0.01)
    assert np.isclose(np.interp(0.25, x, y), 0.6, atol=0.01)  # halfway along the (0, 0.4) -> (0.5, 0.8) segment


def test_metric_arguments_that_cannot_be_are_refused_by_name():
    """binomial_ci(1, 3, alpha=2) gave (1.0, 0.0); clusters of the wrong length a numpy broadcast error."""
    with pytest.raises(ValueError, match="alpha must be between 0 and 1"):
        binomial_ci(1, 3, alpha=2)
    with pytest.raises(ValueError, match=r"clusters: one key per item expected \(3 items\), got 2"):
        paired_difference([1.0, 2.0, 3.0], [2.0, 3.0, 4.0], clusters=[0, 1])


def test_one_class_of_a_handful_against_many_gets_the_worst_case_interval():
    """One member against 500 non-members: the bootstrap cannot vary the one member, so the AUC's interval was
    [0.451, 0.477] with 5,000 (it covered 1% of true values, simulated); 2-10 members against 1,000 covered
    49-91%. Below SMALL_CLASS items against LOPSIDED times as many, the interval is the worst case over score
    distributions, the Wilson-form θ with (AUC − θ)² ≤ z²θ(1 − θ)/k (solved here by hand); a balanced small
    set keeps its bootstrap interval (it covered 95-99%)."""
    import math

    z2 = 1.959963984540054 ** 2

    def by_hand(auc, k):  # the two roots of (k + z²)θ² − (2k·auc + z²)θ + k·auc² = 0
        a, b, c = k + z2, -(2 * k * auc + z2), k * auc * auc
        r = math.sqrt(b * b - 4 * a * c)
        return (-b - r) / (2 * a), (-b + r) / (2 * a)

    rng = np.random.default_rng(0)
    neg = rng.normal(0, 1, 500)
    for k in (1, 5):
        pos = rng.normal(1, 1, k)
        m = roc_metrics([*pos, *neg], [1] * k + [0] * 500, n_bootstrap=200)
        assert 0 < m.auc < 1 and m.auc_ci == pytest.approx(by_hand(m.auc, k))
        assert m.auc_ci[1] - m.auc_ci[0] > 0.4  # wide, as a handful of members must leave it
        assert any(f"only {k} member{'s' if k > 1 else ''} against 500" in w and "worst case" in w
                   for w in m.warnings), m.warnings
    m = roc_metrics([*rng.normal(0, 1, 3), *rng.normal(1, 1, 300)], [0] * 3 + [1] * 300, n_bootstrap=200,
                    negatives="non-member users")  # the few are the non-members
    assert any("only 3 non-member users against 300" in w for w in m.warnings), m.warnings
    m = roc_metrics([*rng.normal(1, 1, 8), *rng.normal(0, 1, 8)], [1] * 8 + [0] * 8, n_bootstrap=200)
    assert not any("worst case" in w for w in m.warnings)  # 8 vs 8: the bootstrap's own
    m = roc_metrics([*rng.normal(1, 1, 20), *rng.normal(0, 1, 500)], [1] * 20 + [0] * 500, n_bootstrap=200)
    assert not any("worst case" in w for w in m.warnings)  # 20 members: enough (94% at 20 vs 1,000)


def test_a_paired_difference_of_nan_values_is_a_value_error_naming_them():
    """A NaN in one model's values gave delta NaN and no interval, without saying which input held it."""
    with pytest.raises(ValueError, match="values_a: 1 values are NaN or infinite"):
        paired_difference([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="values_b: 1 values are NaN or infinite"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0, float("inf")])


def test_paired_auc_difference_resamples_members_and_non_members_apart():
    """The Δ AUC interval came from resamples of all items together, where the AUC's own interval (roc_metrics)
    resamples each group within itself: the two group sizes are the design's. By hand: the percentile interval
    of Δ over resamples drawn within each group, with the same generator."""
    from leakaudit.metrics import _auc_rows

    rng = np.random.default_rng(3)
    y = np.array([1] * 8 + [0] * 12)
    a = rng.normal(size=20) + y
    b = a + rng.normal(scale=0.5, size=20) + 0.5 * y
    d = paired_auc_difference(a, b, y, n_bootstrap=400, seed=7)
    # the function sorts the items (the resamples depend on the data, not their order) before drawing
    order = np.lexsort((b, a, np.maximum(a, b), np.minimum(a, b), y))
    sa, sb, sy = a[order], b[order], y[order]
    draw_rng = np.random.default_rng(7)
    groups = [np.flatnonzero(sy == 1), np.flatnonzero(sy == 0)]
    draw = np.concatenate([g[draw_rng.integers(0, len(g), size=(400, len(g)))] for g in groups], axis=1)
    deltas = _auc_rows(sb[draw], sy[draw]) - _auc_rows(sa[draw], sy[draw])
    assert (sy[draw].sum(axis=1) == 8).all()
    assert d["ci"] == pytest.approx(list(np.percentile(deltas, [2.5, 97.5])))
