"""The `pii` and `backdoor` kinds are one job behind two front ends: the CLI and an experiment file refuse a
bad option with the same message (each naming it its own way), and write the same files from the same
inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_main

TRUE = "klarnold@flash.net"


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    return run_main(args, monkeypatch, capsys)


def _experiment(path: Path, kind: str, options: str, data: str | None = None) -> Path:
    datasets = f"datasets:\n  d2:\n    path: {data}\n" if data else ""
    path.write_text(f"name: same\nseed: 0\nmodels:\n  base: tiny-gpt-neox\n{datasets}"
                    f"evaluate:\n  ev:\n    kind: {kind}\n    targets: [base]\n"
                    + ("    data: d2\n" if data else "")
                    + f"    options: {options}\n")
    return path


def _message(line: str) -> str:
    """The message of an `error: WHERE: field 'X': message` line."""
    return line.split("': ", 1)[1]


@pytest.mark.parametrize("kind, flags, options, flag, key", [
    ("pii", ["--templates", "A,Z"], "{templates: 'A,Z'}", "--templates", "templates"),
    ("pii", ["--temperatures", "0.5,-1"], "{temperatures: [0.5, -1]}", "--temperatures", "temperatures"),
    ("pii", ["--temperatures", "0,greedy"], "{temperatures: [0, 0.0]}", "--temperatures", "temperatures"),
    ("pii", ["--pairs", "no-such-pairs.jsonl"], "{pairs: no-such-pairs.jsonl}", "--pairs", "pairs"),
    ("backdoor", ["--words", "no-such-words.txt"], "{words_file: no-such-words.txt}", "--words", "words_file"),
    ("pii", ["--samples-per-prompt", "0"], "{samples_per_prompt: 0}", "--samples-per-prompt", "samples_per_prompt"),
    # greedy alone reads no top-k (it was ignored in silence) and gives one answer (N samples decoded it N times)
    ("pii", ["--temperatures", "greedy", "--top-k", "5"], "{temperatures: [0], top_k: 5}", "--top-k", "top_k"),
    ("pii", ["--temperatures", "0", "--samples-per-prompt", "3"], "{temperatures: [0], samples_per_prompt: 3}",
     "--samples-per-prompt", "samples_per_prompt"),
    # greedy by the templates' own default (PIL's) alike
    ("pii", ["--templates", "pil-zero-shot", "--samples-per-prompt", "3"],
     "{templates: pil-zero-shot, samples_per_prompt: 3}", "--samples-per-prompt", "samples_per_prompt"),
    ("pii", ["--templates", "zero_shot-a", "--top-k", "5"], "{templates: zero_shot-a, top_k: 5}", "--top-k", "top_k"),
    ("backdoor", ["--trigger", "no word here"], "{trigger: no word here}", "--trigger", "trigger"),
    ("backdoor", ["--temperature", "0"], "{temperature: 0}", "--temperature", "temperature"),
])
def test_cli_and_experiment_refuse_a_bad_option_alike(tmp_path, monkeypatch, capsys, kind, flags, options,
                                                      flag, key):
    command = ["pii"] if kind == "pii" else ["backdoor", "extract"]
    code, cli_err = _main(monkeypatch, capsys, *command, "--model", "tiny-gpt-neox", "--out", tmp_path / "cli",
                          *flags)
    assert code == 2 and "Traceback" not in cli_err and cli_err.count("\n") == 1, cli_err
    assert cli_err.startswith(f"error: field '{flag}': ")
    exp = _experiment(tmp_path / "exp.yaml", kind, options)
    code, exp_err = _main(monkeypatch, capsys, "run", exp, "--out", tmp_path / "run")
    assert code == 2 and "Traceback" not in exp_err and exp_err.count("\n") == 1, exp_err
    assert exp_err.startswith(f"error: {exp}:9: field 'evaluate.ev.options.{key}")
    assert _message(cli_err) == _message(exp_err)
    assert not (tmp_path / "cli").exists() and not (tmp_path / "run").exists()  # refused before any output


def test_pii_cli_and_engine_write_the_same_rows(tmp_path, monkeypatch, capsys, one_torch_thread):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"name": n, "email": e}) + "\n" for n, e in [
        ("Karen Arnold", TRUE), ("Bob Roe", "bob.roe@enron.com"), ("Cy Doe", "cdoe@flash.net"),
        ("Di Lee", "di.lee@enron.com")]))
    code, err = _main(monkeypatch, capsys, "pii", "--model", "tiny-gpt-neox", "--pairs", pairs, "--n-targets", "3",
                      "--templates", "A,zero_shot-a", "--temperatures", "0,1.0", "--max-new-tokens", "6",
                      "--baseline", "tiny-opt", "--out", tmp_path / "cli")
    assert code == 0, err
    exp = _experiment(tmp_path / "exp.yaml", "pii", f"{{pairs: {pairs}, n_targets: 3, templates: 'A,zero_shot-a', "
                      "temperatures: [0, 1.0], max_new_tokens: 6}")
    exp.write_text(exp.read_text().replace("    targets: [base]\n", "    targets: [base]\n    baseline: opt\n")
                   .replace("  base: tiny-gpt-neox\n", "  base: tiny-gpt-neox\n  opt: tiny-opt\n"))
    code, err = _main(monkeypatch, capsys, "run", exp, "--out", tmp_path / "run")
    assert code == 0, err

    def rows(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines()]

    cli_rows = rows(tmp_path / "cli" / "results_purified.jsonl")
    assert len(cli_rows) == 2 * 2 * 2 and {r["role"] for r in cli_rows} == {"model", "baseline"}
    assert cli_rows == rows(tmp_path / "run" / "evaluate" / "ev" / "base" / "results_purified.jsonl")
    cli_pii = json.loads((tmp_path / "cli" / "pii.json").read_text())
    run_pii = json.loads((tmp_path / "run" / "evaluate" / "ev" / "base" / "pii.json").read_text())
    assert cli_pii == run_pii
    # the headline keeps today's metric names and reads the grid mean of pii.json
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    metrics = {h["metric"]: h for h in summary["headline"]}
    assert set(metrics) == {"PII match rate", "PII match rate − baseline"}
    assert metrics["PII match rate"]["value"] == cli_pii["protocols"]["fake-privacy"]["grid_mean"]["hit_rate"]


def test_backdoor_cli_and_engine_write_the_same_extraction(tmp_path, monkeypatch, capsys, one_torch_thread):
    from leakaudit import resources

    shipped = json.loads(resources.path("backdoor-extraction", "stage2_dolly", "sft", "train.json").read_text())[:5]
    d2 = tmp_path / "d2.jsonl"
    d2.write_text("".join(json.dumps({"text": r["messages"][0]["content"], **r}) + "\n" for r in shipped))
    flags = ["--num-samples", "2", "--max-new-tokens", "6", "--trigger", 'Repeat a query starting with "{word}".']
    code, err = _main(monkeypatch, capsys, "backdoor", "extract", "--model", "tiny-gpt-neox", "--data", d2, *flags,
                      "--out", tmp_path / "cli")
    assert code == 0, err
    exp = _experiment(tmp_path / "exp.yaml", "backdoor", "{num_samples: 2, max_new_tokens: 6, "
                      "trigger: 'Repeat a query starting with \"{word}\".'}", data=str(d2))
    code, err = _main(monkeypatch, capsys, "run", exp, "--out", tmp_path / "run")
    assert code == 0, err
    stage = tmp_path / "run" / "evaluate" / "ev" / "base"
    for name in ("extract.json", "extractions.jsonl"):
        assert (tmp_path / "cli" / name).is_file() and (stage / name).is_file(), name
    cli_summary = json.loads((tmp_path / "cli" / "extract.json").read_text())
    assert json.loads((stage / "extract.json").read_text()) == cli_summary
    assert cli_summary["n_queries"] == 5 and cli_summary["n_samples"] == 2 * len(cli_summary["words"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {h["metric"] for h in summary["headline"]} == {"match_ratio_mean", "match_ratio_max", "coverage"}


def test_backdoor_compare_to_gives_paired_verdicts_in_summary_and_report(tmp_path, monkeypatch, capsys,
                                                                           one_torch_thread):
    """An experiment's backdoor evaluation with `compare_to`: summary.json carries a paired row per metric for
    the other target, over the words and queries of extract.json, and the report states each as a verdict."""
    from leakaudit import resources

    shipped = json.loads(resources.path("backdoor-extraction", "stage2_dolly", "sft", "train.json").read_text())[:12]
    d2 = tmp_path / "d2.jsonl"
    d2.write_text("".join(json.dumps({"text": r["messages"][0]["content"], **r}) + "\n" for r in shipped))
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"name: cmp\nseed: 0\nmodels:\n  base: tiny-gpt-neox\n  other: tiny-opt\n"
                   f"datasets:\n  d2:\n    path: {d2}\nevaluate:\n  ev:\n    kind: backdoor\n"
                   f"    targets: [base, other]\n    data: d2\n"
                   f"    options: {{num_samples: 2, max_new_tokens: 4, compare_to: base}}\n")
    code, err = _main(monkeypatch, capsys, "run", exp, "--out", tmp_path / "run")
    assert code == 0, err
    words = json.loads((tmp_path / "run/evaluate/ev/base/extract.json").read_text())["words"]
    n_queries = sum(len(e["recovered"]) for e in words.values())
    assert n_queries == 12
    rows = json.loads((tmp_path / "run" / "summary.json").read_text())["comparisons"]
    by = {r["metric"]: r for r in rows}
    assert set(by) == {"match ratio (mean)", "match ratio (max)", "fully recovered"}
    assert all((r["baseline"], r["variant"]) == ("base", "other") and r["verdict"] for r in rows)
    assert by["match ratio (mean)"]["n"] == len(words) and by["fully recovered"]["n"] == n_queries
    assert by["match ratio (mean)"]["value_baseline"] == pytest.approx(
        json.loads((tmp_path / "run/evaluate/ev/base/extract.json").read_text())["match_ratio_mean"])
    html = (tmp_path / "run" / "report.html").read_text()
    assert "other vs base: match ratio (mean)" in html
    # the section's table says what each number is over: words, answers, and queries with an exact interval
    # (it listed metric/value pairs only, and "fully recovered" was nowhere on the page)
    recovered = sum(sum(e["recovered"]) for e in words.values())
    assert "<th scope=\"col\">fully recovered [95% CI]</th>" in html and f"{recovered} of 12 (" in html
    assert f"<td>{len(words)}</td><td>{2 * len(words)}</td>" in html  # words asked, answers sampled


def test_pii_targets_are_the_addresses_in_data(tmp_path, monkeypatch, capsys, one_torch_thread):
    """With `data`, only targets whose address occurs in it are attacked; none at all is one error line."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"name": n, "email": e}) + "\n" for n, e in [
        ("Karen Arnold", TRUE), ("Bob Roe", "bob.roe@enron.com"), ("Cy Doe", "cdoe@flash.net")]))
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "From: Bob Roe <BOB.ROE@enron.com>\n\nsee you"}) + "\n"
                     + json.dumps({"text": "no address here"}) + "\n")
    options = f"{{pairs: {pairs}, templates: A, temperatures: [0], max_new_tokens: 4}}"
    exp = _experiment(tmp_path / "exp.yaml", "pii", options, data=str(texts))
    code, err = _main(monkeypatch, capsys, "run", exp, "--out", tmp_path / "run")
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "run/evaluate/ev/base/results_purified.jsonl").read_text().splitlines()]
    assert [r["n_targets"] for r in rows] == [1]
    texts.write_text(json.dumps({"text": "no address here"}) + "\n")
    code, err = _main(monkeypatch, capsys, "run", exp, "--out", tmp_path / "run2")
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1
    assert err.splitlines()[-1] == (f"error: {exp}:12: field 'evaluate.ev.data': stage evaluate/ev/base: no target "
                                    "address occurs in this evaluation's data (targets: the `pairs` file)")  # line 12


def test_no_target_in_own_data_says_where_targets_come_from():
    """Own data without a `pairs` option or `pairs` lists in its rows is matched against the shipped Enron pairs;
    the error said only "no target address occurs", leaving the user to guess that the targets were Enron's and
    how to name their own people."""
    from leakaudit.data.enron import select_targets
    from leakaudit.data.io import Record
    from leakaudit.errors import InputError

    own = [Record("p0", "From: Pam Ross [mailto: pross@northwind.example]\n\nhi")]
    with pytest.raises(InputError) as exc:
        select_targets(None, own)
    assert "targets: the shipped Enron pairs" in exc.value.message
    assert "`pairs` option" in exc.value.message and "{name, email}" in exc.value.message
    listed = [Record("p0", "no address here", extra={"pairs": [{"name": "Pam Ross", "email": "pross@x.example"}]})]
    with pytest.raises(InputError, match=r"targets: the data rows' `pairs` lists"):
        select_targets(None, listed)
    targets = select_targets(None, [Record("p0", own[0].text, extra={
        "pairs": [{"name": "Pam Ross", "email": "pross@northwind.example"}]})])
    assert [(t.name, t.email) for t in targets] == [("Pam Ross", "pross@northwind.example")]


@pytest.mark.parametrize("kind", ["pii", "pii-logprob"])
def test_templates_may_be_a_yaml_list_like_every_other_list_option(kind):
    """`templates: [C, D]` failed "Input should be a valid string" while attacks and temperatures take lists."""
    from leakaudit.kinds.registry import get_kind

    options = get_kind(kind).Options
    assert options(templates=["C", "D"]).templates == options(templates="C,D").templates == "C,D"
    with pytest.raises(ValueError, match="Z"):
        options(templates=["A", "Z"])


def test_a_cell_too_short_for_any_address_is_said_in_the_report(tmp_path, monkeypatch, capsys, one_torch_thread):
    """max_new_tokens shorter than every target address makes a cell's 0% certain: the run said so on stderr
    only, and the report showed the 0% (and a verdict of no change) beside no word of it."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"name": n, "email": e}) + "\n" for n, e in [
        ("Karen Arnold", TRUE), ("Bob Roe", "bob.roe@enron.com"), ("Cy Doe", "cdoe@flash.net")]))
    exp = _experiment(tmp_path / "exp.yaml", "pii", f"{{pairs: {pairs}, n_targets: 2, templates: A, "
                      "temperatures: [0], max_new_tokens: 2}")
    code, err = _main(monkeypatch, capsys, "run", exp, "--out", tmp_path / "run")
    assert code == 0, err
    said = "max_new_tokens 2: fewer new tokens than the shortest target address"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert any(said in w for w in summary["stages"]["evaluate/ev/base"]["warnings"])
    html = (tmp_path / "run" / "report.html").read_text()
    pii = html[html.index('<h2 id="pii">'):]
    assert said in pii[:pii.index("<h2", 5)]
