"""The experiment report: one self-contained HTML file plus `summary.json` with every headline number.

It is built only from what a run left on disk (`run.json` and each stage's files), so `leakaudit report
DIR` can redraw it at any time, including for a run that is still half done. Figures are inline PNGs
and the page has no scripts and no external links: it opens offline. PII is masked unless the
experiment sets `report.show_pii: true`.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import markupsafe

from leakaudit.data.io import open_lock, write_atomic, write_json
from leakaudit.data.pii_find import NameFinder, name_finder
from leakaudit.data.pii_mask import grid_numbers, mask_labels, mask_obj, mask_yaml_text
from leakaudit.data.pii_mask import mask_pii as mask
from leakaudit.errors import InputError, one_line
from leakaudit.kinds import get_kind, kind_names
from leakaudit.kinds.base import StageView, ci_text, fmt

# inline figures (base64 data, never PII, and masking must not touch it), the experiment file's text, masked
# before (mask_yaml_text, which keeps its numbers: a seed is no phone number), and the seeds in the page's header
_UNMASKED = re.compile(r"(data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+|<pre class=\"config\">.*?</pre>"
                       r"|<span class=\"seed\">\d+</span>)", re.DOTALL)


def _mask_page(html: str, names: NameFinder, labels: Collection[str] = ()) -> str:
    """Mask every address, phone number and known name (shipped, and `report.mask_names`) in the page's text,
    leaving inline figures, the (already masked) experiment file and the (already masked) `labels` alone."""
    unmasked = _UNMASKED
    if labels:
        escaped = sorted({str(markupsafe.escape(x)) for x in labels}, key=len, reverse=True)
        unmasked = re.compile(f"({_UNMASKED.pattern[1:-1]}|{'|'.join(map(re.escape, escaped))})", re.DOTALL)
    return "".join(part if i % 2 else mask(part, names) for i, part in enumerate(unmasked.split(html)))


def _masked_labels(stages: list[dict[str, Any]], names: NameFinder, numbers: set[str]) -> set[str]:
    """The stage ids and labels of a run record that its masking left as they are though `mask_pii` would not
    (`mask_labels`: a seed 2024061501 in a grid label is no phone number): the page's and summary's last
    masking pass keeps them, or "ft[seed=2024061501]" and "ft[seed=2024071501]" both read "ft[seed=********01]"
    there. Only those: a label such as "ft" kept everywhere would also keep the "ft" of "ft@enron.com" from the
    address's mask. A label a record still holds unmasked (one that predates masking, or edited) is masked."""
    found = {x for s in stages for x in (s.get("id"), s.get("params", {}).get("target_label"),
                                         s.get("params", {}).get("evaluation")) if isinstance(x, str)}
    return {x for x in found if mask_labels([x], names, numbers)[x] == x != mask(x, names)}


# ----------------------------------------------------------------------------------------- headline numbers
def headline(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every headline number as {variant, evaluation, kind, metric, value, ci}, and `m` for a user AUC (what
    summary.json lists)."""
    rows: list[dict[str, Any]] = []

    def add(stage, metric, value, ci=None, m=None):
        if value is None:
            return
        rows.append({"variant": stage["params"].get("target_label"), "evaluation": stage["params"].get("evaluation"),
                     "kind": stage["kind"], "metric": metric, **({"m": m} if m is not None else {}), "value": value,
                     "ci": list(ci) if ci is not None else None})

    known = set(kind_names())
    for s in stages:
        res = s.get("result")
        if not res or not s["id"].startswith("evaluate/"):
            continue
        if s["kind"] not in known:  # a newer release's kind, or one since removed (as manifest.older_results skips)
            from leakaudit.warn import warn_once

            warn_once(f"{s['id']}: its kind '{s['kind']}' is not one this leakaudit has; its numbers stay in "
                      "run.json and are left out of the report")
            continue
        for h in get_kind(s["kind"]).Result(res).headline():
            add(s, h.metric, h.value, h.ci, h.m)
    return rows


#: said of a headline interval of no width (nothing extracted by either model, every resample alike)
NO_WIDTH = "no width: the same on every resample, it bounds nothing"


def _headline_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    cols: list[str] = []
    by_variant: dict[str, dict[str, Any]] = {}
    for r in rows:
        if "TPR@" in r["metric"]:  # in summary.json and the sections; the table keeps to one number per score
            continue
        # a user AUC names its m, as the verdicts do: "user AUC" alone did not say at how many samples per user
        col = f"{r['evaluation']}: {r['metric']}" + (f" (m = {r['m']})" if r.get("m") is not None else "")
        if col not in cols:
            cols.append(col)
        ci = r["ci"]
        cell = {"value": fmt(r["value"]), "ci": ci_text(ci) if ci else ""}
        if ci and len(ci) == 2 and ci[0] == ci[1]:  # "[0.000, 0.000]" read as a change known to be 0
            cell["ci"] += f" ({NO_WIDTH})"
        by_variant.setdefault(r["variant"], {})[col] = cell
    return cols, [{"variant": v, "cells": c} for v, c in by_variant.items()]


# ----------------------------------------------------------------------------------------- sections
def _finished(out: Path, stages: list[dict[str, Any]], name: str) -> list[StageView]:
    return [StageView(s, out) for s in stages if s["kind"] == name and s.get("result")]


def kind_sections(out: Path, stages: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """One section per registered evaluation kind, each drawn by its Result from its finished stages, with the
    warnings its stages recorded (a kind whose section does not gather them itself: its results' `warnings`)
    and those each stage printed while it ran (WARNINGS_SAID, for every kind)."""
    from leakaudit.kinds.base import WARNINGS_SAID, warning_lines

    sections = []
    for name in kind_names("evaluate"):
        views = _finished(out, stages, name)
        section = get_kind(name).Result.section(views)
        if section is not None:
            shown = section.get("warnings")  # a section that gathers its stages' `warnings` itself
            warned: dict[str, list[str]] = {}
            for v in views:
                for w in [*(v.result.get("warnings") or [] if shown is None else []),
                          *(v.result.get(WARNINGS_SAID) or [])]:
                    if shown and any(str(w) in line for line in shown):
                        continue  # said by the stage and kept in its own warnings too
                    where = f"{v.evaluation} · {v.target}"
                    if where not in warned.setdefault(str(w), []):
                        warned[str(w)].append(where)
            section["warnings"] = [*(shown or []), *warning_lines(warned, len(views))]
        sections.append(section)
    return sections


def kind_comparisons(out: Path, stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every kind's paired comparisons between targets (e.g. Δ user AUC of each mitigation vs none)."""
    return [{"kind": name, **c} for name in kind_names("evaluate")
            for c in get_kind(name).Result.comparisons(_finished(out, stages, name))]


def missing_comparisons(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The comparisons an evaluation's `compare_to` asks for that a run has not drawn, because the variant's
    stage or the baseline's has not finished (it failed, or the run was stopped before it): one row each,
    {evaluation, variant, baseline, why}. A partial run's report listed the verdicts it had and left these
    out without a word, and where none was drawn said that no evaluation sets `compare_to`."""
    def params(s: dict[str, Any]) -> dict[str, Any]:
        return s["params"] if isinstance(s.get("params"), dict) else {}

    known = set(kind_names())
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in stages:
        if str(s.get("id", "")).startswith("evaluate/") and s.get("kind") in known:
            groups.setdefault(str(params(s).get("evaluation") or s["id"].split("/")[1]), []).append(s)

    def target(s: dict[str, Any]) -> str:
        return str(params(s).get("target_label") or s["id"].split("/", 1)[-1])

    def state(s: dict[str, Any]) -> str:
        if s.get("error") or s.get("status") == "failed":
            return f"{s['id']} failed" + (f" ({s['error']})" if s.get("error") else "")
        return f"{s['id']} has not finished"

    out: list[dict[str, Any]] = []
    for evaluation, group in groups.items():
        wanted = next((v for v in ((s.get("result") or {}).get("compare_to")
                                   or (params(s).get("options") or {}).get("compare_to") for s in group) if v), None)
        if wanted is None:
            continue
        base = next((s for s in group if target(s) == wanted), None)
        for s in group:
            if s is base or (s.get("result") and base is not None and base.get("result")):
                continue
            why = [state(x) for x in (s, base) if x is not None and not x.get("result")]
            if base is None:
                why.append(f"no stage of this evaluation is '{wanted}'")
            out.append({"evaluation": evaluation, "variant": target(s), "baseline": wanted, "why": "; ".join(why)})
    return out


def missing_sentence(m: dict[str, Any]) -> str:
    """A comparison not drawn, as the verdict section states it."""
    return f"{m['evaluation']}: {m['variant']} vs {m['baseline']}: not compared: {m['why']}"


def _signed(x: float, digits: int = 3) -> str:
    return ("+" if x > 0 else "") + fmt(float(x), digits)


def _interval(ci: list[float] | None, scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
    return f" [{fmt(ci[0] * scale, digits)}{unit}, {fmt(ci[1] * scale, digits)}{unit}]" if ci else ""


def verdict_sentence(c: dict[str, Any]) -> str:
    """One comparison as the verdict section states it: "<evaluation>: <variant> vs <baseline>: <metric>
    <value variant> vs <value baseline>, Δ <delta> [CI] (<relative>% [CI], or ×e^Δ [CI] as likely for a log p)
    → <verdict> (<n> paired; detects |Δ| ≥ <detectable effect> with 80% power)"."""
    # user inference's m: the headline m is the largest one both targets have results for, not always the one asked
    at_m = f" (m = {c['m']})" if c.get("m") is not None else ""
    head = f"{c.get('evaluation')}: {c.get('variant')} vs {c.get('baseline')}: {c.get('metric')}{at_m}"
    if c.get("delta") is None:
        return f"{head} → {c.get('verdict')}"
    rel, ratio = c.get("relative"), c.get("likelihood_ratio")
    if ratio is not None:  # a log p: e^Δ says how many times as likely, where a percent of a log p says little
        rel_text = f" (×{fmt(ratio)}{_interval(c.get('likelihood_ratio_ci'))} as likely)"
    else:
        rel_text = "" if rel is None else f" ({_signed(rel * 100, 1)}%{_interval(c.get('relative_ci'), 100, 1, '%')})"
    units = c.get("n_units") or c.get("n")
    power = (f"; detects |Δ| ≥ {fmt(c['detectable_effect'])} with 80% power"
             if c.get("detectable_effect") is not None else "")
    size = f" ({units} {'units' if c.get('n_units') else 'paired'}{power})" if units else ""
    note = f" ({c['note']})" if c.get("note") else ""
    return (f"{head} {fmt(c.get('value_variant'))} vs {fmt(c.get('value_baseline'))}, "
            f"Δ {_signed(c['delta'])}{_interval(c.get('delta_ci') or c.get('ci'))}{rel_text} → {c.get('verdict')}"
            f"{size}{note}")


#: panels per forest figure: 3 evaluations x 6 metrics become 3 figures of 6, each still legible
MAX_FOREST_PANELS = 6


def verdict_figures(comparisons: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The verdicts as forest plots: a panel per (evaluation, metric) (their scales differ), a row per variant
    at Δ with its CI; comparisons without Δ or CI stay sentences only. At most MAX_FOREST_PANELS panels a
    figure, so many metrics make several figures rather than one unreadably tall one."""
    from leakaudit.kinds.compare import direction, finite
    from leakaudit.report import plots

    panels: dict[tuple[Any, Any], dict[str, Any]] = {}
    for c in comparisons:
        ci = c.get("delta_ci") or c.get("ci")
        if not (finite(c.get("delta")) and ci and len(ci) == 2 and all(finite(x) for x in ci)) or ci[0] == ci[1]:
            continue  # no CI, or one of no width (e.g. nothing extracted by either): its sentence says so
        metric = str(c.get("metric"))
        panel = panels.setdefault((c.get("evaluation"), metric), {
            "title": f"{c.get('evaluation')}: {metric}",
            "xlabel": f"Δ {metric} (variant − {c.get('baseline')})", "rows": []})
        panel["rows"].append((str(c.get("variant")), float(c["delta"]), float(ci[0]), float(ci[1]),
                              direction(c.get("verdict"))))
    ordered = list(panels.values())
    chunks = [ordered[i:i + MAX_FOREST_PANELS] for i in range(0, len(ordered), MAX_FOREST_PANELS)]
    figures = []
    for i, chunk in enumerate(chunks):
        part = f" (part {i + 1} of {len(chunks)})" if len(chunks) > 1 else ""
        figures.append({"uri": plots.forest_figure(chunk), "caption": (
            f"Paired Δ (variant − baseline) with its 95% bootstrap CI, one panel per evaluation and metric{part}: "
            "red = increase, blue = decrease (CI excludes 0), grey = no detectable change.")})
    return figures


# ----------------------------------------------------------------------------------------- assembly
#: what a command's --out holds in place of run.json (mia, user-inference, perplexity, pii, backdoor extract)
COMMAND_RESULTS = ("mia.json", "user_inference.json", "perplexity.json", "pii.json", "pii_logprob.json",
                   "extract.json", "audit_data.json")


def run_record(out: str | Path) -> Path:
    """`out`/run.json, or the one-line error of a folder that is not (yet) a run's output dir."""
    p = Path(out) / "run.json"
    if not p.exists():
        command = next((f for f in COMMAND_RESULTS if (Path(out) / f).is_file()), None)
        if command is not None:  # `leakaudit mia --out DIR`: the reader was told only what DIR is not
            raise InputError(f"no run.json here: the output dir of a command (its {command}), which printed its "
                             "results and writes no report; an experiment file run with `leakaudit "
                             "run` gets one (docs/experiments.md)", file=Path(out))
        raise InputError("no run.json here: not the output dir of `leakaudit run` (or one whose run has not "
                         "checked its experiment yet)", file=Path(out))
    return p


def load_run(out: str | Path) -> dict[str, Any]:
    p = run_record(out)
    from leakaudit.data.io import read_text

    try:
        run = json.loads(read_text(p))
    except (ValueError, RecursionError) as exc:
        raise InputError(f"not a run record (malformed JSON: {one_line(exc, 120)})", file=p) from None
    if not (isinstance(run, dict) and isinstance(run.get("experiment"), dict)
            and isinstance(run.get("stages"), list)):
        raise InputError("not a run record of `leakaudit run` (needs 'experiment' and 'stages')", file=p)
    for i, stage in enumerate(run["stages"]):  # a hand-edited or cut record: one line, not a KeyError's traceback
        missing = next((k for k in ("id", "kind") if not (isinstance(stage, dict) and isinstance(stage.get(k), str))),
                       None)
        if missing is not None:
            raise InputError(f"not a stage record of `leakaudit run` (no '{missing}')", file=p,
                             field=f"stages[{i}].{missing}")
    return run


def _check_outputs(out: Path, stages: list[dict[str, Any]]) -> None:
    """A finished stage's files must be what it wrote: the report recomputes comparisons from them, and a
    deleted or cut file changed verdicts silently. `leakaudit run` redoes such a stage; the report refuses."""
    from leakaudit.experiment.manifest import changed_output, is_done

    for s in stages:
        if s.get("result") is None or not s.get("folder"):
            continue
        folder = out / s["folder"]
        info = is_done(folder, s.get("key"))  # None: no record to check against (`leakaudit run` redoes it)
        changed = changed_output(folder, info) if info is not None else None
        if changed is not None:
            raise InputError(f"stage {s['id']}: {changed} after it finished; rerun `leakaudit run` with the same "
                             "experiment and --out to redo it", file=folder)


def _older_results(out: Path, stages: list[dict[str, Any]]) -> list[str]:
    """Stages an earlier leakaudit computed that this one computes anew (experiment.manifest.older_results):
    said once on stderr and at the report's top, as the report reads them as they are."""
    from leakaudit.experiment.manifest import older_results
    from leakaudit.warn import warn_once

    notes = older_results(out, stages)
    if notes:
        warn_once(f"{out}: {len(notes)} finished stage(s) hold results an earlier leakaudit computed, which this one "
                  f"computes anew ({'; '.join(notes)}); `leakaudit run` with the experiment and this --out reruns "
                  "them")
    return notes


def stage_inputs(stage: dict[str, Any]) -> str:
    """What a stage read, as run.json records it: each model (its spec, or the stage that trained it) and each
    data file (the stage that wrote it and the file), or a dataset's source. The page named stages only by
    their labels ("base", "real"), so which model was the reference, or the base of a fine-tune, was left to
    a reading of the configuration at its end (and of another run's, for a reused stage)."""
    params = stage.get("params") if isinstance(stage.get("params"), dict) else {}
    parts = []
    for role in ("model", "target", "reference", "baseline"):
        model = params.get(role)
        if isinstance(model, dict) and (model.get("spec") or model.get("stage")):
            parts.append(f"{role} {model.get('spec') or model.get('stage')}")
    for role in ("data", "members", "nonmembers", "training"):
        data = params.get(role)
        if isinstance(data, list) and data and all(isinstance(x, str) for x in data):
            parts.append(f"{role} {'/'.join(data)}")
    if stage.get("kind") == "dataset":
        source = params.get("builtin") or params.get("path")
        if isinstance(source, str):
            parts.append(f"{'builtin' if params.get('builtin') else 'file'} {source}")
    return " · ".join(parts)


def _file_seed(config_text: str) -> int | None:
    """The seed the echoed experiment file says (0 when it has none; None when the text is not such a file):
    `run --seed N` overrides it, and the report says so next to the seed used."""
    import yaml

    try:
        cfg = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return None
    seed = cfg.get("seed", 0) if isinstance(cfg, dict) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def build(out: str | Path) -> tuple[str, dict[str, Any]]:
    """Render the report HTML and the summary dict from an output dir."""
    import jinja2

    out = Path(out)
    run = load_run(out)
    exp = run["experiment"]
    show_pii = bool(exp.get("report", {}).get("show_pii"))
    names = name_finder(exp.get("report", {}).get("mask_names")) if not show_pii else None
    stages = run["stages"]
    _check_outputs(out, stages)
    older = _older_results(out, stages)
    rows = headline(stages)
    cols, table_rows = _headline_table(rows)
    sections = [sec for sec in kind_sections(out, stages) if sec]
    comparisons = kind_comparisons(out, stages)
    missing = missing_comparisons(stages)
    if missing:
        from leakaudit.warn import warn_once

        warn_once(f"{out}: {len(missing)} comparison(s) that compare_to asks for are not drawn, as stages they need "
                  f"have not finished (the first: {missing_sentence(missing[0])}); `leakaudit run` with the "
                  "experiment and this --out finishes them (once what failed is fixed)")
    config_text = run.get("config_text") or json.dumps(exp, indent=2)
    env = jinja2.Environment(loader=jinja2.PackageLoader("leakaudit.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    title = exp.get("report", {}).get("title") or f"leakaudit report: {exp['name']}"
    html = env.get_template("report.html.j2").render(
        title=title, name=exp["name"], seed=exp.get("seed"), file_seed=_file_seed(config_text), show_pii=show_pii,
        headline_cols=cols, headline_rows=table_rows,
        verdicts=[verdict_sentence(c) for c in comparisons], verdict_figures=verdict_figures(comparisons),
        missing=[missing_sentence(m) for m in missing],
        compares=any((s.get("params") or {}).get("options", {}).get("compare_to") for s in stages
                     if isinstance((s.get("params") or {}).get("options"), dict)),
        sections=sections, stages=stages, inputs={s["id"]: stage_inputs(s) for s in stages},
        has_evaluations=any(str(s["id"]).startswith("evaluate/") for s in stages),
        n_done=sum(1 for s in stages if s.get("result") is not None),
        n_stages=len(stages), config_text=config_text if show_pii else mask_yaml_text(config_text, names),
        versions=run.get("versions", {}), older=older)
    labels = _masked_labels(stages, names, grid_numbers(exp)) if not show_pii else set()
    if not show_pii:  # a last pass over the whole page: addresses, phones and shipped names never reach it
        html = _mask_page(html, names, labels)
    summary = {"experiment": exp["name"], "seed": exp.get("seed"),
               "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "pii": "shown" if show_pii else "masked",  # says so before anyone shares the file
               "headline": rows, "comparisons": comparisons,
               **({"comparisons_missing": missing} if missing else {}),
               "stages": {s["id"]: s.get("result") for s in stages},
               **({"older_results": older} if older else {}), "versions": run.get("versions", {})}
    if not show_pii:  # run.json is masked when written, but it may predate that or have been edited
        summary = mask_obj(summary, names, labels={x: x for x in labels})
    return html, summary


#: held while a report is read from run.json and written, by `leakaudit report` and by a run's final report
REPORT_LOCK = ".report.lock"


@contextmanager
def _report_lock(out: Path) -> Iterator[None]:
    """REPORT_LOCK held (the kernel's flock, released by a kill). Opened read-only: another user of a group's
    run dir can lock a file they cannot write. A file system without locks (NFS without lockd) is said once
    and the report written unlocked, as a run there is."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    fd = open_lock(out / REPORT_LOCK, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            from leakaudit.warn import warn_once

            warn_once(f"{out}: the file system has no locks ({exc.strerror}); a report written at the same "
                      "time as this one could land over it")
        yield
    finally:
        os.close(fd)


def write_report(out: str | Path) -> Path:
    """Write `report.html` and `summary.json` into the output dir; returns the HTML path. Reading and writing
    happen under REPORT_LOCK: a `leakaudit report` that read a run in progress wrote its stale page (and
    summary.json, which `leakaudit seeds` reads) over the one the run wrote on finishing."""
    out = Path(out)
    run_record(out)  # not a run dir: its one-line error, before a lock file is left in a folder that is no run
    with _report_lock(out):
        html, summary = build(out)
        write_atomic(out / "report.html", lambda fh: fh.write(html))
        write_json(out / "summary.json", summary)
    return out / "report.html"
