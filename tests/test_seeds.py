"""`leakaudit seeds`: one experiment's runs over seeds read back as one result (leakaudit/seeds.py). Values by
hand; the interval's coverage simulated; bad dirs give one line naming the file and field."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main
from scipy.stats import t

from leakaudit.errors import InputError
from leakaudit.seeds import SeedRun, combine, markdown, read_runs

EXPERIMENT = {"name": "study", "models": {"base": "tiny-gpt-neox"}, "finetune": {"ft": {"options": {"epochs": 2}}}}


def _comparison(variant: str, delta: float | None, ci: list[float] | None, metric: str = "loss AUC") -> dict:
    return {"evaluation": "mia", "metric": metric, "baseline": "m0", "variant": variant, "delta": delta,
            "delta_ci": ci, "ci": ci, "verdict": "increase" if ci and ci[0] > 0 else "no detectable change"}


def _run_dir(root: Path, seed: int, comparisons: list[dict], experiment: dict | None = None,
             keys: dict[str, str] | None = None) -> Path:
    """A run dir; `keys`: stage id -> key in its run.json (by default every evaluation stage has a key of its
    own seed, except m0's and m0b's, which the runs share)."""
    out = root / f"s{seed}"
    out.mkdir()
    if keys is None:
        keys = {f"evaluate/mia/{t}": f"k-{t}-{seed}" for t in ("ft", "zero")}
        keys.update({"evaluate/mia/m0": "k-m0", "evaluate/mia/m0b": "k-m0b"})
    stages = [{"id": i, "kind": "mia" if i.startswith("evaluate/") else i.split("/")[0], "key": k}
              for i, k in keys.items()]
    (out / "run.json").write_text(json.dumps({"experiment": {**(experiment or EXPERIMENT), "seed": seed},
                                              "stages": stages}))
    (out / "summary.json").write_text(json.dumps({"comparisons": comparisons}))
    return out


def test_the_mean_over_seeds_and_its_interval_by_hand(tmp_path):
    dirs = [_run_dir(tmp_path, s, [_comparison("ft", d, [d - h, d + h]), _comparison("m0b", 0.3, [0.2, 0.4])])
            for s, d, h in ((2, 0.05, 0.02), (0, 0.01, 0.03), (1, 0.03, 0.01))]
    runs = read_runs(dirs)
    assert [r.seed for r in runs] == [0, 1, 2]  # in seed order, whatever order the dirs were named in
    rows = {r["variant"]: r for r in combine(runs)}
    ft = rows["ft"]
    assert [s["delta"] for s in ft["seeds"]] == [0.01, 0.03, 0.05]
    assert ft["mean_delta"] == pytest.approx(0.03) and ft["sd"] == pytest.approx(0.02)
    seed_half = t.ppf(0.975, 2) * 0.02 / math.sqrt(3)                 # 4.303 x 0.02 / 1.732 = 0.0497
    assert ft["seed_half_width"] == pytest.approx(seed_half)
    assert ft["item_half_width"] == pytest.approx(0.02)              # mean of 0.03, 0.01, 0.02
    half = math.sqrt(seed_half ** 2 + 0.02 ** 2)
    assert ft["mean_ci"] == pytest.approx([0.03 - half, 0.03 + half])
    assert (ft["increase"], ft["decrease"], ft["same_in_every_seed"]) == (2, 0, False)  # seed 0's CI holds 0
    # a comparison the runs share: the same in every seed, one run, its interval the seeds' own
    shared = rows["m0b"]
    assert shared["same_in_every_seed"] and shared["sd"] == 0 and shared["mean_ci"] == pytest.approx([0.2, 0.4])
    text = markdown(runs, combine(runs))
    assert "| `m0b` | +0.300 [+0.200, +0.400]↑ | +0.300 [+0.200, +0.400]↑ | +0.300 [+0.200, +0.400]↑ | same in every seed" in text
    assert "| `ft` | +0.010 [-0.020, +0.040] | +0.030 [+0.020, +0.040]↑ | +0.050 [+0.030, +0.070]↑ | 2 / 0 of 3 |" in text


def test_deltas_that_cancel_average_to_zero_not_to_rounding_noise(tmp_path):
    """Two seeds' Δ zlib AUC of -0.0025 and +0.0025, each the difference of two rounded AUCs
    (0.49 - 0.4925, 0.615 - 0.6125), averaged to -2.8e-17, which the table printed as such."""
    deltas = (0.49 - 0.4925, 0.615 - 0.6125)
    assert statistics.fmean(deltas) != 0
    dirs = [_run_dir(tmp_path, s, [_comparison("ft", d, [d - 0.01, d + 0.01])]) for s, d in enumerate(deltas)]
    runs = read_runs(dirs)
    (row,) = combine(runs)
    assert row["mean_delta"] == 0.0 and row["mean_ci"][0] == -row["mean_ci"][1]
    assert "| 0 / 0 of 2 | 0.000 [" in markdown(runs, [row])


def test_equal_deltas_of_independent_runs_are_not_one_shared_run(tmp_path):
    """Three seeds each recovering 0 of 120 queries gave Δ 0 three times: that is three runs, not one."""
    dirs = [_run_dir(tmp_path, s, [_comparison("zero", 0.0, [0.0, 0.0])]) for s in range(3)]
    (row,) = combine(read_runs(dirs))
    assert not row["same_in_every_seed"] and row["n_seeds"] == 3
    assert "| `zero` | 0.000 [0.000, 0.000] | 0.000 [0.000, 0.000] | 0.000 [0.000, 0.000] | 0 / 0 of 3 |" in markdown(
        read_runs(dirs), [row])


def test_a_seed_without_the_comparison_or_its_delta_is_shown_not_dropped(tmp_path):
    dirs = [_run_dir(tmp_path, 0, [_comparison("ft", 0.1, [0.0, 0.2])]),
            _run_dir(tmp_path, 1, [_comparison("ft", None, None)]),
            _run_dir(tmp_path, 2, [])]
    (row,) = combine(read_runs(dirs))
    assert row["n_seeds"] == 1 and row["seeds"][1]["delta"] is None and row["seeds"][2] is None
    assert row["mean_ci"] is None  # one seed holds no training-run variance: no interval over runs


def test_the_interval_covers_a_zero_effect_at_least_95_percent():
    """Δ = 0; the items' error shared by every seed (seeds scored the same texts) or drawn per seed, and the
    seeds' own training noise from none to 10x the items': the interval holds 0 at least 95% of the time
    (3 seeds, 3000 simulated studies each)."""
    rng = np.random.default_rng(0)
    for shared in (True, False):
        for ratio in (0.0, 1.0, 10.0):
            held = 0
            for _ in range(3000):
                items = np.repeat(rng.normal(), 3) if shared else rng.normal(size=3)
                deltas = items + rng.normal(scale=ratio, size=3)
                runs = [SeedRun(Path(f"s{s}"), s, {}, [_comparison("ft", float(d), [d - 1.96, d + 1.96])])
                        for s, d in enumerate(deltas)]
                lo, hi = combine(runs)[0]["mean_ci"]
                held += lo <= 0 <= hi
            assert held / 3000 >= 0.94, (shared, ratio, held / 3000)


@pytest.mark.parametrize("case", ["other experiment", "seed twice", "no summary", "not json", "no dir", "nan",
                                  "unfinished"])
def test_dirs_that_are_not_seeds_of_one_experiment_are_one_line_errors(tmp_path, case):
    a = _run_dir(tmp_path, 0, [])
    if case == "other experiment":
        b = _run_dir(tmp_path, 1, [], {**EXPERIMENT, "finetune": {"ft": {"options": {"epochs": 3}}}})
        where = f"{b / 'run.json'}: field 'experiment.finetune.ft.options.epochs'"
    elif case == "seed twice":
        b = tmp_path / "again"
        b.mkdir()
        for f in ("run.json", "summary.json"):
            (b / f).write_text((a / f).read_text())
        where = f"{b / 'run.json'}: field 'experiment.seed': seed 0 again"
    elif case == "no summary":
        b = _run_dir(tmp_path, 1, [])
        (b / "summary.json").unlink()
        where = f"{b}: no summary.json: the run has no report yet: `leakaudit report {b}` writes it"
    elif case == "not json":
        b = _run_dir(tmp_path, 1, [])
        (b / "run.json").write_text("{half")
        where = f"{b / 'run.json'}: not a run record (malformed JSON"
    elif case == "nan":  # a hand-edited summary: statistics raised AttributeError
        b = _run_dir(tmp_path, 1, [_comparison("ft", 0.1, [0.0, 0.2]), _comparison("ft2", float("nan"), [0.0, 0.2])])
        where = f"{b / 'summary.json'}: field 'comparisons[1]': not a comparison with a finite delta"
    elif case == "unfinished":  # killed after some stages, then reported: its comparisons were missing silently
        b = _run_dir(tmp_path, 1, [])
        record = json.loads((b / "run.json").read_text())
        record["stages"][0]["status"] = "pending"
        (b / "run.json").write_text(json.dumps(record))
        where = f"{b / 'run.json'}: 1 of 4 stages are not finished (the first: evaluate/mia/ft)"
    else:
        b = tmp_path / "missing"
        where = f"{b}: not a directory"
    with pytest.raises(InputError) as e:
        read_runs([a, b])
    assert str(e.value).startswith(where) and "\n" not in str(e.value)


def test_the_command_prints_the_tables_and_writes_json(tmp_path, monkeypatch, capsys):
    from typer.testing import CliRunner

    from leakaudit.cli import app

    dirs = [_run_dir(tmp_path, s, [_comparison("ft", d, [d - 0.01, d + 0.01])]) for s, d in ((0, 0.1), (1, 0.2))]
    result = CliRunner().invoke(app, ["seeds", *map(str, dirs), "--json", str(tmp_path / "seeds.json"),
                                      "--markdown", str(tmp_path / "seeds.md")])
    assert result.exit_code == 0, result.output
    assert "| `ft` | +0.100 [+0.090, +0.110]↑ | +0.200 [+0.190, +0.210]↑ | 2 / 0 of 2 |" in result.output
    saved = json.loads((tmp_path / "seeds.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["rows"][0]["mean_delta"] == pytest.approx(0.15)
    assert (tmp_path / "seeds.md").read_text().strip() == result.stdout.strip()  # the tables, stdout's only content
    assert f"wrote {tmp_path / 'seeds.md'}" in result.stderr and f"wrote {tmp_path / 'seeds.json'}" in result.stderr
    code, err = run_main(["seeds", tmp_path / "nowhere"], monkeypatch, capsys)
    assert code == 2 and err == f"error: {tmp_path / 'nowhere'}: not a directory (an output dir of `leakaudit run` is expected)\n"


def test_seeds_run_in_two_checkouts_are_one_experiment(tmp_path):
    """A data file's folder is the checkout's: seeds run on two machines (or a moved one) were refused as
    different experiments although stage keys, by name and content, call their data the same."""
    def with_data(seed, path, content):
        out = _run_dir(tmp_path, seed, [], {**EXPERIMENT, "datasets": {"d": {"path": path}}})
        record = json.loads((out / "run.json").read_text())
        record["stages"].append({"id": "data/d", "kind": "dataset", "key": f"kd{seed}", "params": {"content": content}})
        (out / "run.json").write_text(json.dumps(record))
        return out

    a = with_data(0, "/home/a/project/texts.jsonl", "c1")
    b = with_data(1, "/srv/b/checkout/texts.jsonl", "c1")
    assert [r.seed for r in read_runs([a, b])] == [0, 1]
    c = with_data(2, "/home/a/project/other.jsonl", "c1")  # another file name: other ids
    d = with_data(3, "/srv/b/checkout/texts.jsonl", "c2")  # the same name, other rows
    for other in (c, d):
        with pytest.raises(InputError, match="field 'experiment.datasets.d.path'"):
            read_runs([a, other])


def test_an_experiment_without_comparisons_says_so(tmp_path):
    """It printed the heading alone, as if the tables had gone missing."""
    dirs = [_run_dir(tmp_path, s, []) for s in (0, 1)]
    runs = read_runs(dirs)
    text = markdown(runs, combine(runs))
    assert "No comparisons: none of the experiment's evaluations has a `compare_to`" in text


def test_a_seed_whose_verdict_withholds_a_direction_counts_none(tmp_path):
    """Each run said "no verdict: too few targets" beside an interval above 0; the seeds table
    gave every seed ↑ and counted 3 increases. A direction is the run's verdict's, not the interval's."""
    too_few = "no verdict: too few targets (6; a verdict needs 10)"
    dirs = [_run_dir(tmp_path, s, [{**_comparison("ft", d, [d - 0.5, d + 0.5]), "verdict": too_few}])
            for s, d in ((0, 2.1), (1, 2.2), (2, 1.4))]
    runs = read_runs(dirs)
    (row,) = combine(runs)
    assert (row["increase"], row["decrease"]) == (0, 0)
    assert row["no_verdict"] == "too few targets (6; a verdict needs 10)"
    assert row["mean_ci"][0] > 0  # the numbers stay; only the claim goes
    text = markdown(runs, [row])
    assert "↑" not in text.split("| `ft` |")[1]
    assert "| 0 / 0 of 3 (no verdict: too few targets (6; a verdict needs 10)) |" in text


def test_an_interval_of_no_width_bounds_nothing_over_seeds(tmp_path):
    """A seed whose Δ is the same on every resample ([0, 0]) added a half-width of 0 (narrowing the items'
    part), and three of them made a [0, 0] "95% interval over seeds"."""
    dirs = [_run_dir(tmp_path, s, [_comparison("ft", d, [d - h, d + h])])
            for s, d, h in ((0, 0.1, 0.073), (1, 0.2, 0.042), (2, 0.0, 0.0))]
    (row,) = combine(read_runs(dirs))
    assert row["item_half_width"] == pytest.approx((0.073 + 0.042) / 2)  # not (0.073 + 0.042 + 0) / 3
    (tmp_path / "z").mkdir()
    runs = read_runs([_run_dir(tmp_path / "z", s, [_comparison("ft", 0.0, [0.0, 0.0])]) for s in range(3)])
    (row,) = combine(runs)
    assert row["mean_ci"] is None and row["mean_delta"] == 0
    assert "| 0 / 0 of 3 | 0.000 (no interval: Δ is the same on every resample) |" in markdown(runs, [row])


def test_a_comparison_every_seed_shares_keeps_its_own_interval(tmp_path):
    """One run computed it (the same stages in every seed): its mean column is that run's percentile interval,
    not mean ± its half-width (which moved [+0.212, +0.619] to [+0.206, +0.613])."""
    dirs = [_run_dir(tmp_path, s, [_comparison("m0b", 0.410, [0.212, 0.619])]) for s in range(3)]
    (row,) = combine(read_runs(dirs))
    assert row["same_in_every_seed"] and row["mean_ci"] == [0.212, 0.619]


def test_seeds_outputs_never_replace_an_input_or_a_file_it_did_not_write(tmp_path, monkeypatch, capsys):
    """`--json experiment.yaml` replaced the experiment, `--json s1/summary.json` a run's summary (the next
    `seeds` then failed on it), and an output in a missing or unwritable place was a traceback."""
    dirs = [_run_dir(tmp_path, s, [_comparison("ft", d, [d - 0.01, d + 0.01])]) for s, d in ((0, 0.1), (1, 0.2))]
    experiment = tmp_path / "study.yaml"
    experiment.write_text("name: study\n")
    summary = (dirs[1] / "summary.json").read_text()
    for option, target, message in (
            ("--json", experiment, "output must be a .json file"),
            ("--json", tmp_path / "other.json", "exists and was not written by `leakaudit seeds`"),
            ("--json", dirs[1] / "summary.json", f"is inside the run dir {dirs[1]} directory"),
            ("--markdown", experiment, "exists and was not written by `leakaudit seeds`"),
            ("--markdown", dirs[0], f"is the same path as run dir {dirs[0]}"),
            ("--markdown", tmp_path, f"contains the run dir {dirs[0]} path")):
        if target.name == "other.json":
            target.write_text('{"mine": 1}\n')
        code, err = run_main(["seeds", *dirs, option, target], monkeypatch, capsys)
        assert code == 2 and err.startswith(f"error: {target}: ") and message in err and err.count("\n") == 1, err
    assert experiment.read_text() == "name: study\n" and (dirs[1] / "summary.json").read_text() == summary
    # its own outputs are replaced on a rerun (the JSON is written indented: the whole file is read)
    for _ in range(2):
        code, _err = run_main(["seeds", *dirs, "--json", tmp_path / "o" / "seeds.json", "--markdown",
                               tmp_path / "o" / "seeds.md"], monkeypatch, capsys)
        assert code == 0
    assert json.loads((tmp_path / "o" / "seeds.json").read_text())["seeds"] == [0, 1]


def test_withheld_verdicts_with_intervals_over_0_claim_nothing_over_seeds_either(tmp_path):
    """Every seed withheld its verdict (too few targets) with intervals that held 0: the mean over seeds still
    got an arrow (the withheld rule looked only at intervals that excluded 0). And without any resampling
    (n_bootstrap 0: no interval at all) the mean was said to have "Δ the same on every resample"."""
    too_few = "no verdict: too few targets (6; a verdict needs 10)"
    dirs = [_run_dir(tmp_path, s, [{**_comparison("ft", d, [-0.01, d + 0.05]), "verdict": too_few}])
            for s, d in ((0, 0.20), (1, 0.21), (2, 0.22))]
    runs = read_runs(dirs)
    (row,) = combine(runs)
    assert row["mean_ci"][0] > 0 and row["no_verdict"] == "too few targets (6; a verdict needs 10)"
    assert "↑" not in markdown(runs, [row]).split("| `ft` |")[1]
    (tmp_path / "n").mkdir()
    runs = read_runs([_run_dir(tmp_path / "n", s, [_comparison("ft", d, None)]) for s, d in ((0, 0.1), (1, 0.3))])
    (row,) = combine(runs)
    assert row["mean_ci"] is None and "every resample" not in markdown(runs, [row])


def test_a_seed_with_results_of_an_earlier_kind_version_is_said(tmp_path, capsys):
    """A run dir of a release before a kind's fix, pooled with runs of this one: its stages of that kind hold
    the old numbers, and the spread over seeds the change (the report says it too, test_experiment)."""
    from leakaudit.kinds.pii_logprob import PiiLogprob

    assert PiiLogprob.version == 2
    dirs = [_run_dir(tmp_path, s, [_comparison("ft", 0.1 * (s + 1), [0.0, 0.3])]) for s in range(2)]
    for d, version in zip(dirs, (None, 2), strict=True):  # seed 0 from before versions, seed 1 from this release
        record = json.loads((d / "run.json").read_text())
        record["stages"].append({"id": "evaluate/lp/ft", "kind": "pii-logprob", "folder": "evaluate/lp/ft",
                                 "result": {}, **({"version": version} if version else {})})
        (d / "run.json").write_text(json.dumps(record))
    read_runs(dirs)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and f"{dirs[0]}: 1 stage(s) hold results an earlier leakaudit computed" in err
    assert "evaluate/lp/ft: computed by an earlier leakaudit, which may predate pii-logprob version 2" in err


def test_seeds_computed_in_two_precisions_are_said_to_differ(tmp_path, capsys):
    """A seed run in bf16 and another in fp32 (LEAKAUDIT_DTYPE, or two machines): their spread holds the
    precisions' difference too, which the table does not show; it is said once."""
    from leakaudit.warn import _WARNED

    dirs = [_run_dir(tmp_path, s, [_comparison("ft", 0.1 * (s + 1), [0.0, 0.3])]) for s in range(2)]
    for d, dtype in zip(dirs, ("bfloat16", "float32"), strict=True):
        record = json.loads((d / "run.json").read_text())
        for st in record["stages"]:
            st["precision"] = dtype
        (d / "run.json").write_text(json.dumps(record))
    _WARNED.clear()
    read_runs(dirs)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "in float32" in err and "in bfloat16" in err
    read_runs(dirs[:1] + dirs[:0])  # one precision: nothing said
    assert "warning" not in capsys.readouterr().err


def test_seeds_computed_on_other_thread_counts_in_bf16_are_said_to_differ(tmp_path, capsys):
    """In bf16 a stage's sums round differently with another torch thread count, by about the CI of a small
    fine-tune effect (README, "CPU threads"): a seed run on 1 thread beside one on 2 is said once; in float32
    (differences at the seventh digit) nothing is said."""
    from leakaudit.warn import _WARNED

    dirs = [_run_dir(tmp_path, s, [_comparison("ft", 0.1 * (s + 1), [0.0, 0.3])]) for s in range(2)]

    def record(dtype):
        for d, n in zip(dirs, (1, 2), strict=True):
            run = json.loads((d / "run.json").read_text())
            for st in run["stages"]:
                st.update(precision=dtype, threads=n)
            (d / "run.json").write_text(json.dumps(run))
        _WARNED.clear()
        read_runs(dirs)
        return capsys.readouterr().err

    err = record("bfloat16")
    assert err.count("warning:") == 1 and "on 2 thread(s)" in err and "on 1, in bfloat16" in err, err
    run = json.loads((dirs[0] / "run.json").read_text())  # the first run's run.json is of a release before
    for st in run["stages"]:                                  # threads were recorded: nothing to compare
        del st["threads"]
    (dirs[0] / "run.json").write_text(json.dumps(run))
    _WARNED.clear()
    read_runs(dirs)
    assert "thread" not in capsys.readouterr().err
    assert "warning" not in record("float32")


def test_user_inference_compared_at_another_m_per_seed_is_not_averaged_as_one(tmp_path):
    """A user-inference comparison is at the largest m both targets have results for, which a seed's data can
    move: seeds compared at m = 4 and at m = 1 were one row, their Δs averaged as one quantity, under a heading
    without m. Each m is a row of its own, named as the report's verdicts name it."""
    def at(m, delta):
        return {**_comparison("ft", delta, [delta - 0.1, delta + 0.1], metric="user AUC"), "evaluation": "users",
                "m": m}

    dirs = [_run_dir(tmp_path, 0, [at("4", 0.3)]), _run_dir(tmp_path, 1, [at("1", 0.05)]),
            _run_dir(tmp_path, 2, [at("4", 0.25)])]
    runs = read_runs(dirs)
    rows = {r.get("m"): r for r in combine(runs)}
    assert set(rows) == {"4", "1"}
    assert rows["4"]["n_seeds"] == 2 and rows["4"]["mean_delta"] == pytest.approx(0.275)
    assert rows["1"]["n_seeds"] == 1 and rows["1"]["seeds"][0] is None
    text = markdown(runs, combine(runs))
    assert "**users: user AUC (m = 4)**" in text and "**users: user AUC (m = 1)**" in text
    # a metric without an m keeps its row and heading as they were
    (tmp_path / "p").mkdir()
    plain = combine(read_runs([_run_dir(tmp_path / "p", s, [_comparison("ft", 0.1, [0.0, 0.2])]) for s in (0, 1)]))
    assert [("m" in r, r["metric"]) for r in plain] == [(False, "loss AUC")]


def test_a_name_with_a_backtick_or_a_bar_stays_inside_its_code_span_and_cell(tmp_path):
    """A grid value with "|" (a trigger template, a path) split a row of the Markdown table into one cell more
    than its header, and a backtick in the experiment's name ended its code span: what followed, `<script>`
    included, was read as Markdown and HTML."""
    name = "study `<script>alert(1)</script>` x"
    experiment = {**EXPERIMENT, "name": name}
    variant = "bd[trigger=Repeat | {word}]"
    dirs = [_run_dir(tmp_path, s, [_comparison(variant, 0.1, [0.0, 0.2])], experiment=experiment) for s in (0, 1)]
    runs = read_runs(dirs)
    text = markdown(runs, combine(runs))
    assert text.startswith(f"Experiment ``{name}``, seeds 0, 1")
    (row,) = [line for line in text.splitlines() if line.startswith("| `bd")]
    (header,) = [line for line in text.splitlines() if line.startswith("| variant")]
    # cells are split at the bars that are not escaped: as many in the row as in its header
    assert len(re.split(r"(?<!\\)\|", row)) == len(re.split(r"(?<!\\)\|", header))
    assert row.startswith("| `bd[trigger=Repeat \\| {word}]` |")


@pytest.mark.parametrize(("command", "name"), [("report", "DIR"), ("seeds", "DIR"), ("run", "EXPERIMENT")])
def test_a_missing_argument_is_named_as_the_docs_name_it(command, name, monkeypatch, capsys):
    """`leakaudit report` said "Missing argument 'out'" and `seeds` "'dirs'": names of Python parameters, where the
    docs and the usage line say DIR (and `run`'s EXPERIMENT)."""
    code, err = run_main([command], monkeypatch, capsys)
    assert code == 2 and f"Missing argument '{name}'" in err, err
