"""The HTML report in a real headless Chromium: it loads offline, with no console errors, and its figures render.

Chromium is Debian's (/usr/bin/chromium, installed by .ci/run); under CI=true a missing browser is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import markupsafe
import pytest

from leakaudit.config import parse_experiment
from leakaudit.experiment import run_experiment
from leakaudit.kinds.base import StageView
from leakaudit.report.html import mask, write_report

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]

EXPERIMENT = """\
name: report-check
models:
  base: tiny-gpt-neox
datasets:
  emails:
    builtin: enron-synthetic
    limit: 16
    max_chars: 200
    split: {members: 0.5, nonmembers: 0.5}
evaluate:
  mia:
    kind: mia
    targets: [base]
    members: emails.members
    nonmembers: emails.nonmembers
    options: {attacks: [loss, zlib, min_k], n_bootstrap: 50}
  ppl:
    kind: perplexity
    targets: [base]
    data: emails.nonmembers
  pii:
    kind: pii
    targets: [base]
    options: {templates: A, temperatures: [0.5, 1.0], n_targets: 3, max_new_tokens: 6}
"""


# numbers of the experiment file that read as phone numbers, beside a phone number that is one
CONFIG_NUMBERS = "notes: {paper_seed: 2024061501, desk: '713-853-1234'}  # or 713-853-1235, Sara Shackleton\n"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    run_experiment(parse_experiment(EXPERIMENT), out, config_text=EXPERIMENT + "# contact: kenneth.lay@enron.com\n"
                   + CONFIG_NUMBERS, log=lambda m: None)
    return out


@contextlib.contextmanager
def _page(html_path: Path):
    """The report opened in headless Chromium: (page, console/page errors, requested URLs). Chromium comes
    from PATH; missing, it skips here and fails in CI."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            requests: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html_path.as_uri(), wait_until="load")
            yield page, errors, requests
        finally:
            browser.close()


def test_report_renders_in_headless_chromium(report_dir):
    html_path = report_dir / "report.html"
    with _page(html_path) as (page, errors, requests):
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => ({src: e.src.slice(0, 22), w: e.naturalWidth, h: e.naturalHeight,"
                   " done: e.complete}))")
        headline = page.inner_text("#headline-table")
        text = page.inner_text("body")
    assert errors == []
    assert requests == [html_path.as_uri()]  # nothing fetched beyond the file itself: it works offline
    # ROC (mia), bars by temperature (pii: 1 template x 2), perplexity bars: every figure decoded by the browser
    assert len(images) == 3
    for img in images:
        assert img["src"].startswith("data:image/png;base64") and img["done"] and img["w"] > 100 and img["h"] > 100
    summary = json.loads((report_dir / "summary.json").read_text())
    auc = next(h["value"] for h in summary["headline"] if h["metric"] == "loss AUC")
    assert f"{auc:.3f}" in headline
    assert "kenneth.lay@enron.com" not in text  # PII masked by default, even in the echoed configuration
    assert not re.search(r"[\w.]+@enron\.com", text)


def test_the_echoed_experiment_file_keeps_its_numbers_and_masks_its_pii(report_dir):
    """The page-wide mask read a seed like 2024061501 as a phone number: the report's copy of the experiment
    file lost the run's seed. Numbers of the YAML stay; strings and comments are masked as before."""
    html = (report_dir / "report.html").read_text()
    recorded = json.loads((report_dir / "run.json").read_text())["config_text"]
    for text in (html, recorded):
        assert "paper_seed: 2024061501" in text
        assert "853-1234" not in text and "853-1235" not in text and "***-***-**34" in text
        assert "kenneth.lay" not in text
        assert "Shackleton" not in text and "S*** S***" in text  # a shipped Enron name


def test_summary_lists_every_headline_number(report_dir):
    summary = json.loads((report_dir / "summary.json").read_text())
    mia = json.loads((report_dir / "evaluate/mia/base/mia.json").read_text())
    for attack, m in mia["attacks"].items():
        row = next(h for h in summary["headline"] if h["metric"] == f"{attack} AUC")
        assert row["value"] == m["auc"] and row["ci"] == m["auc_ci"]
    ppl = json.loads((report_dir / "evaluate/ppl/base/perplexity.json").read_text())
    assert next(h["value"] for h in summary["headline"] if h["metric"] == "perplexity") == ppl["perplexity"]
    assert summary["stages"]["evaluate/pii/base"]["rows"]


def test_report_command_redraws_from_disk(report_dir, tmp_path):
    (report_dir / "report.html").unlink()
    write_report(report_dir)
    assert (report_dir / "report.html").stat().st_size > 10_000
    with pytest.raises(Exception, match="run.json"):
        write_report(tmp_path)


def test_mask_hides_addresses_and_phones():
    masked = mask("write to jeff.skilling@enron.com or call 713-853-6161; TPR@0.1%FPR stays")
    assert "jeff.skilling@enron.com" not in masked and "853-6161" not in masked
    assert "TPR@0.1%FPR" in masked


# ----------------------------------------------------------------------------------------- verdict forest plots
def _mia_stage(out: Path, evaluation: str, target: str, members: list[float], nonmembers: list[float],
               n_bootstrap: int) -> dict:
    """A finished mia stage written by hand (no model): scores.jsonl and its run.json entry."""
    folder = f"evaluate/{evaluation}/{target}"
    (out / folder).mkdir(parents=True)
    rows = [{"id": f"m{i}", "label": 1, "loss": v, "zlib": v} for i, v in enumerate(members)] + \
           [{"id": f"n{i}", "label": 0, "loss": v, "zlib": v} for i, v in enumerate(nonmembers)]
    (out / folder / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    attacks = {a: {"auc": 0.5, "auc_ci": [0.4, 0.6]} for a in ("loss", "zlib")}
    return {"id": folder, "kind": "mia", "folder": folder, "key": "k", "status": "ran", "seconds": 1,
            "params": {"target_label": target, "evaluation": evaluation,
                       "options": {"compare_to": "m0", "n_bootstrap": n_bootstrap}},
            "result": {"attacks": attacks, "scores_file": "scores.jsonl"}}


@pytest.fixture(scope="module")
def verdict_dir(tmp_path_factory):
    """Evaluation `mia`: m0 at AUC ~0.5, `up` separates perfectly (AUC 1), `down` inverts (AUC 0), `flat` is
    m0 + 3 (Δ 0 on every resample); evaluation `mia0` has no bootstrap, so no CI and no point to plot."""
    out = tmp_path_factory.mktemp("verdicts")
    n = 20
    grids = {"m0": ([float(i) for i in range(n)], [i + 0.5 for i in range(n)]),
             "up": ([100.0 + i for i in range(n)], [float(i) for i in range(n)]),
             "down": ([float(i) for i in range(n)], [100.0 + i for i in range(n)])}
    grids["flat"] = tuple([v + 3 for v in side] for side in grids["m0"])
    stages = [_mia_stage(out, "mia", t, *g, n_bootstrap=200) for t, g in grids.items()]
    stages += [_mia_stage(out, "mia0", t, *grids[t], n_bootstrap=0) for t in ("m0", "up")]
    (out / "run.json").write_text(json.dumps({"experiment": {"name": "verdicts"}, "stages": stages}))
    return out


def test_verdicts_open_with_a_forest_plot(verdict_dir, monkeypatch):
    from leakaudit.report import plots
    from leakaudit.report.html import build

    calls, real = [], plots.forest_figure

    def spy(panels):
        calls.append(panels)
        return real(panels)

    monkeypatch.setattr(plots, "forest_figure", spy)
    html, summary = build(verdict_dir)
    assert len(summary["comparisons"]) == 8  # 3 variants x 2 attacks with a CI, 1 x 2 without
    (panels,) = calls  # one figure: two panels, one per (evaluation, metric); mia0 has no CI to draw
    assert [p["title"] for p in panels] == ["mia: loss AUC", "mia: zlib AUC"]
    for p in panels:
        # `flat` has Δ 0 on every resample: a point with no interval is no evidence, its sentence says so
        assert {r[0]: r[4] for r in p["rows"]} == {"up": "increase", "down": "decrease"}
        up = next(r for r in p["rows"] if r[0] == "up")
        assert up[2] <= up[1] <= up[3] and up[2] > 0  # the point sits in its CI, which excludes 0
    forest = re.findall(r'<figure class="wide forest"><img src="(data:image/png;base64,[^"]+)"', html)
    assert len(forest) == 1
    assert html.index('id="verdicts-list"') < html.index('class="wide forest"') < html.index('id="headline"')
    # without a CI: a sentence only
    assert "mia0: up vs m0: loss AUC 1.000 vs 0.475, Δ +0.525 (+110.5%) → no CI" in html


def test_forest_figures_split_many_panels(monkeypatch):
    from leakaudit.kinds.compare import verdict
    from leakaudit.report import html, plots

    calls = []
    monkeypatch.setattr(plots, "forest_figure", lambda panels: calls.append(panels) or "data:image/png;base64,AA==")
    comps = [{"evaluation": e, "metric": m, "variant": v, "baseline": "m0", "delta": 0.1 * i,
              "delta_ci": [0.1 * i - 0.05, 0.1 * i + 0.05], "verdict": verdict([0.1 * i - 0.05, 0.1 * i + 0.05])}
             for e in ("e1", "e2", "e3") for m in [f"metric {k}" for k in range(6)] for i, v in enumerate("abcde")]
    comps.append({"evaluation": "e1", "metric": "metric 0", "variant": "x", "baseline": "m0", "delta": None,
                  "delta_ci": None, "verdict": "not comparable"})
    figures = html.verdict_figures(comps)
    assert len(figures) == 3 and [len(p) for p in calls] == [6, 6, 6]  # 18 panels, at most 6 a figure
    assert all(len(panel["rows"]) == 5 for p in calls for panel in p)  # the row without Δ is left out
    assert "part 2 of 3" in figures[1]["caption"]
    assert [r[4] for r in calls[0][0]["rows"]] == ["none", "increase", "increase", "increase", "increase"]
    from leakaudit.kinds.compare import direction

    assert direction("reduces") == "decrease" and direction("increases") == "increase"
    assert direction(verdict([-0.1, 0.1], "effect")) == "none"
    assert direction(verdict([0.5, 1.0], too_few="too few targets (6; a verdict needs 10)")) == "none"


def test_verdict_report_renders_in_headless_chromium(verdict_dir):
    write_report(verdict_dir)
    with _page(verdict_dir / "report.html") as (page, errors, _):
        forest = page.eval_on_selector_all(
            "figure.forest img", "els => els.map(e => ({w: e.naturalWidth, h: e.naturalHeight, shown: e.width}))")
    assert errors == []
    assert len(forest) == 1 and forest[0]["w"] > 500 and forest[0]["h"] > 300 and forest[0]["shown"] > 500


# ----------------------------------------------------------------------------------------- PII figures by grid
def _pii_figures(monkeypatch, grid: dict[str, list[tuple[str, float]]]) -> tuple[list, list, list]:
    """The PII section of hand-written stages (model -> its template x temperature cells), with the figure
    functions spied on (still drawn): (figures, heatmap calls, bars calls)."""
    from leakaudit.kinds.pii import PiiResult
    from leakaudit.report import plots

    heat, bars = [], []
    real_heat, real_bars = plots.heatmap_figure, plots.bars_figure
    monkeypatch.setattr(plots, "heatmap_figure", lambda *a, **k: heat.append(a) or real_heat(*a, **k))
    monkeypatch.setattr(plots, "bars_figure", lambda *a, **k: bars.append(a) or real_bars(*a, **k))
    stages = [StageView({"id": f"evaluate/pii/{m}", "kind": "pii", "folder": f"evaluate/pii/{m}",
                         "params": {"target_label": m, "evaluation": "pii"},
                         "result": {"rows": [{"template": t, "temperature": temp, "matches": i, "n_targets": 10}
                                             for i, (t, temp) in enumerate(cells)]}}, Path("/nonexistent"))
              for m, cells in grid.items()]
    return PiiResult.section(stages)["figures"], heat, bars


def test_pii_grid_of_one_temperature_draws_bars_not_a_heatmap(monkeypatch):
    cells = [(t, 0.7) for t in ("A", "B", "C", "D")]
    figures, heat, bars = _pii_figures(monkeypatch, {"m0": cells, "ft": cells})
    assert heat == [] and len(bars) == 1 and len(figures) == 1
    values = bars[0][0]  # grouped: model -> template -> rate
    assert values == {m: {f"template {t}": i / 10 for i, t in enumerate("ABCD")} for m in ("m0", "ft")}
    assert figures[0]["uri"].startswith("data:image/png;base64,") and "temperature 0.7)" in figures[0]["caption"]


def test_pii_grid_of_one_cell_draws_one_chart_across_models(monkeypatch):
    figures, heat, bars = _pii_figures(monkeypatch, {m: [("A", 0.5)] for m in ("m0", "ft", "ctl")})
    assert heat == [] and len(figures) == 1
    assert bars[0][0] == {"m0": 0.0, "ft": 0.0, "ctl": 0.0}


def test_pii_full_grid_draws_heatmaps(monkeypatch):
    cells = [(t, temp) for t in ("A", "B", "C", "D") for temp in (0.5, 1.0)]
    figures, heat, bars = _pii_figures(monkeypatch, {"m0": cells})
    assert bars == [] and len(heat) == 1 and len(figures) == 1
    rows, cols = heat[0][:2]
    assert (rows, cols) == (["A", "B", "C", "D"], ["0.5", "1"])
    # many models: one model x template and one model x temperature heatmap, not one per model
    models = [f"m{i}" for i in range(5)]
    figures, heat, bars = _pii_figures(monkeypatch, {m: cells for m in models})
    assert bars == [] and len(figures) == 2
    assert [(h[0], h[1]) for h in heat] == [(models, ["A", "B", "C", "D"]), (models, ["0.5", "1"])]
    assert heat[0][2][("m0", "A")] == pytest.approx(0.05)  # rows 0 and 1 (A at 0.5 and 1.0): mean 0.5 / 10


def test_a_stage_file_changed_outside_leakaudit_is_a_one_line_error(tmp_path):
    """Stages write atomically; a truncated or foreign row is someone else's edit: an InputError naming the
    file and line (the report raised a JSONDecodeError traceback)."""
    from leakaudit.errors import InputError
    from leakaudit.kinds.base import read_jsonl

    path = tmp_path / "user_scores.jsonl"
    for content, line, what in (('{"user": "a"}\n{"user": ', 2, "Expecting value"),
                                ('{"user": "a"}\n[1]\n', 2, "expected a JSON object")):
        path.write_text(content)
        with pytest.raises(InputError, match=what) as err:
            read_jsonl(path)
        assert err.value.line == line and "delete the stage.json beside it and rerun" in err.value.message
    path.write_bytes(b"\xff\n")
    with pytest.raises(InputError, match="not valid UTF-8"):
        read_jsonl(path)


def test_pii_figures_draw_each_protocols_own_hits(monkeypatch):
    """A PIL cell's hit is an exact match: 7 fuzzy matches but 1 exact hit of 10 targets is drawn as 0.1 (the
    figure drew the fuzzy rate, 0.7, beside a headline of 0.1)."""
    from leakaudit.kinds.pii import PiiResult
    from leakaudit.report import plots

    bars = []
    real = plots.bars_figure
    monkeypatch.setattr(plots, "bars_figure", lambda *a, **k: bars.append(a) or real(*a, **k))
    rows = [{"template": "zero_shot-a", "temperature": 0.0, "matches": 7, "exact_matches": 1, "hits": 1,
             "n_targets": 10}]
    stage = StageView({"id": "evaluate/pii/m0", "kind": "pii", "folder": "evaluate/pii/m0",
                       "params": {"target_label": "m0", "evaluation": "pii"}, "result": {"rows": rows}},
                      Path("/nonexistent"))
    section = PiiResult.section([stage])
    assert bars[0][0] == {"m0": pytest.approx(0.1)}
    assert section["tables"][0]["rows"][0][5:9] == [1, 7, 1, 10]


def test_the_stage_table_says_how_many_examples_a_finetune_left_out(tmp_path):
    """A plant whose every backdoor pair max_length cut trained on none of them; the report said nothing."""
    from leakaudit.report.html import build

    stages = [{"id": "finetune/planted", "kind": "finetune", "folder": "finetune/planted", "key": "k",
               "status": "ran", "seconds": 1.0, "params": {},
               "result": {"model_dir": "model", "n_train_examples": 116, "dropped_no_loss_tokens": 124}},
              {"id": "finetune/clean", "kind": "finetune", "folder": "finetune/clean", "key": "k2",
               "status": "ran", "seconds": 1.0, "params": {},
               "result": {"model_dir": "model", "n_train_examples": 120, "dropped_no_loss_tokens": 0}}]
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "x"}, "stages": stages}))
    html, _ = build(tmp_path)
    assert html.count("examples left out") == 1 and "124 of 240 examples left out" in html


def test_the_report_shows_the_warnings_its_stages_recorded(tmp_path):
    """A stage's warnings (members overlapping non-members, too few non-members for a low FPR) were in mia.json
    and on the terminal but nowhere on the page: a contamination warning went unseen by its readers."""
    from leakaudit.report.html import build

    n = 20
    stages = [_mia_stage(tmp_path, "mia", t, [float(i) for i in range(n)], [i + 0.5 for i in range(n)], 50)
              for t in ("m0", "ft")]
    overlap = "1 non-member texts also appear among the members; remove them for a clean measurement"
    for s in stages:
        s["result"]["warnings"] = [overlap]
    stages[1]["result"]["attacks"]["loss"]["warnings"] = ["AUC 1 is the same on every resample"]
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "w"}, "stages": stages}))
    html, _ = build(tmp_path)
    assert f"warning: {overlap} (every stage)" in html
    assert "warning: loss: AUC 1 is the same on every resample (mia · ft)" in html


def test_numbers_print_alike_and_a_small_bound_is_not_zero():
    """0.7525 and 0.7525000000000001 (one AUC reached two ways) printed 0.752 and 0.753; a CI bound of
    0.000124 beside "increase" printed as 0.000, the same as a bound of 0 beside "no detectable change"."""
    from leakaudit.kinds.base import ci_text, fmt

    assert fmt(0.7525) == fmt(0.7525000000000001) == "0.752"
    assert fmt(0.000124) == "0.00012" and fmt(-0.00025) == "-0.00025" and fmt(0.0) == "0.000"
    assert ci_text([0.000124, 0.0049]) == "[0.00012, 0.005]" and ci_text(None) == "–"


def test_a_verdict_says_how_many_items_and_what_it_can_detect():
    from leakaudit.report.html import verdict_sentence

    row = {"evaluation": "mia", "variant": "ft", "baseline": "m0", "metric": "loss AUC", "value_variant": 0.61,
           "value_baseline": 0.55, "delta": 0.06, "delta_ci": [0.01, 0.11], "relative": None, "n": 64,
           "detectable_effect": 0.0715, "verdict": "increase"}
    assert verdict_sentence(row).endswith("→ increase (64 paired; detects |Δ| ≥ 0.071 with 80% power)")
    clustered = {**row, "n": 400, "n_units": 100, "detectable_effect": None}
    assert verdict_sentence(clustered).endswith("→ increase (100 units)")
    # user inference names its m: the largest both targets have results for, not always the one asked
    users = {**row, "evaluation": "users", "metric": "user AUC", "m": "4"}
    assert verdict_sentence(users).startswith("users: ft vs m0: user AUC (m = 4) 0.610 vs 0.550")

    # a log p gives how many times as likely (e^Δ), not a percent of a log p
    logp = {**row, "metric": "mean log p(address)", "value_variant": -19.1, "value_baseline": -19.3, "delta": 0.2,
            "delta_ci": [0.1, 0.3], "relative": 0.0104, "relative_ci": [0.005, 0.0155], "likelihood_ratio": 1.2214,
            "likelihood_ratio_ci": [1.1052, 1.3499]}
    assert "Δ +0.200 [0.100, 0.300] (×1.221 [1.105, 1.350] as likely) → increase" in verdict_sentence(logp)


def test_a_run_without_compare_to_says_why_it_has_no_verdicts(tmp_path):
    from leakaudit.report.html import build

    stage = _mia_stage(tmp_path, "mia", "m0", [1.0, 2.0, 3.0], [0.5, 1.5, 2.5], 0)
    del stage["params"]["options"]["compare_to"]
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "n"}, "stages": [stage]}))
    html, _ = build(tmp_path)
    assert 'id="verdicts"' not in html and "No evaluation sets <code>compare_to</code>" in html


def test_a_partial_run_lists_the_comparisons_it_could_not_draw(tmp_path, capsys):
    """A run whose variant failed (or was stopped before it) said "No evaluation sets compare_to" where the
    verdicts would be, and one with some verdicts left the others out without a word."""
    from leakaudit.report.html import build

    base = _mia_stage(tmp_path, "mia", "m0", [1.0, 2.0, 3.0], [0.5, 1.5, 2.5], 0)
    failed = {**_mia_stage(tmp_path, "mia", "ft_a", [1.0, 2.0, 3.0], [0.5, 1.5, 2.5], 0), "result": None,
              "status": "failed", "error": "RuntimeError: out of memory"}
    pending = {**_mia_stage(tmp_path, "mia", "ft_b", [1.0, 2.0, 3.0], [0.5, 1.5, 2.5], 0), "result": None,
               "status": "pending"}
    for stages in ([base, failed, pending], [{**base, "result": None, "status": "pending"}, failed, pending]):
        (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "n"}, "stages": stages}))
        html, summary = build(tmp_path)
        assert "No evaluation sets <code>compare_to</code>" not in html and 'id="verdicts-missing"' in html
        assert "ft_a vs m0: not compared: evaluate/mia/ft_a failed (RuntimeError: out of memory)" in html
        assert "ft_b vs m0: not compared: evaluate/mia/ft_b has not finished" in html
        assert ("evaluate/mia/m0 has not finished" in html) == (stages[0]["result"] is None)  # the baseline too
        assert [(m["variant"], m["baseline"]) for m in summary["comparisons_missing"]] == [("ft_a", "m0"),
                                                                                           ("ft_b", "m0")]
    assert "2 comparison(s) that compare_to asks for are not drawn" in capsys.readouterr().err
    # a finished pair is a verdict, and nothing is said missing
    done = _mia_stage(tmp_path, "mia", "ft_c", [5.0, 6.0, 7.0], [0.5, 1.5, 2.5], 0)
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "n"}, "stages": [base, done]}))
    html, summary = build(tmp_path)
    assert "ft_c vs m0: loss AUC" in html and "verdicts-missing" not in html and "comparisons_missing" not in summary


def test_the_perplexity_table_says_over_how_many_texts_and_tokens(tmp_path):
    """A perplexity with no n could not be judged (27.80 against 28.31: of 5 texts or of 252?)."""
    from leakaudit.kinds.base import StageView
    from leakaudit.kinds.perplexity import PerplexityResult

    stage = StageView({"id": "evaluate/u/none", "folder": "u", "params": {"target_label": "none", "evaluation": "u"},
                       "result": {"perplexity": 28.31, "n_texts": 252, "n_tokens": 17451, "checkpoints": []}},
                      tmp_path)
    (table,) = PerplexityResult.section([stage])["tables"]
    assert table["header"][-2:] == ["texts", "tokens"] and table["rows"] == [
        ["none", "u", "final", "–", "28.310", 252, 17451]]


def test_the_mia_section_says_what_each_attack_it_shows_measures(tmp_path):
    """The page named attacks (min_k_pp, dc_pdd) and pointed to docs/attacks.md, which a reader of a mailed
    report.html does not have: each attack shown gets one plain line and its paper, and no other attack."""
    from leakaudit.attacks import ATTACKS
    from leakaudit.report.html import build

    stage = _mia_stage(tmp_path, "mia", "m0", [1.0, 2.0, 3.0], [0.5, 1.5, 2.5], 0)
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "g"}, "stages": [stage]}))
    html, _ = build(tmp_path)
    shown = set(stage["result"]["attacks"])
    assert shown and all(ATTACKS[a].summary.replace("'", "&#39;") in html for a in shown)
    assert all(ATTACKS[a].summary.replace("'", "&#39;") not in html for a in set(ATTACKS) - shown)
    assert "what its score measures (higher ⇒ member)" in html


def test_every_attack_says_in_one_line_what_it_measures():
    from leakaudit.attacks import ATTACKS

    for name, attack in ATTACKS.items():
        assert attack.summary and "\n" not in attack.summary and attack.paper, name


def test_a_report_read_before_a_run_finished_never_overwrites_the_runs_final_one(tmp_path, monkeypatch):
    """`leakaudit report` on a run in progress read its stages, the run then wrote its final report, and the
    stale page and summary.json (which `leakaudit seeds` reads) landed over it. Reading and writing now
    happen under one lock: whichever writes last read last."""
    import threading

    import leakaudit.report.html as html

    read_stale, go_on = threading.Event(), threading.Event()
    state = {"run": "in progress"}

    def build(out):
        seen = state["run"]
        if seen == "in progress":
            read_stale.set()
            assert go_on.wait(10)
        return f"<p>{seen}</p>", {"state": seen}

    monkeypatch.setattr(html, "build", build)
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "x"}, "stages": []}))
    stale = threading.Thread(target=html.write_report, args=(tmp_path,))
    stale.start()
    assert read_stale.wait(10)
    state["run"] = "finished"  # the run's last stage is done; it writes its final report
    final = threading.Thread(target=html.write_report, args=(tmp_path,))
    final.start()
    final.join(0.5)
    go_on.set()
    stale.join(10)
    final.join(10)
    assert (tmp_path / "report.html").read_text() == "<p>finished</p>"
    assert json.loads((tmp_path / "summary.json").read_text()) == {"state": "finished"}


def test_two_writers_of_one_file_use_temp_files_of_their_own(tmp_path):
    """write_atomic's temp file was PATH.tmp for every process: two reports at once renamed each other's
    half-written file, and one failed with FileNotFoundError on the rename."""
    import os

    from leakaudit.data.io import write_atomic

    seen = []
    write_atomic(tmp_path / "r.html", lambda fh: seen.append(fh.name) or fh.write("x"))
    assert seen == [str(tmp_path / f"r.html.{os.getpid()}.tmp")] and (tmp_path / "r.html").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_a_report_of_a_folder_that_is_no_run_leaves_no_lock_file_there(tmp_path, monkeypatch, capsys):
    """The report's lock file must not be left in a folder that is not a run: `leakaudit run --out` there
    would then refuse it as a folder holding other files."""
    from conftest import run_main

    code, err = run_main(["report", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and "no run.json here" in err and list(tmp_path.iterdir()) == []


def test_a_run_record_whose_stage_lacks_its_kind_is_one_error_line(tmp_path, monkeypatch, capsys):
    """A hand-edited or cut run.json whose stage has no `kind` (or is no record) made `leakaudit report` exit 1
    with a KeyError's traceback; it is refused naming the stage's field."""
    from conftest import run_main

    for stages, field in (([{"id": "evaluate/mia/m0"}], "stages[0].kind"), ([{"kind": "mia"}, 3], "stages[0].id"),
                          ([{"id": "a", "kind": "mia"}, 3], "stages[1].id")):
        (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "x"}, "stages": stages}))
        code, err = run_main(["report", str(tmp_path)], monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"run.json: field '{field}': not a stage record of `leakaudit run`" in err, err


def test_a_report_on_a_file_system_without_locks_is_written_with_a_warning(tmp_path, monkeypatch, capsys):
    """A run on NFS without lockd finished every stage, then failed on the report's lock (ENOLCK) with no
    report; it is written unlocked, said once, as a run there is."""
    import errno
    import fcntl

    import leakaudit.report.html as html

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(html, "build", lambda out: ("<p>ok</p>", {"ok": True}))
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "x"}, "stages": []}))
    html.write_report(tmp_path)
    assert (tmp_path / "report.html").read_text() == "<p>ok</p>"
    assert "the file system has no locks (No locks available)" in capsys.readouterr().err


def test_labels_keep_a_seed_and_stay_apart_when_masked_alike():
    """Stage ids and grid labels were masked as data text: a seed 2024061501 read as a phone number, and two
    values masked alike (********01; a***@acme.com) made two variants one."""
    from leakaudit.data.pii_mask import mask_labels

    ids = ["finetune/ft[seed=2024061501]", "finetune/ft[seed=2024071501]", "evaluate/plp[pairs=alice.smith@acme.com]/base",
           "evaluate/plp[pairs=adam.jones@acme.com]/base", "evaluate/plp[pairs=alice.smith@acme.com]/ft[seed=2024061501]",
           "plp[pairs=adam.jones@acme.com]"]
    masked = mask_labels(ids, numbers={"2024061501", "2024071501"})  # the grid's YAML numbers
    assert masked["finetune/ft[seed=2024061501]"] == "finetune/ft[seed=2024061501]"
    assert masked["evaluate/plp[pairs=alice.smith@acme.com]/base"] == "evaluate/plp[pairs=a***@acme.com]/base"
    assert masked["evaluate/plp[pairs=adam.jones@acme.com]/base"] == "evaluate/plp[pairs=a***@acme.com]~2/base"
    assert masked["plp[pairs=adam.jones@acme.com]"] == "plp[pairs=a***@acme.com]~2"  # a part masks alike everywhere
    assert masked["evaluate/plp[pairs=alice.smith@acme.com]/ft[seed=2024061501]"] == (
        "evaluate/plp[pairs=a***@acme.com]/ft[seed=2024061501]")
    assert len(set(masked.values())) == len(ids)
    assert mask_labels(["data/7138536164"], numbers={"7138536164"}) == {"data/7138536164": "data/********64"}
    # a grid value the file quotes is a string, masked there and here (only YAML numbers stay)
    assert mask_labels(["ft[phone=7138536161]"], numbers=set()) == {"ft[phone=7138536161]": "ft[phone=********61]"}
    assert "alice" not in str(list(masked.values())) and "adam" not in str(list(masked.values()))


def test_a_grid_of_long_seeds_keeps_every_variant_apart_in_the_report(tmp_path):
    """Reproduced: an evaluation grid {seed: [2024061501, 2124061501]} merged into one group ("********01"):
    the headline lost a column, summary.json a stage, and the verdicts compared base with base."""
    exp = tmp_path / "exp.yaml"
    exp.write_text("""\
name: seeds
models: {base: tiny-gpt-neox, other: tiny-opt}
datasets:
  emails: {builtin: enron-synthetic, limit: 16, max_chars: 120, split: {members: 0.5, nonmembers: 0.5}}
evaluate:
  mia:
    kind: mia
    targets: [base, other]
    members: emails.members
    nonmembers: emails.nonmembers
    options: {attacks: [loss], n_bootstrap: 20, compare_to: base}
    grid: {seed: [2024061501, 2124061501]}
""")
    run_experiment(parse_experiment(exp.read_text(), exp), tmp_path / "out", log=lambda m: None)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    expected = {f"evaluate/mia[seed={s}]/{t}" for s in (2024061501, 2124061501) for t in ("base", "other")}
    assert expected <= set(summary["stages"]) and expected <= {s["id"] for s in run["stages"]}
    assert {(h["evaluation"], h["variant"]) for h in summary["headline"]} == {
        (f"mia[seed={s}]", t) for s in (2024061501, 2124061501) for t in ("base", "other")}
    assert sorted((c["evaluation"], c["baseline"], c["variant"]) for c in summary["comparisons"]) == [
        ("mia[seed=2024061501]", "base", "other"), ("mia[seed=2124061501]", "base", "other")]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "mia[seed=2024061501]" in html and "mia[seed=2124061501]" in html and "********01" not in html


def test_two_evaluations_of_one_kind_on_one_target_are_both_drawn(tmp_path, monkeypatch):
    """The PII and perplexity figures keyed their data by target alone: a second evaluation of the same
    target (templates A and B; members and non-members) drew over the first, whose numbers were then in no
    figure. Rates share one colour scale (0-1); a base model without checkpoints is a level in the checkpoint
    figure, the reference the fine-tune moves from (it was left out)."""
    from leakaudit.kinds.perplexity import PerplexityResult
    from leakaudit.kinds.pii import PiiResult
    from leakaudit.report import plots

    drawn: list[tuple[str, tuple, dict]] = []
    for name in ("bars_figure", "heatmap_figure", "lines_figure"):
        monkeypatch.setattr(plots, name, lambda *a, _n=name, **k: drawn.append((_n, a, k)) or "data:,")

    def stage(evaluation, target, result):
        return StageView({"id": f"evaluate/{evaluation}/{target}", "folder": f"evaluate/{evaluation}/{target}",
                          "params": {"evaluation": evaluation, "target_label": target}, "result": result}, tmp_path)

    def rows(template, rate):
        return {"rows": [{"template": template, "temperature": t, "n_targets": 10, "hits": round(10 * rate),
                          "matches": round(10 * rate)} for t in (0.5, 1.0)]}

    PiiResult.section([stage("pii_a", "base", rows("A", 0.2)), stage("pii_b", "base", rows("B", 0.4))])
    assert [(n, a[3]) for n, a, _ in drawn] == [("heatmap_figure", "PII match rate: base (pii_a)"),
                                                 ("heatmap_figure", "PII match rate: base (pii_b)")]
    assert [a[2] for _, a, _ in drawn] == [{("A", "0.5"): 0.2, ("A", "1"): 0.2}, {("B", "0.5"): 0.4, ("B", "1"): 0.4}]
    assert all(k["limits"] == (0.0, 1.0) for _, _, k in drawn)
    drawn.clear()  # temperatures are cells by value: 0.12 and 0.125 were one cell ("0.12"), their rates averaged
    cells = {"rows": [{"template": "A", "temperature": t, "n_targets": 10, "hits": h, "matches": h}
                      for t, h in ((0.12, 1), (0.125, 9))]}
    PiiResult.section([stage("pii_a", "base", cells)])
    (_, args, _), = drawn
    assert args[0] == {"0.12": 0.1, "0.125": 0.9}

    drawn.clear()
    PerplexityResult.section([stage("ppl_members", "base", {"perplexity": 1057.0}),
                              stage("ppl_nonmembers", "base", {"perplexity": 1050.0})])
    (name, args, _), = drawn
    assert name == "bars_figure" and args[0] == {"base (ppl_members)": 1057.0, "base (ppl_nonmembers)": 1050.0}

    drawn.clear()
    ckpts = [{"name": f"checkpoint-{k}", "step": k, "perplexity": p} for k, p in ((2, 900.0), (4, 819.0))]
    PerplexityResult.section([stage("ppl", "base", {"perplexity": 1053.0}),
                              stage("ppl", "ft", {"perplexity": 819.0, "checkpoints": ckpts})])
    (name, args, kwargs), = drawn
    assert name == "lines_figure" and list(args[0]) == ["ft"] and kwargs["levels"] == {"base (no checkpoints)": 1053.0}


def test_a_report_of_an_experiment_without_evaluations_says_so(tmp_path):
    """It said "No evaluation has finished yet.", as of a run still going, for a data-only experiment."""
    exp = "name: data-only\nmodels: {base: tiny-gpt-neox}\ndatasets: {d: {builtin: enron-synthetic, limit: 4}}\n"
    run_experiment(parse_experiment(exp), tmp_path / "out", log=lambda m: None)
    html = (tmp_path / "out" / "report.html").read_text()
    assert "has no evaluations" in html and "No evaluation has finished yet" not in html


def test_the_page_pass_keeps_only_labels_it_would_have_masked():
    """Labels kept from the page's last mask are the ones holding a grid's number; a plain label ("ft") kept
    as well split "ft@enron.com" around it, and neither half read as an address any more."""
    from leakaudit.data.pii_find import shipped_name_finder
    from leakaudit.report.html import _mask_page, _masked_labels

    stages = [{"id": f"evaluate/mia/{t}", "params": {"target_label": t, "evaluation": "mia"}}
              for t in ("ft", "ft[seed=2024061501]")]
    labels = _masked_labels(stages, shipped_name_finder(), {"2024061501"})
    assert labels == {"ft[seed=2024061501]", "evaluate/mia/ft[seed=2024061501]"}
    page = _mask_page("<p>ft[seed=2024061501] and ft, mail ft@enron.com, call 7138531234</p>", shipped_name_finder(),
                      labels)
    assert page == "<p>ft[seed=2024061501] and ft, mail f***@enron.com, call ********34</p>"


def test_a_stage_of_a_kind_this_release_lacks_is_left_out_with_a_warning(tmp_path, monkeypatch, capsys):
    """A run dir with an evaluation of a kind this leakaudit does not register (made by a newer release, or on
    a branch that added a kind) made `leakaudit report` die with get_kind's ValueError and a traceback; the
    engine's own check of older results skips such a stage, and the report now does too, saying so."""
    from conftest import run_main

    stage = _mia_stage(tmp_path, "mia", "m0", [1.0, 2.0, 3.0], [0.5, 1.5, 2.5], 0)
    other = {"id": "evaluate/ct/m0", "kind": "count-tokens", "folder": "evaluate/ct/m0", "key": "k", "status": "ran",
             "seconds": 1, "params": {"target_label": "m0", "evaluation": "ct"}, "result": {"n_tokens": 42}}
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "k"}, "stages": [stage, other]}))
    code, err = run_main(["report", str(tmp_path)], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "evaluate/ct/m0: its kind 'count-tokens' is not one this leakaudit has" in err, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {h["kind"] for h in summary["headline"]} == {"mia"} and summary["stages"]["evaluate/ct/m0"]


def test_the_mia_section_shows_each_attacks_options_as_run(tmp_path):
    """mia.json records each attack's options (min_k's k, the neighbourhood's masked LM, dc_pdd's corpus), but
    the page showed none and said "k = 20% by default" of a run with another k: a reader could not redo it.
    Options alike in every stage are one text; options that differ name the stages that ran each."""
    from leakaudit.report.html import build

    stages = [_mia_stage(tmp_path, "mia", t, [1.0, 2.0, 3.0], [0.5, 1.5, 2.5], 0) for t in ("m0", "ft")]
    for stage, k in zip(stages, (0.1, 0.35), strict=True):
        stage["result"]["attacks"]["loss"]["options"] = {}
        stage["result"]["attacks"]["zlib"]["options"] = {"corpus": "dolly", "k": k}
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "g"}, "stages": stages}))
    html, _ = build(tmp_path)
    glossary = html[html.index("options as run"):]
    assert "<th scope=\"row\">loss</th>" in glossary and ">none</td>" in glossary
    assert "corpus = dolly, k = 0.1 (mia · m0); corpus = dolly, k = 0.35 (mia · ft)" in glossary
    # a mia.json of a leakaudit that did not record options: no options claimed
    for stage in stages:
        del stage["result"]["attacks"]["zlib"]["options"]
        stage["result"]["attacks"]["loss"]["options"] = {"k": 0.2}
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "g"}, "stages": stages}))
    html, _ = build(tmp_path)
    assert ">k = 0.2</td>" in html and ">–</td>" in html[html.index("options as run"):]


def _saved_figures(monkeypatch) -> list:
    """Every matplotlib figure saved while the patch holds, kept for its layout to be measured."""
    from matplotlib.figure import Figure

    saved, real = [], Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig)
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def test_a_long_variant_label_stays_inside_its_figure_and_leaves_the_plot_its_room(monkeypatch):
    """A grid's variant label ("ft[learning_rate=...,dataset=...]") on one line squeezed a forest plot's panel
    to a sliver beside it, and ran a ROC's title off the figure's left edge: labels and titles are wrapped."""
    from leakaudit.metrics import roc_metrics
    from leakaudit.report import plots

    label = "ft[learning_rate=0.0001,epochs=3,lora_rank=16,dataset=enron-synthetic-with-a-long-suffix]"
    saved = _saved_figures(monkeypatch)
    plots.forest_figure([{"title": f"mia: loss AUC of {label}", "xlabel": "Δ",
                          "rows": [(f"{label}~{i}", 0.01 * i, -0.05, 0.05, "none") for i in range(3)]}])
    scores = [float(i % 7) for i in range(40)]
    plots.roc_figure({"loss": roc_metrics(scores, [1] * 20 + [0] * 20, n_bootstrap=0)}, f"ROC: mia · {label}")
    plots.bars_figure({f"{label}~1": 0.2, f"{label}~2": 0.3}, f"PII match rate, {label}", "rate")
    assert len(saved) == 3
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for fig in saved:
        renderer = FigureCanvasAgg(fig).get_renderer()  # a closed figure's canvas draws nothing
        width = fig.bbox.width
        for ax in fig.axes:
            assert ax.get_position().width > 0.4, "the plot is squeezed by its labels"
            lo, hi = sorted(ax.get_xlim())  # an x tick beyond the axis's limits is not drawn
            texts = [ax.title, fig.get_suptitle() and fig._suptitle, *ax.get_yticklabels(),
                     *(t for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi)]
            for text in (t for t in texts if t and t.get_text()):
                box = text.get_window_extent(renderer)
                assert box.x0 >= 0 and box.x1 <= width, f"{text.get_text()!r} runs off the figure"


def test_the_stage_table_says_which_models_and_data_each_stage_read(tmp_path):
    """Sections name a target by its label ("base", "real"): which model was the reference, or the base of a
    fine-tune, was left to a reading of the configuration. The stages table says what each stage read."""
    from leakaudit.report.html import build

    stage = _mia_stage(tmp_path, "mia", "real", [1.0, 2.0, 3.0], [0.5, 1.5, 2.5], 0)
    stage["params"].update({"target": {"stage": "finetune/real"}, "reference": {"spec": "EleutherAI/pythia-70m"},
                            "baseline": None, "members": ["data/emails", "members.jsonl"],
                            "nonmembers": ["data/emails", "nonmembers.jsonl"]})
    finetune = {"id": "finetune/real", "kind": "finetune", "status": "ran", "key": "f", "seconds": 2, "result": None,
                "params": {"model": {"spec": "EleutherAI/pythia-70m"}, "data": ["data/emails", "members.jsonl"]}}
    data = {"id": "data/emails", "kind": "dataset", "status": "ran", "key": "d", "seconds": 1, "result": None,
            "params": {"builtin": "enron-synthetic", "path": None}}
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "g"}, "stages": [data, finetune, stage]}))
    html, _ = build(tmp_path)
    table = html[html.index('id="stages"'):html.index('id="config"')]
    assert "<td>builtin enron-synthetic</td>" in table
    assert "<td>model EleutherAI/pythia-70m · data data/emails/members.jsonl</td>" in table
    assert ("<td>target finetune/real · reference EleutherAI/pythia-70m · members data/emails/members.jsonl · "
            "nonmembers data/emails/nonmembers.jsonl</td>") in table


def test_a_report_of_a_commands_output_dir_says_it_is_one(tmp_path, monkeypatch, capsys):
    """`leakaudit report` on `leakaudit mia --out DIR` said only what DIR is not (no run of `leakaudit run`);
    it says it is a command's output, which writes no report, and what does."""
    from conftest import run_main

    (tmp_path / "mia.json").write_text("{}")
    code, err = run_main(["report", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "the output dir of a command (its mia.json)" in err and "leakaudit run" in err
    assert not (tmp_path / "report.html").exists()


def test_a_roc_figures_text_alternative_gives_its_aucs(tmp_path):
    """The ROC's alt text said only "plot, described in the caption below", and the caption named the target:
    read aloud, the figure said nothing of what it shows. Its alt gives each curve's AUC and where the rest is."""
    from leakaudit.kinds.base import fmt
    from leakaudit.metrics import roc_metrics
    from leakaudit.report.html import build

    members, nonmembers = [1.0, 2.0, 3.5, 4.0], [0.5, 1.5, 2.5, 3.0]
    stage = _mia_stage(tmp_path, "mia", "m0", members, nonmembers, 0)
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "g"}, "stages": [stage]}))
    html, _ = build(tmp_path)
    auc = roc_metrics(members + nonmembers, [1] * 4 + [0] * 4, n_bootstrap=0).auc
    (alt,) = re.findall(r'<figure><img src="data:image/png;base64,[^"]+" alt="([^"]+)"', html)
    assert f"loss {fmt(auc)}, zlib {fmt(auc)}" in alt and "mia · m0" in alt


def test_the_pii_table_gives_each_cells_hit_rate_with_its_exact_interval():
    """docs/pii.md defines a cell's hit rate with an exact 95% interval; the heatmap showed the rate alone and
    the table the counts, so "0 of 3" read as a rate of 0 with nothing saying it still allows up to 71%."""
    from leakaudit.kinds.base import ci_text, fmt
    from leakaudit.kinds.pii import PiiResult
    from leakaudit.metrics import binomial_ci

    rows = [{"template": "A", "temperature": 1.0, "matches": 2, "hits": 2, "n_targets": 3},
            {"template": "A", "temperature": 0.5, "matches": 0, "hits": 0, "n_targets": 3},
            {"template": "B", "temperature": 0.5, "matches": 0, "hits": 0, "n_targets": 0}]
    stage = StageView({"id": "evaluate/pii/m0", "kind": "pii", "folder": "evaluate/pii/m0",
                       "params": {"target_label": "m0", "evaluation": "pii"}, "result": {"rows": rows}},
                      Path("/nonexistent"))
    (table,) = PiiResult.section([stage])["tables"]
    assert table["header"][-1] == "hit rate [exact 95% CI]"
    assert [r[-1] for r in table["rows"]] == [f"{fmt(2 / 3)} {ci_text(list(binomial_ci(2, 3)))}",
                                              f"{fmt(0.0)} {ci_text(list(binomial_ci(0, 3)))}", "–"]


def test_what_a_stage_printed_while_it_ran_is_said_under_its_section(tmp_path):
    """A window clamped to the model's context (or texts cut to the masked LM's window) was said on stderr
    only, once per process: the report gave the numbers beside no word of it, and a second stage that met the
    same was not told at all. Each stage keeps what it was told and the section says it, with the stages."""
    from leakaudit.models import load_model

    context = load_model("tiny-gpt-neox").max_length
    experiment = EXPERIMENT.split("evaluate:")[0] + "evaluate:\n" + "".join(
        f"  {name}:\n    kind: mia\n    targets: [base]\n    members: emails.members\n"
        f"    nonmembers: emails.nonmembers\n    options: {{attacks: [loss], n_bootstrap: 0, max_length: {2 * context}}}\n"
        for name in ("mia", "mia2"))
    run_experiment(parse_experiment(experiment), tmp_path, config_text=experiment, log=lambda m: None)
    said = f"--max-length {2 * context} is longer than the context of tiny-gpt-neox"
    run = json.loads((tmp_path / "run.json").read_text())
    assert all(any(said in w for w in s["result"]["warnings_said"]) for s in run["stages"] if s["kind"] == "mia")
    html = (tmp_path / "report.html").read_text()
    mia = html[html.index('<h2 id="mia">'):html.index('<h2 id="stages">')]
    (line,) = [x for x in re.findall(r"<li>warning: (.*?)</li>", mia) if said in x]
    assert line.endswith("(every stage)")


def test_the_sections_say_what_a_tpr_at_a_low_fpr_is(tmp_path):
    """The tables' TPR@1%FPR and TPR@0.1%FPR columns were named and never defined: the share of members flagged
    at the threshold that flags that share of non-members, unresolved below 1 / FPR non-members."""
    from leakaudit.kinds.base import LOW_FPR
    from leakaudit.report.html import build

    stage = _mia_stage(tmp_path, "mia", "m0", [1.0, 2.0, 3.0], [0.5, 1.5, 2.5], 0)
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "g"}, "stages": [stage]}))
    html, _ = build(tmp_path)
    mia = html[html.index('<h2 id="mia">'):html.index('<h2 id="stages">')]
    assert "the share of members an attacker flags at the score threshold that flags 1% of the non-members" in mia
    assert "1 / FPR non-members" in LOW_FPR and str(markupsafe.escape(LOW_FPR)) in mia


def test_a_headline_interval_of_no_width_says_it_bounds_nothing(tmp_path):
    """A PII rate minus the baseline's where neither model extracted anything has the interval [0, 0] on every
    resample: the headline table showed "0.000 [0.000, 0.000]", a change known to be 0, where the verdicts
    say the interval cannot bound an effect."""
    from leakaudit.report.html import build

    folder = "evaluate/pii/ft"
    (tmp_path / folder).mkdir(parents=True)
    result = {"rows": [{"template": "A", "temperature": 1.0, "matches": 0, "hits": 0, "n_targets": 3}],
              "match_rate": 0.0, "match_rate_ci": [0.0, 0.7], "match_rate_minus_baseline": 0.0,
              "match_rate_minus_baseline_ci": [0.0, 0.0]}
    stage = {"id": folder, "kind": "pii", "folder": folder, "key": "k", "status": "ran", "seconds": 1,
             "params": {"target_label": "ft", "evaluation": "pii"}, "result": result}
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "g"}, "stages": [stage]}))
    html, _ = build(tmp_path)
    table = html[html.index('id="headline-table"'):]
    table = table[:table.index("</table>")]
    cells = re.findall(r'<td class="num">(.*?)</td>', table)
    assert len(cells) == 2 and "bounds nothing" not in cells[0] and "bounds nothing" in cells[1]


def test_every_section_figure_has_a_text_alternative_that_says_what_it_draws(report_dir):
    """Figures without an alt of their own (PII rates, perplexity) had "plot, described in the caption below",
    which says nothing of what is drawn: they name it and point to the table that holds the values."""
    write_report(report_dir)
    html = (report_dir / "report.html").read_text()
    alts = re.findall(r'<figure><img src="data:image/png;base64,[^"]+" alt="([^"]*)"><figcaption>([^<]*)<', html)
    assert len(alts) == 3  # the ROC, the PII bars, the perplexity bars
    assert not any("described in the caption" in alt for alt, _ in alts)
    assert sum(caption in alt and "table below" in alt for alt, caption in alts) == 2
