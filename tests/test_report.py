"""The HTML report in a real headless Chromium: it loads offline, with no console errors, and its figures render.

Chromium is Debian's (/usr/bin/chromium, installed by .ci/run); under CI=true a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from leakaudit.config import parse_experiment
from leakaudit.experiment import run_experiment
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


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    run_experiment(parse_experiment(EXPERIMENT), out, config_text=EXPERIMENT + "# contact: kenneth.lay@enron.com\n",
                   log=lambda m: None)
    return out


def _browser():
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    return sync_playwright()


def test_report_renders_in_headless_chromium(report_dir):
    html_path = report_dir / "report.html"
    with _browser() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            requests: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html_path.as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({src: e.src.slice(0, 22), w: e.naturalWidth, h: e.naturalHeight,"
                       " done: e.complete}))")
            headline = page.inner_text("#headline-table")
            text = page.inner_text("body")
        finally:
            browser.close()
    assert errors == []
    assert requests == [html_path.as_uri()]  # nothing fetched beyond the file itself: it works offline
    # ROC (mia), heatmap (pii), perplexity bars: every figure decoded by the browser
    assert len(images) == 3
    for img in images:
        assert img["src"].startswith("data:image/png;base64") and img["done"] and img["w"] > 100 and img["h"] > 100
    summary = json.loads((report_dir / "summary.json").read_text())
    auc = next(h["value"] for h in summary["headline"] if h["metric"] == "loss AUC")
    assert f"{auc:.3f}" in headline
    assert "kenneth.lay@enron.com" not in text  # PII masked by default, even in the echoed configuration
    assert not re.search(r"[\w.]+@enron\.com", text)


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
