"""The `mia` and `user-inference` kinds behind both front ends: the CLI and an experiment file refuse a bad
option with the same message, and on the same texts they write the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_main

ROWS = [{"id": f"r{i}", "user": f"u{i // 2}", "text": t} for i, t in enumerate([
    "Give three tips for staying healthy.", "Sort these numbers from small to large.",
    "Write a short poem about the sea.", "Name the capital city of France.",
    "Explain why the sky looks blue.", "List five fruits that are red.",
    "Translate good morning into Spanish.", "Describe a cat in one sentence.",
    "Suggest a name for a bakery.", "Summarise the plot of a fairy tale.",
    "Count the vowels in the word banana.", "Tell me a joke about computers.",
])]


def _experiment(options: str, evaluations: str = "") -> str:
    return ("name: kinds\n"
            "models: {base: tiny-gpt-neox, ref: tiny-opt}\n"
            "datasets:\n"
            "  d: {path: data.jsonl, user_field: user, split: {a: 0.5, b: 0.5}, split_by: user}\n"
            "evaluate:\n"
            "  m:\n"
            "    kind: mia\n"
            "    targets: [base]\n"
            "    members: d.a\n"
            "    nonmembers: d.b\n"
            f"    options: {options}\n" + evaluations)


@pytest.fixture
def study(tmp_path) -> Path:
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return tmp_path


def _message(err: str) -> str:
    """The message of a one-line `error: [FILE:LINE: ]field 'X': message`."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0].split("': ", 1)[1]


@pytest.mark.parametrize("cli_args, option, where", [
    (["--attacks", "loss,mink"], "{attacks: [loss, mink]}", ("--attacks", "evaluate.m.options.attacks[1]")),
    (["--attacks", "likelihood"], "{attacks: [likelihood]}", ("--attacks", "evaluate.m.options.attacks[0]")),
    (["--attacks", "lira"], "{attacks: [lira]}",  # no reference models: the option, not the attack, is named
     ("--lira-reference", "evaluate.m.options.attack_options.lira.references")),
    (["--attacks", "min_k", "--k", "0"], "{attacks: [min_k], attack_options: {min_k: {k: 0}}}",
     ("--k", "evaluate.m.options.attack_options.min_k.k")),
    (["--attacks", "loss,ref"], "{attacks: [loss, ref]}", ("--attacks", "evaluate.m.options.attacks[1]")),
    (["--attacks", "loss,loss"], "{attacks: [loss, loss]}", ("--attacks", "evaluate.m.options.attacks")),
    (["--max-length", "16", "--stride", "16"], "{max_length: 16, stride: 16}",
     ("--stride", "evaluate.m.options.stride")),  # refused before any scoring, as scoring itself would
])
def test_cli_and_experiment_refuse_a_bad_option_alike(study, monkeypatch, capsys, cli_args, option, where):
    code, cli_err = run_main(["mia", "--target", "tiny-gpt-neox", "--data", study / "data.jsonl", "--out",
                           study / "cli", *cli_args], monkeypatch, capsys)
    assert code == 2 and f"field '{where[0]}'" in cli_err, cli_err
    (study / "exp.yaml").write_text(_experiment(option))
    code, exp_err = run_main(["run", study / "exp.yaml", "--out", study / "run", "--no-report"], monkeypatch, capsys)
    assert code == 2 and f"exp.yaml:11: field '{where[1]}'" in exp_err, exp_err
    assert _message(cli_err) == _message(exp_err)
    if "mink" in option:
        assert "unknown attack 'mink'; did you mean 'min_k'? valid attacks: loss, zlib" in cli_err
    assert not (study / "cli").exists() and not (study / "run" / "data").exists()


def test_cli_and_experiment_give_the_same_numbers(study, monkeypatch, capsys):
    from leakaudit.config import load_experiment
    from leakaudit.experiment import run_experiment

    users = ("  u:\n    kind: user-inference\n    targets: [base]\n    reference: ref\n    members: d.a\n"
             "    nonmembers: d.b\n    options: {m_values: [1, all], n_bootstrap: 30, cache: false}\n")
    text = _experiment("{attacks: [loss, zlib, min_k, ref], n_bootstrap: 30, cache: false}", users).replace(
        "    members: d.a\n    nonmembers: d.b\n    options: {attacks", "    reference: ref\n    members: d.a\n"
        "    nonmembers: d.b\n    options: {attacks", 1)
    run = study / "run"
    (study / "exp.yaml").write_text(text)
    run_experiment(load_experiment(study / "exp.yaml"), run, log=lambda m: None, report=False)
    members, nonmembers = run / "data/d/a.jsonl", run / "data/d/b.jsonl"
    assert members.exists() and nonmembers.exists()

    common = ["--target", "tiny-gpt-neox", "--reference", "tiny-opt", "--n-bootstrap", "30", "--no-cache",
              "--id-field", "id"]
    code, err = run_main(["mia", *common, "--members", members, "--nonmembers", nonmembers, "--attacks",
                       "loss,zlib,min_k,ref", "--out", study / "cli"], monkeypatch, capsys)
    assert code == 0, err
    cli, exp = (json.loads((d / "mia.json").read_text()) for d in (study / "cli", run / "evaluate/m/base"))
    assert set(cli["attacks"]) == {"loss", "zlib", "min_k", "ref"}
    assert cli["seed"] == exp["seed"] == 0  # recorded: comparisons bootstrap with it
    for attack, m in cli["attacks"].items():
        assert m["auc"] == pytest.approx(exp["attacks"][attack]["auc"], abs=1e-12)
        assert m["auc_ci"] == pytest.approx(exp["attacks"][attack]["auc_ci"], abs=1e-12)
        assert m["tpr_at_fpr"] == pytest.approx(exp["attacks"][attack]["tpr_at_fpr"], abs=1e-12)
    for name in ("scores.jsonl", "roc.png"):  # the same files from both front ends
        assert (study / "cli" / name).exists() and (run / "evaluate/m/base" / name).exists()
    rows = [(study / "cli" / "scores.jsonl").read_text(), (run / "evaluate/m/base/scores.jsonl").read_text()]
    assert [json.loads(x)["id"] for x in rows[0].splitlines()] == [json.loads(x)["id"] for x in rows[1].splitlines()]

    code, err = run_main(["user-inference", *common, "--data", members, "--data-out", nonmembers, "--user-field",
                       "user", "--samples-per-user", "1,all", "--out", study / "cli-u"], monkeypatch, capsys)
    assert code == 0, err
    cli, exp = (json.loads((d / "user_inference.json").read_text()) for d in (study / "cli-u", run / "evaluate/u/base"))
    for m in ("1", "all"):
        assert cli["per_m"][m]["auc"] == pytest.approx(exp["per_m"][m]["auc"], abs=1e-12)
    cli_rows, exp_rows = ([json.loads(x) for x in (d / "user_scores.jsonl").read_text().splitlines()]
                          for d in (study / "cli-u", run / "evaluate/u/base"))
    assert [set(r) for r in cli_rows] == [set(r) for r in exp_rows]  # one shape of user_scores.jsonl
    assert [r["score"] for r in cli_rows] == pytest.approx([r["score"] for r in exp_rows], abs=1e-9)


def test_a_user_on_both_sides_is_one_error_naming_the_file(study, monkeypatch, capsys):
    a, b = study / "a.jsonl", study / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:6]))
    b.write_text("".join(json.dumps(r) + "\n" for r in [ROWS[6], {**ROWS[7], "user": "u1"}]))
    code, err = run_main(["user-inference", "--target", "tiny-gpt-neox", "--reference", "tiny-opt", "--data", a,
                       "--data-out", b, "--user-field", "user", "--out", study / "o"], monkeypatch, capsys)
    assert code == 2
    assert _message(err) == "user 'u1' appears among both member (in-training) and non-member users; split the data by user"
    assert err.startswith(f"error: {b}:2: field 'user': ")


def test_attack_warnings_say_a_shared_one_once_and_name_the_attack_of_the_others():
    from leakaudit.kinds.mia import attack_warnings

    low = "only 40 non-members: TPR at FPR 0.01 needs at least 100 to be resolved"
    flat = "AUC 1 (perfect separation, or every score alike) is the same on every resample: ..."
    assert attack_warnings(["length"], {"loss": [low, flat], "zlib": [low], "ref": [low, flat]}) == [
        "length", low, f"loss: {flat}", f"ref: {flat}"]
    assert attack_warnings([], {}) == []


def test_a_ref_comparison_against_the_reference_itself_says_so(tmp_path):
    """M0 against the base model with `reference: base`: the base's ref scores are all 0 (AUC 0.5 by
    construction), so the verdict compares M0's ref AUC with chance; it read like any other change."""
    from leakaudit.kinds.base import StageView
    from leakaudit.kinds.mia import OWN_REFERENCE, MiaResult
    from leakaudit.report.html import verdict_sentence

    def stage(target, spec, scores):
        folder = f"evaluate/mia/{target}"
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "scores.jsonl").write_text("".join(
            json.dumps({"id": f"t{i}", "label": int(i < 10), "loss": s, "ref": s if spec != "base" else 0.0}) + "\n"
            for i, s in enumerate(scores)))
        result = {"attacks": {"loss": {"auc": 0.5}, "ref": {"auc": 0.5}}, "target": spec, "reference": "base",
                  "scores_file": "scores.jsonl"}
        return StageView({"id": folder, "kind": "mia", "folder": folder, "params": {
            "target_label": target, "evaluation": "mia", "options": {"compare_to": "base", "n_bootstrap": 200}},
            "result": result}, tmp_path)

    base = stage("base", "base", [float(i % 7) for i in range(20)])
    m0 = stage("m0", "out/m0", [float(20 - i) for i in range(20)])
    by = {c["metric"]: c for c in MiaResult.comparisons([base, m0])}
    assert by["ref AUC"]["value_baseline"] == pytest.approx(0.5) and by["ref AUC"]["note"] == OWN_REFERENCE
    assert "note" not in by["loss AUC"]
    assert verdict_sentence(by["ref AUC"]).endswith(f"({OWN_REFERENCE})")
    # a baseline that is not the reference gets no note
    base.record["result"]["target"] = "other"
    assert "note" not in {c["metric"]: c for c in MiaResult.comparisons([base, m0])}["ref AUC"]


def test_k_reaches_every_attack_that_takes_one(study, monkeypatch, capsys):
    """`--k` went to min_k and min_k_pp by name: an attack added with a `k` of its own ran at its default,
    whatever --k said, and a bad --k for it was blamed on --attacks."""
    import numpy as np

    from leakaudit.attacks.base import ATTACKS, Attack
    from leakaudit.attacks.mia import MinKConfig
    from leakaudit.cli.mia import takes_k

    class LowestK(Attack):
        name, paper, Config = "lowest_k", "test", MinKConfig

        def score(self, ctx):
            return np.zeros(len(ctx.texts))

    monkeypatch.setitem(ATTACKS, "lowest_k", LowestK)
    assert takes_k(["loss", "min_k", "lowest_k", "min_k_pp", "ref"]) == ["min_k", "lowest_k", "min_k_pp"]
    code, err = run_main(["mia", "--target", "tiny-gpt-neox", "--data", study / "data.jsonl", "--out",
                          study / "cli", "--attacks", "lowest_k", "--k", "0"], monkeypatch, capsys)
    assert code == 2 and "field '--k': attack 'lowest_k'" in err, err


def test_a_reference_no_attack_uses_is_refused_by_both_front_ends(study, monkeypatch, capsys):
    """A reference given beside attacks without `ref` was loaded and recorded in mia.json for nothing: the result
    read as calibrated by a model no attack used."""
    code, cli_err = run_main(["mia", "--target", "tiny-gpt-neox", "--reference", "tiny-opt", "--attacks", "loss,zlib",
                              "--data", study / "data.jsonl", "--out", study / "cli"], monkeypatch, capsys)
    assert code == 2 and "field '--attacks'" in cli_err, cli_err
    (study / "exp.yaml").write_text(_experiment("{attacks: [loss, zlib]}").replace(
        "    members: d.a", "    reference: ref\n    members: d.a"))
    code, exp_err = run_main(["run", study / "exp.yaml", "--out", study / "run", "--no-report"], monkeypatch, capsys)
    assert code == 2 and "field 'evaluate.m.options.attacks'" in exp_err, exp_err
    assert _message(cli_err) == _message(exp_err) == ("a reference model is given but no attack uses it (loss, zlib): "
                                                      "add ref, or give no reference")
    assert not (study / "cli").exists() and not (study / "run" / "data").exists()


@pytest.mark.parametrize("flag, value, attacks, used_by", [
    ("--k", "0.1", "loss,zlib", "min_k, min_k_pp"),
    ("--recall-shots", "2", "loss", "recall"),
    ("--recall-prefix", "data.jsonl", "min_k", "recall"),
    ("--dc-pdd-corpus", "dolly", None, "dc_pdd"),
])
def test_a_flag_of_an_attack_that_does_not_run_is_refused(study, monkeypatch, capsys, flag, value, attacks, used_by):
    """`--attacks loss --k 0.1` ran and ignored --k in silence (an experiment's attack_options for an attack not
    run is refused); given with an attack that takes it, the flag is used."""
    value = str(study / value) if value.endswith(".jsonl") else value
    (study / "labelled.jsonl").write_text("".join(json.dumps({**r, "label": i % 2}) + "\n" for i, r in enumerate(ROWS)))
    common = ["mia", "--target", "tiny-gpt-neox", "--data", study / "labelled.jsonl", "--n-bootstrap", "0"]
    chosen = ["--attacks", attacks] if attacks else []
    code, err = run_main([*common, "--out", study / "cli", *chosen, flag, value], monkeypatch, capsys)
    assert code == 2 and _message(err).startswith(f"no attack that runs takes it (it is for {used_by}; "), err
    assert f"field '{flag}'" in err and not (study / "cli").exists()
    code, err = run_main([*common, "--out", study / "used", "--attacks", used_by.split(", ")[0], flag, value],
                         monkeypatch, capsys)
    assert code == 0, err


def test_mia_baseline_gives_the_comparisons_an_experiment_gives(study, monkeypatch, capsys):
    """The command-by-command route had no paired Δ AUC (an experiment's `compare_to` did): `--baseline` scores
    the same texts with a second model and writes the experiment's comparison rows and verdict lines."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import run_experiment

    run = study / "run"
    (study / "exp.yaml").write_text(_experiment("{attacks: [loss, zlib], n_bootstrap: 30, cache: false, "
                                                "compare_to: ref}").replace("targets: [base]", "targets: [ref, base]"))
    run_experiment(load_experiment(study / "exp.yaml"), run, log=lambda m: None)
    want = json.loads((run / "summary.json").read_text())["comparisons"]
    code, printed, err = run_main(["mia", "--target", "tiny-gpt-neox", "--baseline", "tiny-opt", "--members",
                                   run / "data/d/a.jsonl", "--nonmembers", run / "data/d/b.jsonl", "--id-field", "id",
                                   "--attacks", "loss,zlib", "--n-bootstrap", "30", "--no-cache", "--out",
                                   study / "cli"], monkeypatch, capsys, stdout=True)
    assert code == 0, err
    got = json.loads((study / "cli" / "comparisons.json").read_text())
    assert (got["target"], got["baseline"]) == ("tiny-gpt-neox", "tiny-opt")
    assert [r["metric"] for r in got["comparisons"]] == [r["metric"] for r in want] == ["loss AUC", "zlib AUC"]
    for g, w in zip(got["comparisons"], want, strict=True):
        assert (g["delta"], g["delta_ci"], g["n"], g["verdict"]) == (w["delta"], w["delta_ci"], w["n"], w["verdict"])
    assert printed.count("mia: tiny-gpt-neox vs tiny-opt: ") == 2
    base = json.loads((study / "cli" / "baseline" / "mia.json").read_text())
    assert base["target"] == "tiny-opt" and base["attacks"]["loss"]["auc"] == pytest.approx(
        json.loads((run / "evaluate/m/ref/mia.json").read_text())["attacks"]["loss"]["auc"], abs=1e-12)


def test_user_inference_baseline_gives_the_comparison_an_experiment_gives(study, monkeypatch, capsys):
    """As for mia: `--baseline` gives the paired Δ user AUC an experiment's `compare_to` gives, by command."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import run_experiment

    users = ("  u:\n    kind: user-inference\n    targets: [ref, base]\n    reference: ref\n    members: d.a\n"
             "    nonmembers: d.b\n    options: {m_values: [1, all], n_bootstrap: 30, cache: false, compare_to: ref}\n")
    run = study / "run"
    (study / "exp.yaml").write_text(_experiment("{attacks: [loss], n_bootstrap: 30}", users))
    run_experiment(load_experiment(study / "exp.yaml"), run, log=lambda m: None)
    want = [c for c in json.loads((run / "summary.json").read_text())["comparisons"] if c["evaluation"] == "u"]
    code, printed, err = run_main(["user-inference", "--target", "tiny-gpt-neox", "--baseline", "tiny-opt",
                                   "--reference", "tiny-opt", "--data", run / "data/d/a.jsonl", "--data-out",
                                   run / "data/d/b.jsonl", "--user-field", "user", "--id-field", "id",
                                   "--samples-per-user", "1,all", "--n-bootstrap", "30", "--no-cache", "--out",
                                   study / "cli"], monkeypatch, capsys, stdout=True)
    assert code == 0, err
    got = json.loads((study / "cli" / "comparisons.json").read_text())["comparisons"]
    assert len(got) == len(want) == 1
    for key in ("metric", "delta", "delta_ci", "n_users", "m", "verdict", "note"):
        assert got[0][key] == want[0][key], key
    assert printed.count("user-inference: tiny-gpt-neox vs tiny-opt: user AUC") == 1, printed


def test_a_rerun_without_baseline_leaves_no_comparison_of_the_earlier_one(study, monkeypatch, capsys):
    """`--baseline` then the same --out without it: comparisons.json still held the earlier run's verdicts beside
    the new mia.json, a comparison this run never made."""
    labelled = study / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({**r, "label": i % 2}) + "\n" for i, r in enumerate(ROWS)))
    common = ["mia", "--target", "tiny-gpt-neox", "--data", labelled, "--attacks", "loss", "--n-bootstrap", "0",
              "--out", study / "cli"]
    code, err = run_main([*common, "--baseline", "tiny-opt"], monkeypatch, capsys)
    assert code == 0 and (study / "cli" / "comparisons.json").exists(), err
    code, err = run_main(common, monkeypatch, capsys)
    assert code == 0, err
    assert not (study / "cli" / "comparisons.json").exists() and not (study / "cli" / "baseline").exists()


def test_a_warning_only_the_baseline_gives_says_it_is_the_baseline_s(tmp_path, monkeypatch, capsys):
    """`--baseline` that is also the reference: its ref scores are all 0, so its run alone warns "ref: AUC 0.5
    ... the same on every resample". Printed bare under the target's table (ref far from 0.5) it read as the
    target's; it names the baseline."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    for name, shift in (("in", 0), ("out", 5)):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"text": f"The {words[(i + shift) % 12]} report reached {words[(3 * i + shift) % 12]} "
                                f"on day {i + shift}."}) + "\n" for i in range(8)))
    code, err = run_main(["mia", "--target", "tiny-opt", "--reference", "tiny-gpt-neox", "--baseline",
                          "tiny-gpt-neox", "--members", tmp_path / "in.jsonl", "--nonmembers", tmp_path / "out.jsonl",
                          "--attacks", "loss,ref", "--n-bootstrap", "30", "--no-cache", "--out", tmp_path / "o"],
                         monkeypatch, capsys)
    assert code == 0, err
    lines = [x for x in err.splitlines() if "is the same on every resample" in x and x.startswith("warning: ")]
    assert lines and all(x.startswith("warning: baseline tiny-gpt-neox: ref: ") for x in lines), lines
