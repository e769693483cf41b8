"""One experiment run over several seeds, read back as one result: every seed's paired comparisons side by
side, and the mean difference over seeds with an interval over seeds.

Why over seeds: a run's intervals resample its items (texts, targets, users) and so speak about the models
that run trained; a new seed trains new models (other data draws, batches, initialisation). The spread of a
comparison's Δ across seeds is that training-run variance, which no single run's interval holds. The mean Δ
over n seeds gets a 95% interval with both parts: the seeds' spread (t with n - 1 degrees of freedom times
SD / sqrt(n); t = 4.30 for 3 seeds) and the items' (the seeds' mean CI half-width, not shrunk by the number of
seeds because seeds often score the same items), added in quadrature. Where each seed draws its own items,
the spread already holds item variance and the interval errs wide. Every seed is shown, none left out (a
study's result is all the seeds it ran); a comparison every run computed in the same stages (the same stage
keys, e.g. a model trained once with a fixed seed) is one run, not n.

Reads only each run's run.json (which experiment, which seed, its stage keys) and summary.json (its
`comparisons`).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leakaudit.errors import InputError
from leakaudit.kinds.compare import NO_VERDICT, direction
from leakaudit.warn import warn_once


@dataclass
class SeedRun:
    """One output dir of `leakaudit run`: its seed and the comparisons its summary.json lists."""

    out: Path
    seed: int
    experiment: dict[str, Any]
    comparisons: list[dict[str, Any]]
    stage_keys: dict[str, str] = field(default_factory=dict)  # stage id -> key (run.json)
    precision: dict[str, str] = field(default_factory=dict)  # stage id -> the dtype it computed in (run.json)
    threads: dict[str, int] = field(default_factory=dict)  # stage id -> the torch threads it ran on (run.json)
    data_content: dict[str, str] = field(default_factory=dict)  # dataset name -> its file's content hash


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"no {path.name}: {what}", file=path.parent)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"not JSON ({e.__class__.__name__}): was it written by leakaudit?", file=path) from None
    if not isinstance(data, dict):
        raise InputError("not a JSON object: was it written by leakaudit?", file=path)
    return data


def read_run(out: str | Path) -> SeedRun:
    """A finished run's seed, experiment and comparisons; a one-line error when DIR is not one."""
    out = Path(out)
    if not out.is_dir():
        raise InputError("not a directory (an output dir of `leakaudit run` is expected)", file=out)
    from leakaudit.report.html import load_run  # the report's check of run.json, one message for both

    record = load_run(out)
    summary = _read_json(out / "summary.json", f"the run has no report yet: `leakaudit report {out}` writes it")
    experiment = record.get("experiment")
    if not isinstance(experiment, dict) or not isinstance(experiment.get("seed"), int):
        raise InputError("no experiment with a seed in it", file=out / "run.json", field="experiment.seed")
    comparisons = summary.get("comparisons")
    if not isinstance(comparisons, list):
        raise InputError("no comparisons list (was the report written by an older leakaudit? `leakaudit report "
                         "DIR` rewrites it)", file=out / "summary.json", field="comparisons")
    for i, c in enumerate(comparisons):  # hand-edited or damaged: one line, not a traceback in statistics
        ci = c.get("delta_ci") or c.get("ci") if isinstance(c, dict) else None
        if not isinstance(c, dict) or not (c.get("delta") is None or _finite(c["delta"])) or not (
                ci is None or (isinstance(ci, list) and len(ci) == 2 and all(map(_finite, ci)))):
            raise InputError("not a comparison with a finite delta and a [lo, hi] interval",
                             file=out / "summary.json", field=f"comparisons[{i}]")
    stages = [st for st in record.get("stages") or [] if isinstance(st, dict)]
    pending = [str(st.get("id")) for st in stages if st.get("status") in ("pending", "failed")]
    if pending:  # its comparisons that need those stages are missing: "over seeds" would be over fewer seeds
        raise InputError(f"{len(pending)} of {len(stages)} stages are not finished (the first: {pending[0]}); finish "
                         f"the run (`leakaudit run` with its experiment and --out {out}) and it writes its report",
                         file=out / "run.json")
    from leakaudit.experiment.manifest import older_results

    if older := older_results(out, stages):  # pooled with runs of this release, the spread holds the change
        warn_once(f"{out}: {len(older)} stage(s) hold results an earlier leakaudit computed ({'; '.join(older)}): "
                  f"`leakaudit run` with its experiment and --out {out} computes them anew")
    keys = {str(st.get("id")): str(st.get("key")) for st in stages}
    content = {str(st["id"]).removeprefix("data/"): str(st["params"].get("content")) for st in stages
               if str(st.get("id", "")).startswith("data/") and isinstance(st.get("params"), dict)}
    precision = {str(st.get("id")): str(st["precision"]) for st in stages if st.get("precision")}
    used = {str(st.get("id")): st["threads"] for st in stages if isinstance(st.get("threads"), int)}
    return SeedRun(out, experiment["seed"], experiment, comparisons, stage_keys=keys, data_content=content,
                   precision=precision, threads=used)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The key path of the first place two parsed experiments differ (None when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            where = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                return where
            found = _first_difference(a[k], b[k], where)
            if found:
                return found
        return None
    return None if a == b else (path or "experiment")


def read_runs(dirs: list[str | Path]) -> list[SeedRun]:
    """The runs, in seed order, after checking they are seeds of one experiment: same experiment but for its
    seed, each seed once."""
    if isinstance(dirs, (str, Path)):  # one path: its characters were read as dirs
        raise TypeError("dirs: expected a list of output dirs, got one path (write [dirs])")
    if not dirs:
        raise InputError("name the output dirs of the seeds' runs, e.g. out/s0 out/s1 out/s2")
    runs = [read_run(d) for d in dirs]
    first = runs[0]
    seen: dict[int, Path] = {}
    for r in runs:
        if r.seed in seen:
            raise InputError(f"seed {r.seed} again (also in {seen[r.seed]}): each seed counts once",
                             file=r.out / "run.json", field="experiment.seed")
        seen[r.seed] = r.out
        other = _first_difference(_as_keyed(first), _as_keyed(r))
        if other:
            raise InputError(f"differs from {first.out}'s experiment: these are not seeds of one experiment",
                             file=r.out / "run.json", field=f"experiment.{other}")
        mixed = next((s for s, p in r.precision.items() if first.precision.get(s, p) != p), None)
        if mixed:  # the spread over seeds would hold the precisions' difference too
            warn_once(f"{r.out} computed {mixed} in {r.precision[mixed]}, {first.out} in {first.precision[mixed]}: "
                      "the seeds' spread includes that difference (LEAKAUDIT_DTYPE pins one precision)")
        # in bf16 a thread count sums in another order, and rounds small fine-tune effects by about their CI
        # (README, "CPU threads"); in float32 the difference is at the seventh digit
        apart = next((s for s, n in r.threads.items() if first.threads.get(s, n) != n
                      and "bfloat16" in (r.precision.get(s), first.precision.get(s))), None)
        if apart:
            warn_once(f"{r.out} computed {apart} on {r.threads[apart]} thread(s), {first.out} on "
                      f"{first.threads[apart]}, in bfloat16: the seeds' spread includes that rounding "
                      "(LEAKAUDIT_THREADS pins the count)")
    return sorted(runs, key=lambda r: r.seed)


def _as_keyed(run: SeedRun) -> dict[str, Any]:
    """A run's experiment without its seed, a data file as stage keys hold it: its file name and content (the
    folder a checkout sits in differs between machines and changes no number; two files of one name in two
    folders may differ)."""
    out = {k: v for k, v in run.experiment.items() if k != "seed"}
    datasets = out.get("datasets")
    if isinstance(datasets, dict):
        out["datasets"] = {n: {**d, "path": f"{Path(d['path']).name}#{run.data_content.get(n)}"}
                           if isinstance(d, dict) and isinstance(d.get("path"), str) else d
                           for n, d in datasets.items()}
    return out


def _t975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def combine(runs: list[SeedRun]) -> list[dict[str, Any]]:
    """One row per (evaluation, metric, variant) that any seed compares: `seeds` (per seed: seed, delta, ci,
    verdict; None where that seed has no such comparison), `n_seeds` (seeds with a Δ), `mean_delta`, `sd`
    (across seeds), `seed_half_width` (t x SD / sqrt(n)), `item_half_width` (the seeds' mean CI half-width),
    `mean_ci` (mean ± both in quadrature; None under two seeds or without the seeds' intervals; the run's own
    interval where every seed computed it in the same stages), `same_in_every_seed` (one run, not n),
    `increase`/`decrease` (seeds whose own verdict claims that direction), `no_verdict` (why a seed's verdict
    was withheld, e.g. too few targets: the items are too few for the mean to claim a direction either).
    A comparison at an m (user inference: the largest m both targets have results for, which a seed's data
    can move) is a row of its own per m, with `m`: seeds compared at m = 4 and at m = 1 were averaged as one.
    A seed's interval of no width (Δ the same on every resample: both AUCs at 1, nothing extracted) bounds
    nothing: it adds nothing to the items' half-width, and with no other seed's interval there is no mean
    interval."""
    Key = tuple[str, str, str, str | None]
    by_run: list[dict[Key, dict[str, Any]]] = []  # per run: key -> its (first) comparison
    rows: dict[Key, dict[str, Any]] = {}
    for r in runs:
        mine: dict[Key, dict[str, Any]] = {}
        for c in r.comparisons:
            m = None if c.get("m") is None else str(c.get("m"))
            key = (str(c.get("evaluation")), str(c.get("metric")), str(c.get("variant")), m)
            mine.setdefault(key, c)
            rows.setdefault(key, {"evaluation": key[0], "metric": key[1], "variant": key[2],
                                  **({"m": m} if m is not None else {}), "baselines": []})
            if c.get("baseline") not in rows[key]["baselines"]:
                rows[key]["baselines"].append(c.get("baseline"))
        by_run.append(mine)
    out = []
    for key, row in rows.items():
        per_seed: list[dict[str, Any] | None] = []
        for r, mine in zip(runs, by_run, strict=True):
            c = mine.get(key)
            per_seed.append(None if c is None else {"seed": r.seed, "delta": c.get("delta"),
                                                    "ci": (c.get("delta_ci") or c.get("ci"))
                                                    if c.get("delta") is not None else None,
                                                    "verdict": c.get("verdict"), "direction": direction(c.get("verdict"))})
        given = [s for s in per_seed if s and s["delta"] is not None]
        deltas = [s["delta"] for s in given]
        halves = [(s["ci"][1] - s["ci"][0]) / 2 for s in given if s["ci"]]
        widths = [h for h in halves if h > 0]  # an interval of no width bounds nothing
        n = len(deltas)
        mean = statistics.fmean(deltas) if deltas else None
        if mean is not None and abs(mean) <= 1e-12 * max(map(abs, deltas)):
            # the deltas cancel (-0.0025 and +0.0025, each a difference of two rounded AUCs): the rest is
            # rounding noise, which the table printed as a mean of -2.8e-17
            mean = 0.0
        sd = statistics.stdev(deltas) if n > 1 else None
        seed_half = _t975(n - 1) * sd / math.sqrt(n) if sd is not None else None
        item_half = statistics.fmean(widths) if widths and len(halves) == n else None
        shared = n > 1 and _shared(runs, key[0], key[2], row["baselines"])
        mean_ci = None
        if shared:  # one run: its own interval, not one made up around it
            mean_ci = given[0]["ci"] if widths else None
        elif item_half is not None and seed_half is not None:  # one seed: no training-run variance to hold
            half = math.hypot(seed_half, item_half)
            mean_ci = [mean - half, mean + half]
        withheld = [s["verdict"] for s in given if str(s["verdict"]).startswith(NO_VERDICT)]
        out.append({**row, "seeds": per_seed, "n_seeds": n, "mean_delta": mean, "sd": sd,
                    "seed_half_width": seed_half, "item_half_width": item_half, "mean_ci": mean_ci,
                    "same_in_every_seed": shared,
                    "increase": sum(1 for s in given if s["direction"] == "increase"),
                    "decrease": sum(1 for s in given if s["direction"] == "decrease"),
                    "no_verdict": str(withheld[0]).removeprefix(NO_VERDICT) if withheld else None})
    return out


def _shared(runs: list[SeedRun], evaluation: str, variant: str, baselines: list[Any]) -> bool:
    """Whether every run computed this comparison in the same stages (the variant's and the baseline's
    evaluation stage has one key in all of them: e.g. M0 against the base model, trained once with a fixed
    seed). Equal Δs alone do not say so: three independent runs can each recover 0 of 120 queries."""
    ids = [f"evaluate/{evaluation}/{t}" for t in (variant, *baselines)]
    return len(baselines) == 1 and all(
        all(i in r.stage_keys for i in ids) and [r.stage_keys[i] for i in ids] == [runs[0].stage_keys.get(i) for i in ids]
        for r in runs)


def _signed(x: float | None) -> str:
    from leakaudit.kinds.base import fmt

    return "–" if x is None else ("+" if x > 0 else "") + fmt(x)


def _arrow(ci: list[float] | None) -> str:
    return "↑" if ci and ci[0] > 0 else "↓" if ci and ci[1] < 0 else ""


MARKDOWN_START = "Experiment `"  # how the tables begin: what marks a --markdown file as `seeds`' own


def _code(text: Any, cell: bool = True) -> str:
    """`text` as a Markdown code span that holds it whole: a fence longer than any run of backticks in it (a
    backtick in a name ended the span, and what followed, `<script>` included, was Markdown and HTML again),
    and in a table `|` escaped (a grid value "a|b" split the row into one cell more than its header)."""
    import re

    text = str(text)
    fence = "`" * (max((len(r) for r in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text.replace('|', chr(92) + '|') if cell else text}{pad}{fence}"


def markdown(runs: list[SeedRun], rows: list[dict[str, Any]]) -> str:
    """The rows as Markdown tables, one per (evaluation, metric): a row per variant, a column per seed."""
    seeds = [r.seed for r in runs]
    name = _code(runs[0].experiment.get("name"), cell=False)
    lines = [f"Experiment {name}, seeds {', '.join(map(str, seeds))}: each seed's paired "
             "Δ against the evaluation's baseline with its 95% CI (items resampled; ↑/↓: the run's verdict claims that "
             "direction, its CI excluding 0 with enough items), then "
             "the mean Δ over seeds with a 95% interval for training runs and items together (the seeds' spread, "
             "t with n - 1 degrees of freedom, and their mean CI half-width, in quadrature). \"same in every "
             "seed\": a stage the runs share, one run, not n.", ""]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:  # a metric at an m is named with it, as the report's verdicts name it
        metric = row["metric"] + (f" (m = {row['m']})" if row.get("m") is not None else "")
        groups.setdefault((row["evaluation"], metric), []).append(row)
    for (evaluation, metric), group in groups.items():
        baselines = sorted({str(b) for row in group for b in row["baselines"]})
        lines += [f"**{evaluation}: {metric}** (against {', '.join(_code(b, cell=False) for b in baselines)})", "",
                  "| variant | " + " | ".join(f"seed {s}" for s in seeds)
                  + " | seeds ↑ / ↓ | mean Δ over seeds [95% CI: runs and items] |",
                  "|---|" + "---|" * len(seeds) + "---|---|"]
        for row in group:
            cells = []
            for s in row["seeds"]:
                if s is None or s["delta"] is None:
                    cells.append("–" if s is None else str(s["verdict"]).split(":")[0])
                    continue
                ci = s["ci"]
                claim = {"increase": "↑", "decrease": "↓"}.get(s["direction"], "")
                cells.append(f"{_signed(s['delta'])}" + (f" [{_signed(ci[0])}, {_signed(ci[1])}]{claim}"
                                                         if ci else ""))
            ci = row["mean_ci"]
            claim = "" if row["no_verdict"] else _arrow(ci)
            mean = _signed(row["mean_delta"]) + (f" [{_signed(ci[0])}, {_signed(ci[1])}]{claim}" if ci else "")
            given = [s for s in row["seeds"] if s is not None and s["delta"] is not None]
            if ci is None and len(given) > 1 and all(s["ci"] and s["ci"][0] == s["ci"][1] for s in given):
                mean += " (no interval: Δ is the same on every resample)"
            counts = ("same in every seed" if row["same_in_every_seed"]
                      else f"{row['increase']} / {row['decrease']} of {row['n_seeds']}")
            if row["no_verdict"]:
                counts += f" (no verdict: {row['no_verdict']})"
            lines.append(f"| {_code(row['variant'])} | " + " | ".join(cells) + f" | {counts} | {mean} |")
        lines.append("")
    if not groups:  # it printed the heading alone, as if something had gone missing
        lines += ["No comparisons: none of the experiment's evaluations has a `compare_to` (the target each other "
                  "target is compared with), so there is no paired Δ to put side by side over seeds.", ""]
    return "\n".join(lines)
