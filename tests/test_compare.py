"""Paired comparisons between the targets of one evaluation (leakaudit/kinds/compare.py), from stage folders
written by hand with known values: deltas and relative changes computed by hand, intervals that must or must
not exclude 0, the verdict wording, the report's verdict section; and the study-1 CPU draft plans. No model
is loaded anywhere in this file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from leakaudit.kinds.base import StageView
from leakaudit.kinds.compare import ZERO_WIDTH

REPO = Path(__file__).resolve().parent.parent


def _write_stage(out: Path, kind: str, evaluation: str, target: str, files: dict[str, list[dict]],
                 result: dict, options: dict | None = None) -> dict:
    """A finished stage written by hand: its files and its run.json entry."""
    folder = f"evaluate/{evaluation}/{target}"
    (out / folder).mkdir(parents=True)
    for name, rows in files.items():
        (out / folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"id": folder, "kind": kind, "folder": folder, "key": "k", "status": "ran", "seconds": 1,
            "params": {"target_label": target, "evaluation": evaluation, "options": options or {}},
            "result": result}


def _logprob_rows(values: dict[tuple[str, str], tuple[float, int]], role: str = "model") -> list[dict]:
    return [{"role": role, "model": "m", "target": t, "email": "x", "template": tpl, "logp": lp, "rank": rank,
             "n_candidates": 5} for (t, tpl), (lp, rank) in values.items()]


LOGPROB_RESULT = {"templates": {"overall": {"mean_logp": -1.0, "mean_logp_ci": [-2.0, 0.0], "top1_rate": 0.5}}}


def _logprob_stages(tmp_path: Path) -> tuple[list[dict], dict, dict]:
    """m0, ft (every row's log p up by 1 + its index / 10; one more rank-1 row) and same (m0's rows, in
    another order, plus a row m0 lacks and a baseline row that must be ignored)."""
    targets, templates = [f"t{i}" for i in range(10)], ["A", "B"]
    m0 = {(t, tpl): (-20.0 - i - j, 1 if i < 3 else 2) for i, t in enumerate(targets) for j, tpl in enumerate(templates)}
    ft = {k: (lp + 1 + n / 10, 1 if k[0] in ("t0", "t1", "t2", "t3") else 2) for n, (k, (lp, _)) in enumerate(m0.items())}
    same = dict(reversed(list(m0.items())))
    same[("stray", "A")] = (0.0, 1)
    opts = {"compare_to": "m0", "n_bootstrap": 400}
    return [_write_stage(tmp_path, "pii-logprob", "logprob", name,
                         {"logprobs.jsonl": _logprob_rows(rows) + _logprob_rows({("t0", "A"): (99.0, 1)}, "baseline")},
                         LOGPROB_RESULT, opts)
            for name, rows in (("m0", m0), ("ft", ft), ("same", same))], m0, ft


def test_logprob_comparison_by_hand(tmp_path):
    from leakaudit.kinds.pii_logprob import PiiLogprobResult

    stages, m0, ft = _logprob_stages(tmp_path)
    comps = PiiLogprobResult.comparisons([StageView(s, tmp_path) for s in stages])
    by = {(c["variant"], c["metric"]): c for c in comps}
    assert set(by) == {(v, m) for v in ("ft", "same") for m in ("mean log p(address)", "address rank-1 rate")}
    c = by[("ft", "mean log p(address)")]
    base_mean = sum(lp for lp, _ in m0.values()) / 20            # -20 - 4.5 - 0.5 = -25
    ft_mean = sum(lp for lp, _ in ft.values()) / 20
    assert base_mean == pytest.approx(-25.0) and c["value_baseline"] == pytest.approx(base_mean)
    assert c["value_variant"] == pytest.approx(ft_mean)
    assert c["delta"] == pytest.approx(1 + 0.95)                  # 1 + mean(0, 0.1, ..., 1.9)
    assert c["relative"] == pytest.approx(1.95 / 25)              # Δ / |baseline|: positive like Δ
    lo, hi = c["delta_ci"]
    assert 1.0 <= lo < 1.95 < hi <= 2.9 and c["ci"] == c["delta_ci"]  # every pair moved up: CI excludes 0
    rlo, rhi = c["relative_ci"]
    assert 0 < rlo < 1.95 / 25 < rhi
    # a log p: e^Δ is the (geometric mean) likelihood ratio, its interval the CI's ends exponentiated
    assert c["likelihood_ratio"] == pytest.approx(math.exp(1.95))
    assert c["likelihood_ratio_ci"] == pytest.approx([math.exp(lo), math.exp(hi)])
    assert c["verdict"] == "increase" and c["ci_half_width"] == pytest.approx((hi - lo) / 2)
    assert c["detectable_effect"] == pytest.approx(1.4294 * (hi - lo) / 2, rel=1e-4)  # (1.96 + 0.84) / 1.96
    assert (c["n"], c["n_units"], c["baseline"], c["evaluation"]) == (20, 10, "m0", "logprob")
    r = by[("ft", "address rank-1 rate")]
    assert (r["value_baseline"], r["value_variant"]) == (pytest.approx(0.3), pytest.approx(0.4))
    # 3 of 10 targets: a resample can hold none of them, so the baseline rate could be 0 and Δ / 0.3 is no
    # bounded ratio: no relative change (it was +33% [x, y] from the resamples that happened to hold one)
    assert r["delta"] == pytest.approx(0.1) and r["relative"] is None and r["relative_ci"] is None
    assert "likelihood_ratio" not in r  # a rate is no log p
    # identical rows (order and a stray row aside): Δ 0 on every resample
    s = by[("same", "mean log p(address)")]
    assert s["n"] == 20 and s["delta"] == 0 and s["delta_ci"] == [0.0, 0.0] and s["relative_ci"] == [0.0, 0.0]
    assert s["verdict"] == ZERO_WIDTH


def test_verdict_wording():
    from leakaudit.kinds.compare import verdict

    assert verdict([0.01, 0.2]) == "increase" and verdict([-0.3, -0.02]) == "decrease"
    assert verdict([-0.1, 0.05]) == "no detectable change at this size (the CI allows |Δ| up to 0.1)"
    assert verdict([-2.5, 1.0]) == "no detectable change at this size (the CI allows |Δ| up to 2.5)"
    assert verdict([0.0, 0.018]) == "no detectable change at this size (the CI allows |Δ| up to 0.018)"  # 0 in it
    assert verdict([0.01, 0.2], "effect") == "increases" and verdict([-0.3, -0.02], "effect") == "reduces"
    assert verdict([-0.075, 0.025], "effect") == "no detectable effect (the CI allows |Δ| up to 0.075)"
    assert verdict([-0.0004, 0.0003], "effect") == "no detectable effect (the CI allows |Δ| up to 0.0004)"
    assert verdict(None).startswith("no CI")
    assert verdict([0.0, 0.0]) == ZERO_WIDTH  # e.g. both AUCs at 1
    assert verdict([0.5, 0.6], too_few="too few texts") == "no verdict: too few texts"


def _view(target: str, opts: dict | None = None):
    class View:
        evaluation, result, record = "ev", {}, {"params": {"options": opts or {}}}
    v = View()
    v.target = target
    return v


def test_too_few_units_claim_no_direction():
    """One pair, or one member and one non-member, gives a zero-width interval away from 0: the verdict
    refuses a direction below 10 units for a mean and 5 of each label for an AUC, and gives it at those sizes."""
    from leakaudit.kinds.compare import Series, compare

    one = compare(_view("base"), _view("ft"), Series("m", {"x": 1.0}, items="texts"),
                  Series("m", {"x": 1.001}, items="texts"))
    assert one["ci"] == [pytest.approx(0.001), pytest.approx(0.001)]
    assert one["verdict"] == "no verdict: too few texts (1; a verdict needs 10)"
    ten = {f"t{i}": float(i) for i in range(10)}
    up = compare(_view("base"), _view("ft"), Series("m", ten, items="texts"),
                 Series("m", {k: v + 1 + 0.01 * len(k) for k, v in ten.items()}, items="texts"))
    assert up["verdict"] == "increase"
    labels = {"p": 1, "q": 0}
    auc = compare(_view("base"), _view("ft"), Series("a", {"p": 1.0, "q": 0.0}, labels=labels, items="users"),
                  Series("a", {"p": 0.0, "q": 1.0}, labels=labels, items="users"))
    assert auc["ci"] == [-1.0, -1.0]
    assert auc["verdict"] == ("no verdict: too few users (1 members, 1 non-members; a "
                              "verdict needs 5 of each)")
    labels = {f"u{i}": int(i < 5) for i in range(10)}
    flip = compare(_view("base"), _view("ft"), Series("a", {u: float(y) for u, y in labels.items()}, labels=labels),
                   Series("a", {u: float(1 - y) for u, y in labels.items()}, labels=labels), style="effect")
    assert flip["delta"] == -1.0 and flip["verdict"] == "reduces"


def test_a_mean_interval_is_widened_to_a_t_interval_at_few_units():
    """Hesterberg's expanded percentile interval: at n units its level matches a t-interval's z; at many
    units it is the plain 95%. The paired interval of a mean widens accordingly."""
    from scipy.stats import norm, t

    from leakaudit.metrics import expanded_level, paired_difference

    level = expanded_level(0.95, 10)
    assert norm.ppf(1 - (1 - level) / 2) == pytest.approx((10 / 9) ** 0.5 * t.ppf(0.975, 9))
    assert expanded_level(0.95, 100_000) == pytest.approx(0.95, abs=1e-4) and expanded_level(0.95, 1) == 0.95
    a = [0.0] * 10
    b = [0.3, -0.2, 0.5, 0.1, -0.4, 0.2, 0.6, -0.1, 0.3, 0.0]
    d = paired_difference(a, b, n_bootstrap=4000, seed=1)
    plain = np.quantile(_bootstrap_means(np.array(b), 4000, 1), [0.025, 0.975])
    assert d["ci"][0] < plain[0] and d["ci"][1] > plain[1]  # wider than the plain percentile interval


def _bootstrap_means(x, n_boot, seed):
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(x), size=(n_boot, len(x)))
    return x[draw].mean(axis=1)


def _mia_stages(tmp_path: Path) -> list[dict]:
    """m0: every member above every non-member (AUC 1); ft: all tied (AUC 0.5), rows in another order, one
    id shared by a member and a non-member, a stray text m0 lacks; flat: m0's scores + 3 (Δ 0)."""
    n = 12
    m0 = [{"id": f"m{i}", "label": 1, "loss": 100.0 + i} for i in range(n)] + \
         [{"id": f"n{i}", "label": 0, "loss": float(i)} for i in range(n)]
    m0 += [{"id": "both", "label": 1, "loss": 500.0}, {"id": "both", "label": 0, "loss": -5.0}]
    ft = [{"id": r["id"], "label": r["label"], "loss": 1.0} for r in reversed(m0)] + [{"id": "x", "label": 1, "loss": 9.0}]
    flat = [{**r, "loss": r["loss"] + 3} for r in m0]
    result = {"attacks": {"loss": {"auc": 0.5, "auc_ci": [0.4, 0.6]}}, "scores_file": "scores.jsonl"}
    return [_write_stage(tmp_path, "mia", "mia", name, {"scores.jsonl": rows}, result,
                         {"compare_to": "m0", "n_bootstrap": 300})
            for name, rows in (("m0", m0), ("ft", ft), ("flat", flat))]


def test_mia_comparison_pairs_texts_by_id(tmp_path):
    from leakaudit.kinds.mia import MiaResult

    comps = MiaResult.comparisons([StageView(s, tmp_path) for s in _mia_stages(tmp_path)])
    by = {c["variant"]: c for c in comps}
    assert set(by) == {"ft", "flat"} and all(c["metric"] == "loss AUC" for c in comps)
    c = by["ft"]
    assert (c["n"], c["n_pos"], c["n_neg"]) == (26, 13, 13)  # the stray text is not paired
    assert c["value_baseline"] == pytest.approx(1.0) and c["value_variant"] == pytest.approx(0.5)
    assert c["delta"] == pytest.approx(-0.5) and c["relative"] == pytest.approx(-0.5)
    lo, hi = c["delta_ci"]
    assert lo <= -0.5 <= hi < 0 and c["verdict"] == "decrease"
    assert by["flat"]["delta"] == 0 and by["flat"]["delta_ci"] == [0.0, 0.0]
    assert by["flat"]["verdict"] == ZERO_WIDTH  # scores + 3: same order


def test_a_comparison_bootstraps_with_the_seed_the_stage_ran_with(tmp_path):
    """The kinds record their seed (the run's --seed unless the options give one); the paired bootstrap of a
    comparison draws with it, not with 0."""
    import random

    from leakaudit.kinds.mia import MiaResult

    rng = random.Random(1)
    rows = {name: [{"id": f"t{i}", "label": i % 2, "loss": rng.random() + (i % 2) * shift} for i in range(40)]
            for name, shift in (("m0", 0.3), ("ft", 0.5))}

    def ci(seed: int | None, copy: str = "") -> list[float]:
        out = tmp_path / f"s{seed}{copy}"
        result = {"attacks": {"loss": {"auc": 0.5, "auc_ci": [0.4, 0.6]}}, "scores_file": "scores.jsonl"}
        stages = [_write_stage(out, "mia", "mia", name, {"scores.jsonl": r},
                               result if seed is None else {**result, "seed": seed},
                               {"compare_to": "m0", "n_bootstrap": 200}) for name, r in rows.items()]
        return MiaResult.comparisons([StageView(s, out) for s in stages])[0]["delta_ci"]

    seven = ci(7)
    assert ci(None) == ci(0) and ci(7, "again") == seven and seven != ci(0, "again")


def test_pii_comparison_from_extraction_rows(tmp_path):
    """Per-sample rows of extractions.jsonl: a target x cell is hit when any of its samples is."""
    from leakaudit.kinds.pii import PiiResult

    def rows(hit_targets: set[str], role: str = "model") -> list[dict]:
        out = []
        for t in [f"t{i}" for i in range(10)]:
            for temp in (0.5, 1.0):
                for k in range(2):  # sample 1 hits when sample 0 does not: any() counts
                    out.append({"role": role, "template": "A", "protocol": "fake-privacy", "temperature": temp,
                                "top_k": 100, "target": t, "sample_index": k, "hit": t in hit_targets and k == 1})
        return out

    opts = {"compare_to": "m0"}
    result = {"rows": [], "match_rate": 0.1}
    stages = [_write_stage(tmp_path, "pii", "extraction", "m0", {"extractions.jsonl": rows({"t0"}) + rows(
                  {f"t{i}" for i in range(10)}, "baseline")}, result, opts),
              _write_stage(tmp_path, "pii", "extraction", "ft", {"extractions.jsonl": rows({"t0", "t1", "t2"})},
                           result, opts)]
    (c,) = PiiResult.comparisons([StageView(s, tmp_path) for s in stages])
    assert (c["metric"], c["n"], c["n_units"]) == ("PII match rate", 20, 10)
    assert c["value_baseline"] == pytest.approx(0.1) and c["value_variant"] == pytest.approx(0.3)
    # one of 10 targets extracted by m0: its rate is 0 on about a third of the resamples, so "+200%" has no
    # bounded interval (resamples without t0 were dropped from it): no relative change
    assert c["delta"] == pytest.approx(0.2) and c["relative"] is None and c["relative_ci"] is None


def test_pii_comparison_is_the_grid_mean_when_cells_hold_different_targets(tmp_path):
    """A context-k cell holds only the targets with a context: 12 targets in zero_shot-a, 2 in context-50. The
    stage's match rate is the mean of the cells' rates (0/12 and 2/2: 0.5); the comparison took the plain mean
    of the 14 target x cell items (2/14 = 0.14), another number under the same name."""
    from leakaudit.kinds.pii import PiiResult
    from leakaudit.metrics import paired_difference

    def rows(context_hits: bool) -> list[dict]:
        cells = [("zero_shot-a", range(12)), ("context-50", range(2))]
        return [{"role": "model", "template": tpl, "protocol": "pil", "temperature": 0.0, "top_k": None,
                 "target": f"t{i}", "target_index": i, "sample_index": 0, "hit": tpl != "zero_shot-a" and context_hits}
                for tpl, targets in cells for i in targets]

    opts = {"compare_to": "m0"}
    stages = [_write_stage(tmp_path, "pii", "extraction", name, {"extractions.jsonl": rows(hit)}, {"rows": []}, opts)
              for name, hit in (("m0", False), ("ft", True))]
    (c,) = PiiResult.comparisons([StageView(s, tmp_path) for s in stages])
    assert (c["n"], c["n_units"]) == (14, 12)
    assert c["value_baseline"] == 0 and c["value_variant"] == pytest.approx(0.5) and c["delta"] == pytest.approx(0.5)
    # weights 1 / (the item's cell size) on a resample too; equal weights are the plain mean
    d = paired_difference([0, 0, 0], [1, 0, 0], clusters=["x", "y", "y"], weights=[1, 0.5, 0.5], n_bootstrap=50)
    assert d["value_b"] == pytest.approx(0.5)
    plain, equal = (paired_difference([0, 1, 0], [1, 1, 0], clusters=["x", "x", "y"], weights=w, n_bootstrap=50)
                    for w in (None, [2, 2, 2]))
    assert plain["delta"] == pytest.approx(equal["delta"]) and plain["ci"] == pytest.approx(equal["ci"])
    with pytest.raises(ValueError, match="weights"):
        paired_difference([0, 1], [1, 1], weights=[1, 1])


def test_targets_whose_masked_ids_are_alike_are_paired_by_position(tmp_path):
    """Ids that are addresses mask alike ("j***@enron.com" for jeff.dasovich@ and james.steffes@): without
    `target_index` every such target was ambiguous and left out ("the two targets share no targets")."""
    from leakaudit.kinds.pii import PiiResult
    from leakaudit.kinds.pii_logprob import PiiLogprobResult

    masked = "j***@enron.com"
    opts = {"compare_to": "m0", "n_bootstrap": 200}
    lp = {name: [{**r, "target": masked, "target_index": i} for i, r in enumerate(_logprob_rows(
              {(f"t{i}", "A"): (-20.0 + shift + i / 10, 1) for i in range(10)}))]
          for name, shift in (("m0", 0.0), ("ft", 1.0))}
    stages = [_write_stage(tmp_path / "lp", "pii-logprob", "logprob", name, {"logprobs.jsonl": rows},
                           LOGPROB_RESULT, opts) for name, rows in lp.items()]
    (c, *_) = PiiLogprobResult.comparisons([StageView(s, tmp_path / "lp") for s in stages])
    assert (c["n"], c["n_units"]) == (10, 10) and c["delta"] == pytest.approx(1.0)

    def rows(hit_targets: set[int]) -> list[dict]:
        return [{"role": "model", "template": "A", "protocol": "fake-privacy", "temperature": 1.0, "top_k": 100,
                 "target": masked, "target_index": i, "sample_index": 0, "hit": i in hit_targets} for i in range(10)]

    stages = [_write_stage(tmp_path / "ex", "pii", "extraction", name, {"extractions.jsonl": rows(hit)},
                           {"rows": []}, opts) for name, hit in (("m0", {0}), ("ft", {0, 1, 2}))]
    (c,) = PiiResult.comparisons([StageView(s, tmp_path / "ex") for s in stages])
    assert (c["n"], c["n_units"]) == (10, 10) and c["delta"] == pytest.approx(0.2)
    # a baseline cached from before target_index was written still pairs with a stage run now, by its ids
    old = [{k: v for k, v in r.items() if k != "target_index"} | {"target": f"t{r['target_index']}"}
           for r in rows({0})]
    new = [r | {"target": f"t{r['target_index']}"} for r in rows({0, 1, 2})]
    stages = [_write_stage(tmp_path / "mixed", "pii", "extraction", name, {"extractions.jsonl": r},
                           {"rows": []}, opts) for name, r in (("m0", old), ("ft", new))]
    (c,) = PiiResult.comparisons([StageView(s, tmp_path / "mixed") for s in stages])
    assert (c["n"], c["n_units"]) == (10, 10) and c["delta"] == pytest.approx(0.2)


def test_report_opens_with_the_verdicts(tmp_path):
    from leakaudit.report.html import build

    stages = _logprob_stages(tmp_path)[0] + _mia_stages(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "s1"}, "stages": stages}))
    html, summary = build(tmp_path)
    kinds = [(c["kind"], c["variant"], c["metric"]) for c in summary["comparisons"]]
    assert ("pii-logprob", "ft", "mean log p(address)") in kinds and ("mia", "ft", "loss AUC") in kinds
    assert len(kinds) == 6
    assert html.index('id="verdicts"') < html.index('id="headline"')
    c = next(c for c in summary["comparisons"] if c["variant"] == "ft" and c["metric"] == "loss AUC")
    lo, hi = c["delta_ci"]
    rlo, rhi = c["relative_ci"]
    sentence = (f"mia: ft vs m0: loss AUC 0.500 vs 1.000, Δ -0.500 [{lo:.3f}, {hi:.3f}] "
                f"(-50.0% [{100 * rlo:.1f}%, {100 * rhi:.1f}%]) → decrease")
    assert sentence in html.replace("&gt;", ">")
    assert "logprob: ft vs m0: mean log p(address) -23.050 vs -25.000, Δ +1.950 [" in html
    # a rate of 3 in 10 targets could be 0 on a resample: no relative change is claimed for it
    assert "logprob: same vs m0: address rank-1 rate 0.300 vs 0.300, Δ 0.000 [0.000, 0.000] → no detectable" in html


def test_paired_difference_clusters_and_negative_baseline():
    from leakaudit.metrics import paired_difference

    a = [-10.0, -10.0, -30.0, -30.0]
    b = [-9.0, -9.0, -27.0, -27.0]
    d = paired_difference(a, b, n_bootstrap=200, seed=3, clusters=["x", "x", "y", "y"])
    assert d["delta"] == pytest.approx(2.0) and d["relative"] == pytest.approx(2.0 / 20)
    # resampling whole clusters: every resample's Δ is 1 (all x), 3 (all y) or 2 (one of each)
    lo, hi = d["ci"]
    assert 1.0 <= lo <= hi <= 3.0 and d["n"] == 4
    assert paired_difference(a, b, n_bootstrap=0)["ci"] is None
    assert paired_difference([0.0, 0.0], [0.0, 1.0], n_bootstrap=50)["relative"] is None  # nothing to divide by


def test_fake_privacy_cpu_plans_and_passes_the_plan_check():
    from leakaudit.config import load_experiment
    from leakaudit.experiment import check_plan
    from leakaudit.experiment.plan import Plan

    plan = Plan(load_experiment(REPO / "leakaudit" / "resources" / "experiments" / "fake-privacy-cpu.yaml"))
    check_plan(plan)  # every option known to its kind or to FinetuneConfig, values in range
    ids = list(plan.stages)
    # the exposed model first, then what it generates, then the fine-tunes on that, then the evaluations
    assert ids.index("finetune/m0") < ids.index("generate/gen") < ids.index("generate/replaced") \
        < ids.index("finetune/ft_replaced") < ids.index("evaluate/mia/m0")
    assert ids.index("generate/selfinstruct") < ids.index("finetune/ft_selfinstruct")
    assert plan.stages["generate/gen"].params["model"] == {"stage": "finetune/m0"}
    assert plan.stages["generate/selfinstruct"].params["model"]["spec"] == "default"  # not the exposed model
    for name in ("ft_gen", "ft_replaced", "ft_selfinstruct", "ft_control"):
        assert plan.stages[f"finetune/{name}"].params["model"] == {"stage": "finetune/m0"}
    evals = [s for s in plan.stages.values() if s.id.startswith("evaluate/")]
    assert {s.kind for s in evals} == {"pii", "pii-logprob", "mia"} and len(evals) == 19
    # the exposure, the base model's self-instruct data and the base-vs-M0 comparison are fixed across the
    # study's seeds (reused by `run --reuse`); what follows M0 varies
    exp1 = load_experiment(REPO / "leakaudit" / "resources" / "experiments" / "fake-privacy-cpu.yaml")
    exp1.seed = 1
    other = Plan(exp1)
    same = [sid for sid, s in plan.stages.items() if other.stages[sid].key == s.key]
    assert same == ["data/P", "finetune/m0", "generate/selfinstruct", "evaluate/exposure_logprob/base",
                    "evaluate/exposure_logprob/m0", "evaluate/exposure_mia/base", "evaluate/exposure_mia/m0"]
    # the exposure (base -> M0) is compared apart from the fine-tunes (M0 -> each), so neither sets the other's scale
    assert plan.stages["evaluate/exposure_mia/m0"].params["options"]["compare_to"] == "base"
    assert "evaluate/mia/base" not in plan.stages and plan.stages["evaluate/mia/m0"].params["options"]["compare_to"] == "m0"
    targets = plan.stages["evaluate/logprob/m0"].params["data"]
    prompts = plan.stages["generate/gen"].params["data"]
    assert targets == ["data/P", "targets.jsonl"] and prompts == ["data/P", "prompts.jsonl"]
    assert all(s.params["options"]["compare_to"] == ("base" if "exposure" in s.id else "m0") for s in evals)


def test_a_finetune_on_data_its_own_output_generated_is_one_error():
    from leakaudit.config import parse_experiment
    from leakaudit.errors import InputError
    from leakaudit.experiment.plan import Plan

    text = ("name: x\nmodels: {base: tiny-gpt-neox}\ndatasets: {d: {builtin: enron-exposure}}\n"
            "generate:\n  gen: {kind: continuation, model: m0, data: d}\n"
            "finetune:\n  m0:\n    model: base\n    data: gen\n")
    with pytest.raises(InputError) as exc:
        Plan(parse_experiment(text, "exp.yaml"))
    assert (exc.value.line, exc.value.field) == (9, "finetune.m0.data")
    assert exc.value.message == "'m0' depends on itself (through generate 'gen')"


def test_logprob_with_one_candidate_has_no_rank_comparison_or_headline(tmp_path):
    """Among one candidate every rank is 1: a rank-1 rate of 1.0 before and after says nothing, so it is
    neither compared nor a headline."""
    from leakaudit.kinds.base import StageView
    from leakaudit.kinds.pii_logprob import PiiLogprobResult

    rows = {(f"t{i}", "A"): (-10.0 - i, 1) for i in range(6)}
    stages = []
    for name, shift in (("m0", 0.0), ("ft", 1.0)):
        one = [{**r, "n_candidates": 1} for r in _logprob_rows({k: (lp + shift, 1) for k, (lp, _) in rows.items()})]
        stages.append(_write_stage(tmp_path, "pii-logprob", "logprob", name, {"logprobs.jsonl": one},
                                   {**LOGPROB_RESULT, "n_candidates": 1}, {"compare_to": "m0", "n_bootstrap": 50}))
    views = [StageView(s, tmp_path) for s in stages]
    assert [c["metric"] for c in PiiLogprobResult.comparisons(views)] == ["mean log p(address)"]
    assert [h.metric for h in PiiLogprobResult({**LOGPROB_RESULT, "n_candidates": 1}).headline()] == [
        "mean log p(address)"]


def test_a_run_ends_with_the_verdict_lines(tmp_path, capsys):
    """`leakaudit run` / `demo` print the report's verdicts last, one line each, unwrapped, on stdout (the
    run's result; its stage lines are on stderr)."""
    from leakaudit.cli.run import print_verdicts
    from leakaudit.report.html import write_report

    stages = _logprob_stages(tmp_path)[0] + _mia_stages(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "s1"}, "stages": stages}))
    write_report(tmp_path)
    capsys.readouterr()
    print_verdicts(tmp_path)
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert printed.err == ""
    assert lines[0].startswith("verdicts")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(lines) == 1 + len(summary["comparisons"]) == 7
    mia = next(line for line in lines if "mia: ft vs m0: loss AUC 0.500 vs 1.000, Δ -0.500 [" in line)
    assert mia.endswith("→ decrease (26 paired)")  # Δ -0.5 on every resample: no power statement
    print_verdicts(tmp_path / "missing")  # no summary: nothing printed, no error
    assert capsys.readouterr().err == ""


def test_backdoor_comparison_by_hand(tmp_path):
    """Per word match ratios paired by word; fully recovered paired by (word, query), resampled by word; the
    values are extract.json's, so the baseline's statistic is its headline mean over words."""
    from leakaudit.kinds.backdoor import BackdoorResult

    words = [f"W{i}" for i in range(12)]
    extract = {"clean": {w: {"match_ratio_mean": 0.1, "match_ratio_max": 0.2, "recovered": [0, 0]} for w in words},
               "victim": {w: {"match_ratio_mean": 0.1 + 0.05 * i, "match_ratio_max": 0.2 + 0.05 * i,
                              "recovered": [1, 0] if i < 4 else [0, 0]} for i, w in enumerate(words)}}
    opts = {"compare_to": "clean", "n_bootstrap": 400}
    stages = []
    for name, per_word in extract.items():
        stages.append(_write_stage(tmp_path, "backdoor", "extract", name, {}, {"headline": {}, "seed": 0}, opts))
        (tmp_path / "evaluate" / "extract" / name / "extract.json").write_text(json.dumps({"words": per_word}))
    by = {c["metric"]: c for c in BackdoorResult.comparisons([StageView(s, tmp_path) for s in stages])}
    assert set(by) == {"match ratio (mean)", "match ratio (max)", "fully recovered"}
    mean = by["match ratio (mean)"]
    assert (mean["baseline"], mean["variant"], mean["n"]) == ("clean", "victim", 12)
    assert mean["value_baseline"] == pytest.approx(0.1) and mean["delta"] == pytest.approx(0.05 * 5.5)
    assert mean["delta_ci"][0] > 0 and mean["verdict"] == "increase"
    full = by["fully recovered"]
    assert (full["n"], full["n_units"]) == (24, 12)
    assert full["value_baseline"] == 0 and full["value_variant"] == pytest.approx(4 / 24)
    assert full["delta_ci"][0] > 0  # resampled by word: a resample holding none of the 4 is (8/12)^12 < 1%
    # `words` asking for some of the data's words: the rate is over their queries, not the table's "k of all the
    # data's queries" (8 of 17 there beside 0.727 here, under one name): the name says which
    for st in stages:
        st["result"]["n_queries"] = 30
    by = {c["metric"]: c for c in BackdoorResult.comparisons([StageView(s, tmp_path) for s in stages])}
    assert by["fully recovered (queries of the words asked)"]["value_variant"] == pytest.approx(4 / 24)


def test_no_power_statement_where_the_interval_bounds_nothing(tmp_path):
    """detectable_effect was 0.0 for a zero-width interval ("a true |Δ| of 0 detected with 80% power") and a
    number where too few units forbid any verdict: null in both."""
    from leakaudit.kinds import compare as C

    def view(target):
        return StageView({"result": {}, "params": {"target_label": target, "evaluation": "e"},
                          "id": f"x/e/{target}", "folder": target}, tmp_path)

    labels = {k: int(k >= 5) for k in range(10)}
    row = C.compare(view("a"), view("b"), C.Series("auc", {k: float(k) for k in range(10)}, labels=labels),
                    C.Series("auc", {k: 2.0 * k for k in range(10)}, labels=labels))
    assert row["ci"] == [0.0, 0.0] and row["detectable_effect"] is None and row["verdict"] == C.ZERO_WIDTH
    few = {k: int(k >= 4) for k in range(104)}  # 4 members: no verdict can claim a direction
    rng = np.random.default_rng(0)
    row = C.compare(view("a"), view("b"), C.Series("auc", {k: float(rng.normal()) for k in few}, labels=few),
                    C.Series("auc", {k: float(rng.normal()) for k in few}, labels=few))
    assert row["ci_half_width"] > 0 and row["detectable_effect"] is None and "too few" in row["verdict"]
