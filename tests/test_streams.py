"""The streams rule (README "Commands"): stdout holds a command's result and stderr the rest, each line PII
masked (only the path of a model a command made goes out as given), and a result piped into a file or `head`
is whole lines, never a table or a sentence cut at 80 columns."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_main

ADDRESS = "jane.doe@enron.com"


def test_audit_data_piped_is_whole_lines_and_names_no_address(tmp_path, monkeypatch, capsys):
    """Drawn by a console of 80 columns into a pipe: the verbatim sentence came out over two lines, and a title
    naming a long generated file over three, with the file's name (a person's address) unmasked on stdout."""
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"text": f"Hello team, the meeting on day {i} moved to the big room at "
                                               f"noon, thanks."}) + "\n" for i in range(4)))
    gen = tmp_path / f"{ADDRESS}.continuations_of_the_enron_study_pipeline_v2.jsonl"
    gen.write_text(src.read_text())
    out = tmp_path / ADDRESS / "audit"
    code, stdout, stderr = run_main(["audit-data", "--source", src, "--generated", gen, "--out", out], monkeypatch,
                                    capsys, stdout=True)
    assert code == 0, stderr
    assert ADDRESS not in stdout + stderr
    lines = stdout.splitlines()
    assert lines[0].startswith("leakage of src.jsonl in j***@enron.com.continuations_of") and "records)" in lines[0]
    assert lines[-1].startswith("verbatim 8-grams: ") and lines[-1].endswith("distinct 8-grams")
    assert "\x1b" not in stdout and "wrote" not in stdout
    assert stderr.startswith("wrote ") and stderr.count("\n") == 1


def test_report_seeds_and_verdicts_mask_what_they_print(tmp_path, monkeypatch, capsys):
    """`report` printed its path whole (an --out named after a person), where `run` masks the same line;
    `seeds` and a run's verdicts printed the experiment's free-text name and labels whole."""
    import leakaudit.report.html as html
    from leakaudit.cli.run import print_verdicts

    made = tmp_path / ADDRESS / "study" / "report.html"
    monkeypatch.setattr(html, "write_report", lambda out: made)
    code, stdout, stderr = run_main(["report", tmp_path / ADDRESS / "study"], monkeypatch, capsys, stdout=True)
    assert (code, stderr) == (0, "") and stdout == f"report: {tmp_path}/j***@enron.com/study/report.html\n"

    dirs = []
    for seed in (0, 1):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        (d / "run.json").write_text(json.dumps({
            "experiment": {"name": f"mail of {ADDRESS}", "models": {"base": "tiny-gpt-neox"}, "seed": seed},
            "stages": [{"id": "evaluate/mia/ft", "kind": "mia", "key": f"k{seed}"}]}))
        comparison = {"evaluation": "mia", "metric": "loss AUC", "baseline": "m0", "variant": f"ft[to={ADDRESS}]",
                      "delta": 0.1, "delta_ci": [0.0, 0.2], "ci": [0.0, 0.2], "verdict": "no detectable change"}
        (d / "summary.json").write_text(json.dumps({"comparisons": [comparison]}))
        dirs.append(d)
    code, stdout, stderr = run_main(["seeds", *dirs], monkeypatch, capsys, stdout=True)
    assert (code, stderr) == (0, "") and stdout.startswith("Experiment `mail of j***@enron.com`, seeds 0, 1")
    assert ADDRESS not in stdout

    print_verdicts(dirs[0])
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("verdicts (paired Δ with its 95% CI")
    assert "ft[to=j***@enron.com] vs m0" in captured.out and ADDRESS not in captured.out


def test_score_masks_the_data_path_its_warning_names(tmp_path, monkeypatch, capsys):
    """The warning for texts with no scored token was printed apart from `say`, the data's path unmasked."""
    data = tmp_path / ADDRESS / "short.jsonl"
    data.parent.mkdir()
    data.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "hello world foo"}) + "\n")
    code, stdout, stderr = run_main(["score", "--model", "tiny-gpt-neox", "--data", data, "--out",
                                     tmp_path / "scores.jsonl"], monkeypatch, capsys, stdout=True)
    assert code == 0 and stdout == "", stderr
    assert "warning: 1 of 2 texts have no scored token" in stderr and "j***@enron.com/short.jsonl:1" in stderr
    assert ADDRESS not in stderr
    assert Path(tmp_path / "scores.jsonl").is_file()


def test_perplexity_and_seeds_say_which_files_they_wrote(tmp_path, monkeypatch, capsys):
    """Every other command names the files it wrote on stderr; perplexity and `seeds --markdown/--json` wrote
    theirs in silence. The result stays stdout's only content."""
    texts = tmp_path / "t.jsonl"
    texts.write_text(json.dumps({"text": "one two three four five six"}) + "\n")
    out = tmp_path / "ppl"
    code, stdout, stderr = run_main(["perplexity", "--model", "tiny-gpt-neox", "--data", texts, "--out", out,
                                     "--no-cache"], monkeypatch, capsys, stdout=True)
    assert code == 0, stderr
    assert stdout.startswith("final\tppl=") and stdout.count("\n") == 1
    assert f"wrote {out / 'perplexity.json'}" in stderr


def test_a_line_on_stderr_keeps_its_brackets_and_colons(capsys):
    """A grid variant's folder (`ft[lr=0.1]`) read as rich markup lost its brackets and value; a folder named
    `a:fire:b` came out as `a🔥b` (rich's emoji codes). The CLI and the library say a line one way."""
    import leakaudit.cli.core as cli_core
    import leakaudit.progress as progress

    assert cli_core.say is progress.say
    cli_core.say("wrote out/finetune/ft[lr=0.1]/model, runs/a:fire:b")
    assert capsys.readouterr().err == "wrote out/finetune/ft[lr=0.1]/model, runs/a:fire:b\n"


def test_the_library_says_its_progress_on_stderr_masked(capsys):
    """Called from Python (a notebook, a script), run_experiment printed its stage lines and `report: OUT/...`
    on stdout, the address in an --out named after a person whole: the library's default log was `print`.
    Progress goes where the CLI's goes: stderr, PII masked."""
    import inspect

    from leakaudit.attacks.pii import run_pii
    from leakaudit.demo import run_demo
    from leakaudit.experiment.engine import run_experiment, run_plan
    from leakaudit.kinds.base import KindContext

    defaults = [inspect.signature(f).parameters["log"].default for f in (run_experiment, run_plan, run_demo, run_pii)]
    for log in [*defaults, KindContext(out=Path(".")).log]:
        log(f"report: out/{ADDRESS}/study/report.html")
        out, err = capsys.readouterr()
        assert out == "" and err == "report: out/j***@enron.com/study/report.html\n"
