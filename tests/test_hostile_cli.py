"""Hostile command lines: outputs that would overwrite inputs or unrelated files, outputs that cannot be
written, undecodable data, duplicate ids, zero and contradictory option values. Each is refused with exit 2
and ONE `error:` line, before any model is loaded, and leaves every file outside the output untouched."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import run_main

from leakaudit.errors import InputError
from leakaudit.outputs import MARKER, prepare_output


class ModelLoaded(BaseException):
    """Raised in place of loading a model: reaching it means the command checked everything first. Not an
    Exception, which the entry point prints as a bug's traceback (exit 1): this one reaches the test."""


def _snapshot(root: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in root.rglob("*")}


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """Run the console entry point in-process with model loading replaced by ModelLoaded.

    Returns (exit code, the one stderr line); asserts the one-line contract and that nothing outside
    `allowed` (the output path) appeared or changed under tmp_path."""
    import leakaudit.models
    from leakaudit.cli import main

    def no_model(*args, **kwargs):
        raise ModelLoaded(args[0] if args else kwargs)

    monkeypatch.setattr(leakaudit.models, "load_model", no_model)

    def run(*args, allowed: Path | None = None, code: int = 2) -> str:
        before = _snapshot(tmp_path)
        monkeypatch.setattr(sys, "argv", ["leakaudit", *map(str, args)])
        with pytest.raises(SystemExit) as exc:
            main()
        err = capsys.readouterr().err
        assert exc.value.code == code, err
        assert "Traceback" not in err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        after = _snapshot(tmp_path)
        for p, digest in before.items():
            assert after.get(p) == digest, f"{p} changed"
        for p in set(after) - set(before):
            assert allowed is not None and (p == allowed or allowed in p.parents), f"{p} was created"
        return lines[0]

    return run


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n"
                            for i, t in enumerate(["one two three", "four five six", "seven eight", "nine ten"])))
    return path


@pytest.fixture
def notes(tmp_path):
    """An unrelated JSONL file a user keeps next to their data."""
    path = tmp_path / "notes.jsonl"
    path.write_text('{"note": "call Bob"}\n')
    return path


# ----------------------------------------------------------------------------------------- outputs vs inputs
def test_score_out_is_its_input(cli, texts):
    line = cli("score", "--model", "tiny-gpt-neox", "--data", texts, "--out", texts)
    assert "'--out'" in line and "same path as --data" in line


def test_generate_out_is_its_input(cli, texts):
    line = cli("generate", "continuation", "--model", "tiny-gpt-neox", "--data", texts, "--out", texts)
    assert "'--out'" in line and "same path as --data" in line


def test_out_dir_contains_an_input(cli, tmp_path, texts):
    line = cli("mia", "--target", "tiny-gpt-neox", "--data", texts, "--out", tmp_path)
    assert "contains the --data path" in line


def test_out_inside_an_input_dir(cli, tmp_path, texts):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    line = cli("score", "--model", model_dir, "--data", texts, "--out", model_dir / "s.jsonl")
    assert "inside the --model directory" in line


def test_out_inside_a_model_dir_named_from_home(cli, tmp_path, texts, monkeypatch):
    """`--model ~/my-model`, as a shell leaves it when quoted: the loader reads it from the home dir, so the
    output inside it is refused as for any model dir (it was taken for a hub id, not an input)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "my-model").mkdir()
    line = cli("score", "--model", "~/my-model", "--data", texts, "--out", tmp_path / "my-model" / "s.jsonl")
    assert "inside the --model directory" in line


def test_score_stride_as_long_as_the_window(cli, texts):
    """score refuses a stride the window cannot hold, as the kinds' options do (it passed a stride equal to
    --max-length, which the scoring pass halved with a warning where the window was the model's context)."""
    line = cli("score", "--model", "tiny-gpt-neox", "--data", texts, "--out", texts.with_name("s.jsonl"),
               "--max-length", "16", "--stride", "16")
    assert line == "error: field '--stride': stride must be between 1 and max length - 1 (15)"


def test_self_instruct_flat_is_its_out(cli, tmp_path):
    out = tmp_path / "tasks.jsonl"
    line = cli("generate", "self-instruct", "--model", "tiny-gpt-neox", "--n", "2", "--out", out, "--flat", out,
               allowed=out)
    assert "'--flat'" in line and "same path as --out" in line


def test_generate_out_is_an_unrelated_file(cli, texts, notes):
    line = cli("generate", "continuation", "--model", "tiny-gpt-neox", "--data", texts, "--out", notes)
    assert "not written by `leakaudit generate continuation`" in line


def test_self_instruct_out_is_an_unrelated_file(cli, notes):
    line = cli("generate", "self-instruct", "--model", "tiny-gpt-neox", "--n", "2", "--out", notes)
    assert "not written by" in line


def test_score_out_is_a_text_file(cli, tmp_path, texts):
    txt = tmp_path / "notes.txt"
    txt.write_text("my notes\n")
    line = cli("score", "--model", "tiny-gpt-neox", "--data", texts, "--out", txt)
    assert "must be a .jsonl file" in line


def test_out_is_an_unrelated_dir(cli, tmp_path, texts):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8")
    line = cli("mia", "--target", "tiny-gpt-neox", "--data", texts, "--out", photos)
    assert "not empty and was not written by `leakaudit mia`" in line


def test_out_under_a_file(cli, texts, notes):
    line = cli("score", "--model", "tiny-gpt-neox", "--data", texts, "--out", notes / "s.jsonl")
    assert "is a file, not a directory" in line


def test_finetune_out_under_a_file_fails_before_training(cli, texts, notes):
    line = cli("finetune", "--model", "tiny-gpt-neox", "--data", texts, "--out", notes / "run")
    assert "is a file, not a directory" in line


def test_out_in_proc(cli, texts):
    line = cli("mia", "--target", "tiny-gpt-neox", "--data", texts, "--out", "/proc/x")
    assert line.startswith("error: /proc/x: field '--out': cannot write here")


def test_out_file_where_a_dir_is_needed(cli, texts, notes):
    line = cli("pii", "--model", "tiny-gpt-neox", "--out", notes)
    assert "exists and is a file; expected a directory" in line


def test_rerun_into_our_own_outputs_is_allowed(cli, tmp_path, texts):
    """What leakaudit wrote is resumed/replaced: the check passes and the command goes on to load the model."""
    scores = tmp_path / "s.jsonl"
    scores.write_text(json.dumps({"id": "a", "n_tokens": 3, "sum_logp": -1.0, "mean_logp": -0.3}) + "\n")
    with pytest.raises(ModelLoaded):
        cli("score", "--model", "tiny-gpt-neox", "--data", texts, "--out", scores)
    out = tmp_path / "m"
    with pytest.raises(ModelLoaded):
        cli("mia", "--target", "tiny-gpt-neox", "--data", texts, "--out", out, allowed=out)
    assert (out / MARKER).read_text() == "mia\n"
    (out / "roc.png").write_bytes(b"png")
    with pytest.raises(ModelLoaded):  # the marker makes the non-empty dir ours
        cli("mia", "--target", "tiny-gpt-neox", "--data", texts, "--out", out, allowed=out)


def test_prepare_output_rules(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    with pytest.raises(InputError, match="same path as --data"):
        prepare_output(tmp_path / "." / "d.jsonl", command="t", inputs={"--data": data}, kind="file")
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    assert prepare_output(empty, command="t", kind="file", keys=("id",)) == empty  # nothing to lose
    ours = tmp_path / "ours.jsonl"
    ours.write_text('\n{"id": 1, "x": 2}\n')
    prepare_output(ours, command="t", kind="file", keys=("id",))
    with pytest.raises(InputError, match="not written by"):
        prepare_output(ours, command="t", kind="file", keys=("id", "y"))
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="not written by"):
        prepare_output(binary, command="t", kind="file", keys=("id",))
    run = tmp_path / "run"
    run.mkdir()
    (run / "finetune_config.json").write_text("{}")
    prepare_output(run, command="finetune", files=("finetune_config.json",), marker=False)
    assert not (run / MARKER).exists()
    merged = tmp_path / "merged"
    prepare_output(merged, command="merge", marker=False)
    assert merged.is_dir() and not any(merged.iterdir())


# ----------------------------------------------------------------------------------------- undecodable data
def test_invalid_utf8_jsonl(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    out = tmp_path / "o" / "s.jsonl"
    line = cli("score", "--model", "tiny-gpt-neox", "--data", bad, "--out", out, allowed=out.parent)
    assert line.startswith(f"error: {bad}:2: not valid UTF-8")


def test_invalid_utf8_csv(cli, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text,label\nfine,1\n\"two\nlines\",0\nna\xefve,1\n")
    out = tmp_path / "o"
    line = cli("mia", "--target", "tiny-gpt-neox", "--data", bad, "--out", out, allowed=out)
    assert line.startswith(f"error: {bad}:5: not valid UTF-8")


def test_invalid_utf8_json_with_bom(cli, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'\xef\xbb\xbf[\n{"text": "a"},\n{"text": "\x80"}\n]')
    out = tmp_path / "g.jsonl"
    line = cli("generate", "continuation", "--model", "tiny-gpt-neox", "--data", bad, "--out", out, allowed=out)
    assert line.startswith(f"error: {bad}:3: not valid UTF-8")


def test_binary_file(cli, tmp_path):
    png = tmp_path / "image.jsonl"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    out = tmp_path / "r.jsonl"
    line = cli("generate", "replace-pii", "--data", png, "--out", out, allowed=out)
    assert line.startswith(f"error: {png}:1: not valid UTF-8")


def test_invalid_utf8_word_and_name_lists(cli, tmp_path):
    words = tmp_path / "words.txt"
    words.write_bytes(b"When\nWh\xffy\n")
    out = tmp_path / "x"
    line = cli("backdoor", "extract", "--model", "tiny-gpt-neox", "--words", words, "--out", out, allowed=out)
    assert line.startswith(f"error: {words}:2: not valid UTF-8")
    names = tmp_path / "names.txt"
    names.write_bytes(b"Ann\nB\xf6b\n")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    out = tmp_path / "r.jsonl"
    line = cli("generate", "replace-pii", "--data", data, "--names", names, "--out", out, allowed=out)
    assert line.startswith(f"error: {names}:2: not valid UTF-8")


# ----------------------------------------------------------------------------------------- duplicate ids
def test_pii_pairs_duplicate_id(cli, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "p1", "name": "Ann Lee", "email": "ann@corp.com"},
        {"id": "p2", "name": "Bob Roe", "email": "bob@corp.com"},
        {"id": "p1", "name": "Cy Doe", "email": "cy@corp.com"}]))
    out = tmp_path / "o"
    line = cli("pii", "--model", "tiny-gpt-neox", "--pairs", pairs, "--out", out, allowed=out)
    assert line == f"error: {pairs}:3: field 'id': duplicate id 'p1' (first on line 1)"


def _hf_dir_with_broken_info(p: Path) -> None:
    p.mkdir()
    (p / "dataset_info.json").write_text("{not json")


@pytest.mark.parametrize("name, make, line, message", [
    ("big.jsonl", lambda p: p.write_text('{"text": "b", "n": ' + "9" * 5000 + "}\n"), 1, "unreadable JSON"),
    ("deep.jsonl", lambda p: p.write_text("[" * 100_000 + "]" * 100_000 + "\n"), 1, "unreadable JSON"),
    ("deep.json", lambda p: p.write_text("[" * 100_000 + "]" * 100_000), None, "unreadable JSON"),
    ("hf", _hf_dir_with_broken_info, None, "cannot load the saved Hugging Face dataset"),
    ("nullid.jsonl", lambda p: p.write_text('{"text": "a b", "id": null}\n'), 1, "id is empty"),
    ("twice.csv", lambda p: p.write_text("text,id,text\na,1,b\n"), 1, "column 'text' appears twice"),
])
def test_data_files_python_cannot_read_are_one_line(cli, tmp_path, name, make, line, message):
    """Past the parsers' limits (digits, nesting, CSV field size), a broken saved dataset, a null id."""
    data = tmp_path / name
    make(data)
    out = tmp_path / "o"
    got = cli("score", "--model", "tiny-gpt-neox", "--data", data, "--id-field", "id", "--out", out / "s.jsonl",
              allowed=out)
    where = f"{data}:{line}" if line else f"{data}"
    assert got.startswith(f"error: {where}: ") and message in got, got


@pytest.mark.parametrize("args, option", [
    (["--seed", "-1"], "--seed"), (["--seed", str(2**32)], "--seed"),
    (["--epochs", "inf"], "--epochs"), (["--learning-rate", "inf"], "--learning-rate"),
    (["--learning-rate", "nan"], "--learning-rate"),
])
def test_seeds_out_of_range_and_infinite_numbers_are_refused(cli, tmp_path, texts, args, option):
    out = tmp_path / "o"
    got = cli("finetune", "--model", "tiny-gpt-neox", "--data", texts, "--out", out, *args, allowed=out)
    assert f"'{option}'" in got, got


def test_an_error_quoting_an_address_masks_it(cli, tmp_path):
    """Error messages quote bad values, often real addresses (here an id): masked, the line says where."""
    texts = tmp_path / "t.jsonl"
    texts.write_text("".join(json.dumps({"id": "ann.lee@corp.com", "text": f"row {i}"}) + "\n" for i in range(2)))
    out = tmp_path / "o"
    line = cli("score", "--model", "tiny-gpt-neox", "--data", texts, "--id-field", "id", "--out", out / "s.jsonl",
               allowed=out)
    assert line == f"error: {texts}:2: field 'id': duplicate id 'a***@corp.com' (first on line 1)"
    # a phone number (here an id too) is masked as well; the masks keep the line readable
    texts.write_text("".join(json.dumps({"id": "713-853-1234", "text": f"row {i}"}) + "\n" for i in range(2)))
    line = cli("score", "--model", "tiny-gpt-neox", "--data", texts, "--id-field", "id", "--out", out / "s.jsonl",
               allowed=out)
    assert line == f"error: {texts}:2: field 'id': duplicate id '***-***-**34' (first on line 1)"


# ----------------------------------------------------------------------------------------- option values
SCORE = ["score", "--model", "tiny-gpt-neox", "--data", "{texts}", "--out", "{out}/s.jsonl"]
CONT = ["generate", "continuation", "--model", "tiny-gpt-neox", "--data", "{texts}", "--out", "{out}/g.jsonl"]
MIA = ["mia", "--target", "tiny-gpt-neox", "--data", "{texts}", "--out", "{out}"]
TUNE = ["finetune", "--model", "tiny-gpt-neox", "--data", "{texts}", "--out", "{out}"]
PII = ["pii", "--model", "tiny-gpt-neox", "--out", "{out}"]
EXTRACT = ["backdoor", "extract", "--model", "tiny-gpt-neox", "--out", "{out}"]
PLANT = ["backdoor", "plant", "--model", "tiny-gpt-neox", "--out", "{out}"]


@pytest.mark.parametrize("command, extra, option", [
    (SCORE, ["--max-length", "0"], "--max-length"),
    (SCORE, ["--stride", "0"], "--stride"),
    (SCORE, ["--max-length", "8", "--stride", "9"], "--stride"),
    (SCORE, ["--batch-size", "0"], "--batch-size"),
    (SCORE, ["--batch-size", "-4"], "--batch-size"),
    (CONT, ["--max-new-tokens", "0"], "--max-new-tokens"),
    (CONT, ["--top-k", "-1"], "--top-k"),
    (CONT, ["--temperature", "-1"], "--temperature"),
    (CONT, ["--temperature", "0"], "--temperature"),
    (CONT, ["--greedy", "--temperature", "0.7"], "--temperature"),
    (CONT, ["--num-samples", "0"], "--num-samples"),
    (CONT, ["--top-p", "0"], "--top-p"),
    (CONT, ["--limit", "0"], "--limit"),
    (["generate", "self-instruct", "--model", "tiny-gpt-neox", "--out", "{out}/t.jsonl"], ["--n", "0"], "--n"),
    (MIA, ["--attacks", "loss,recall", "--recall-shots", "0"], "--recall-shots"),
    (MIA, ["--k", "0"], "--k"),
    (MIA, ["--max-length", "0"], "--max-length"),
    (MIA, ["--batch-size", "zero"], "--batch-size"),
    (TUNE, ["--epochs", "0"], "--epochs"),
    (TUNE, ["--learning-rate", "0"], "--learning-rate"),
    (TUNE, ["--learning-rate", "-1e-5"], "--learning-rate"),
    (TUNE, ["--batch-size", "0"], "--batch-size"),
    (TUNE, ["--max-length", "0"], "--max-length"),
    (PII, ["--max-new-tokens", "0"], "--max-new-tokens"),
    (PII, ["--top-k", "-1"], "--top-k"),
    (PII, ["--samples-per-prompt", "0"], "--samples-per-prompt"),
    (PII, ["--temperatures", "-0.5"], "--temperatures"),
    (PII, ["--temperatures", "greedy", "--top-k", "5"], "--top-k"),  # greedy reads no top-k: it was ignored
    (PII, ["--temperatures", "0", "--samples-per-prompt", "3"], "--samples-per-prompt"),  # one answer, 3 times
    (EXTRACT, ["--num-samples", "0"], "--num-samples"),
    (EXTRACT, ["--temperature", "0"], "--temperature"),
    (EXTRACT, ["--max-new-tokens", "0"], "--max-new-tokens"),
    (PLANT, ["--epochs", "0"], "--epochs"),
    (PLANT, ["--learning-rate", "0"], "--learning-rate"),
    (PLANT, ["--backdoor-fraction", "0"], "--backdoor-fraction"),
])
def test_zero_and_contradictory_values(cli, tmp_path, texts, command, extra, option):
    out = tmp_path / "out"
    args = [a.format(texts=texts, out=out) for a in command] + extra
    line = cli(*args)  # nothing at all is created: the values are checked before the output
    assert f"'{option}'" in line


def test_recall_shots_without_recall_is_refused_as_unused_not_as_a_bad_value(cli, tmp_path, texts):
    line = cli("mia", "--target", "tiny-gpt-neox", "--data", texts, "--recall-shots", "0", "--out", tmp_path / "out")
    assert line.startswith("error: field '--recall-shots': no attack that runs takes it (it is for recall; "), line


def test_help_and_usage_errors_stay_click_like(tmp_path, monkeypatch, capsys):
    from leakaudit.cli import main

    monkeypatch.setattr(sys, "argv", ["leakaudit", "score", "--help"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0 and "--max-length" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["leakaudit", "score", "--model", "x"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--data" in err


def test_python_m_leakaudit_runs_the_cli_only_as_the_main_module(monkeypatch):
    """A child process started with `spawn` (vLLM's engine core, for one) re-imports the parent's main module
    under another name; `python -m leakaudit` must not run the command again there."""
    import runpy

    import leakaudit.cli

    calls = []
    monkeypatch.setattr(leakaudit.cli, "main", lambda: calls.append(1))
    runpy.run_module("leakaudit.__main__", run_name="__mp_main__")
    assert calls == []
    runpy.run_module("leakaudit.__main__", run_name="__main__")
    assert calls == [1]


def test_a_long_warning_stays_one_line_when_piped(tmp_path):
    """rich wrapped `warning:` lines at 80 columns on a pipe (a log grep then saw half a message)."""
    import subprocess

    members, nonmembers = tmp_path / "m.jsonl", tmp_path / "n.jsonl"
    members.write_text('{"text": "Give three tips for staying healthy and well rested."}\n'
                       '{"text": "Sort these numbers in increasing order please now."}\n')
    nonmembers.write_text('{"text": "Translate this."}\n{"text": "Write a poem."}\n')
    res = subprocess.run([sys.executable, "-m", "leakaudit", "mia", "--target", "tiny-gpt-neox", "--members",
                          str(members), "--nonmembers", str(nonmembers), "--out", str(tmp_path / "o"), "--no-cache",
                          "--n-bootstrap", "10"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "LEAKAUDIT_DTYPE": "fp32"})
    assert res.returncode == 0, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.startswith("warning: text length alone")]
    assert len(lines) == 1 and len(lines[0]) > 80 and lines[0].endswith("match the length distributions")


def test_run_progress_lines_mask_the_pii_a_label_holds_and_keep_paths_and_seeds(capsys):
    """Stage ids hold the experiment's labels: an address used as one was printed whole in `[3/9] ...: running`,
    while the verdict lines masked it. Unquoted digits are paths, seeds and timestamps, not phone numbers:
    masking them printed a report path that does not exist."""
    from leakaudit.cli.run import _log
    from leakaudit.data.pii_mask import mask_message

    _log("[4/9] evaluate/mia/jeff.dasovich@enron.com: done in 1.0s")
    _log("[5/9] finetune/ft_seed=2024061501: running (finetune)")
    _log("report: runs/2025061514/report.html")
    out = capsys.readouterr().err
    assert "j***@enron.com: done" in out and "dasovich" not in out
    assert "ft_seed=2024061501: running" in out and "runs/2025061514/report.html" in out
    # an error line: the quoted value is masked, the file's path is not
    assert mask_message("runs/2025061514/d.jsonl:2: field 'id': duplicate id '713-853-1234' (first on line 1)") == (
        "runs/2025061514/d.jsonl:2: field 'id': duplicate id '***-***-**34' (first on line 1)")
    assert mask_message("user 'Sara Shackleton' appears among both") == "user 'S*** S***' appears among both"


def test_help_at_80_columns_shows_every_option_name_whole(monkeypatch, capsys):
    """The boxed help cut long names at a terminal's 80 columns (`--gradient-accu…`, `--early-stoppin…`)."""
    from leakaudit.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(sys, "argv", ["leakaudit", "finetune", "--help"])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr().out
    assert exit_.value.code in (0, None)
    for name in ("--gradient-accumulation", "--early-stopping-patience", "--max-samples-per-user",
                 "--dedup-within-user / --no-dedup-within-user", "--dp-max-grad-norm"):
        assert name in out, name
    assert "…" not in out and max(map(len, out.splitlines())) <= 80


def test_an_eof_error_is_a_failure_not_an_interrupt(tmp_path, monkeypatch, capsys, texts):
    """click turns any EOFError into Abort: a zero-byte checkpoint file read by torch.load printed "interrupted:
    what finished is kept" and exit 130 on every rerun."""
    import leakaudit.models
    from leakaudit.cli import main

    def eof(*args, **kwargs):
        raise EOFError("Ran out of input reading 'karen.arnold@enron.com'")

    monkeypatch.setattr(leakaudit.models, "load_model", eof)
    monkeypatch.setattr(sys, "argv", ["leakaudit", "score", "--model", "tiny-gpt-neox", "--data", str(texts),
                                      "--out", str(tmp_path / "o.jsonl")])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "interrupted" not in err and "Traceback" in err
    # a bug's traceback, masked as every other one is (it was re-raised raw)
    assert "EOFError: Ran out of input reading 'k***@enron.com'" in err and "Abort" not in err, err


def _signalled_while_loading(tmp_path, signum, *, ignore_first: bool = False) -> tuple[int, str]:
    """Start `leakaudit model-info` with a model load that sleeps, send SIGNUM once it is loading; return the
    exit code and stderr. `ignore_first`: the signal is ignored before leakaudit starts (as `nohup` does), and
    the load ends after 2 s."""
    import subprocess
    import time

    ready = tmp_path / "loading"
    code = ("import sys, time, pathlib, signal, leakaudit.models\n"
            + (f"signal.signal({int(signum)}, signal.SIG_IGN)\n" if ignore_first else "")
            + "def slow(*a, **k):\n"
            f"    pathlib.Path({str(ready)!r}).touch(); time.sleep({2 if ignore_first else 60})\n"
            "    raise SystemExit(7)\n"
            "leakaudit.models.load_model = slow\n"
            "from leakaudit.cli import main\n"
            "sys.argv = ['leakaudit', 'model-info', '--model', 'tiny-gpt-neox']\n"
            "main()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_sigterm_stops_in_order_and_says_what_is_kept(tmp_path):
    """`kill` (or a batch scheduler's SIGTERM) ended a command silently, mid-write and with its lock held; it
    now stops as Ctrl-C does: the one 'interrupted' line, exit 143."""
    import signal

    code, err = _signalled_while_loading(tmp_path, signal.SIGTERM)
    assert code == 143, err
    assert "interrupted: what finished is kept" in err and "Traceback" not in err


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGHUP"), reason="Windows has no SIGHUP")
def test_sighup_stops_in_order_and_nohup_keeps_running(tmp_path):
    """A terminal closed under a run started without nohup (SIGHUP) killed it outright, mid-write, as SIGTERM
    once did: it now stops as SIGTERM does, exit 129. Under nohup (SIGHUP ignored) the command goes on."""
    import signal

    code, err = _signalled_while_loading(tmp_path, signal.SIGHUP)
    assert code == 128 + signal.SIGHUP, err
    assert "interrupted: what finished is kept" in err and "Traceback" not in err
    (tmp_path / "nohup").mkdir()
    code, err = _signalled_while_loading(tmp_path / "nohup", signal.SIGHUP, ignore_first=True)
    assert code == 7 and "interrupted" not in err, err  # the load ran to its end


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGHUP"), reason="Windows has no SIGHUP")
def test_a_closed_terminal_stops_with_129_though_the_stop_writes_to_it(tmp_path):
    """The terminal itself closed (not `kill -HUP` with stderr a pipe): the first write to it as the stop
    unwound (a progress bar's last refresh) raised OSError EIO in place of the stop, exit 1 with a traceback."""
    import os
    import pty
    import signal
    import time

    ready = tmp_path / "loading"
    code = ("import sys, time, pathlib, leakaudit.models\n"
            "def slow(*a, **k):\n"
            f"    pathlib.Path({str(ready)!r}).touch()\n"
            "    try:\n"
            "        time.sleep(60)\n"
            "    finally:\n"
            "        print('last refresh', file=sys.stderr, flush=True)\n"
            "leakaudit.models.load_model = slow\n"
            "from leakaudit.cli import main\n"
            "sys.argv = ['leakaudit', 'model-info', '--model', 'tiny-gpt-neox']\n"
            "main()\n")
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session on the pty, whose closing sends it SIGHUP
        os.execv(sys.executable, [sys.executable, "-c", code])
    try:
        deadline = time.time() + 120
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.close(fd)  # the terminal closes
        for _ in range(600):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("still running a minute after its terminal closed")
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGHUP


def test_a_cache_directory_that_cannot_be_one_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """LEAKAUDIT_CACHE naming a file (or a path under /proc) ended in a 76-line traceback, exit 1."""
    from conftest import run_main

    not_a_dir = tmp_path / "cachefile"
    not_a_dir.write_text("x")
    monkeypatch.setenv("LEAKAUDIT_CACHE", str(not_a_dir))
    code, err = run_main(["model-info", "--model", "tiny-gpt-neox"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {not_a_dir}: field 'LEAKAUDIT_CACHE': cannot be the cache directory"), err


@pytest.mark.parametrize("args, name", [
    (["mia", "--target", "tiny-opt", "--data", "d.jsonl", "--out", "o", "--attacks", "loss", "--attacks=zlib"],
     "--attacks"),
    (["pii", "--model", "tiny-opt", "--out", "o", "--templates", "A", "--templates", "B"], "--templates"),
    (["score", "--model", "tiny-opt", "--model", "tiny-gpt-neox", "--data", "d.jsonl", "--out", "o.jsonl"], "--model"),
])
def test_an_option_given_twice_is_refused_not_cut_to_its_last_value(args, name, tmp_path, monkeypatch, capsys):
    """`--attacks loss --attacks zlib` ran zlib alone, `--templates A --templates B` B alone, two --model the
    second: click keeps the last value silently."""
    monkeypatch.chdir(tmp_path)
    code, err = run_main(args, monkeypatch, capsys)
    assert code == 2 and err == (f"error: option '{name}': given twice: it takes one value, and the last would win "
                                 f"silently (a list is one comma list: {name} a,b)\n")


def test_repeatable_options_and_repeated_flags_are_not_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for args in (["backdoor", "detect", "--model", "tiny-opt", "--model", "tiny-gpt-neox", "--help"],
                 ["mia", "--no-cache", "--no-cache", "--help"], ["mia", "--attacks", "a", "--attacks", "b", "-h"]):
        code, err = run_main(args, monkeypatch, capsys)
        assert code == 0 and "given twice" not in err
    # ... but one model named twice would be probed twice with one result kept
    code, err = run_main(["backdoor", "detect", "--model", "tiny-opt", "--model", "tiny-opt", "--out", "d"],
                         monkeypatch, capsys)
    assert code == 2 and err.strip() == "error: field '--model': 'tiny-opt' given twice" and not (tmp_path / "d").exists()
    from leakaudit.cli import _repeated_option

    # an option's value that looks like an option is a value (a field named "--out")
    assert _repeated_option(["score", "--id-field", "--out", "--out", "o.jsonl"]) is None
    assert _repeated_option(["score", "--out=a.jsonl", "--out", "b.jsonl"]) == "--out"


def test_mia_help_names_every_attack_and_the_real_default(monkeypatch, capsys):
    """It said the default was "every reference-free attack" (4 of the 8 are run) and named none."""
    from leakaudit.attacks.base import ATTACKS
    from leakaudit.attacks.mia import REFERENCE_FREE
    from leakaudit.cli import main

    monkeypatch.setattr("sys.argv", ["leakaudit", "mia", "--help"])
    with pytest.raises(SystemExit):
        main()
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())  # the help box's borders out
    assert all(name in text for name in ATTACKS) and f"default: {','.join(REFERENCE_FREE)}" in text


@pytest.mark.parametrize("command", ["mia", "user-inference"])
def test_the_model_under_attack_is_also_named_by_model(command, tmp_path, monkeypatch, capsys):
    """`mia --model X` said `No such option: --model (Possible options: --help)`: every other command names the
    model --model. Both names are one option (given both, it is given twice)."""
    monkeypatch.chdir(tmp_path)
    users = ["--user-field", "user"] if command == "user-inference" else []
    code, err = run_main([command, "--model", "tiny-opt", "--reference", "tiny-opt", "--data", "missing.jsonl",
                          "--out", "o", *users], monkeypatch, capsys)
    assert code == 2 and "missing.jsonl" in err and "No such option" not in err, err
    code, err = run_main([command, "--model", "tiny-opt", "--target", "tiny-opt", "--data", "d.jsonl", "--out", "o"],
                         monkeypatch, capsys)
    assert code == 2 and "option '--target': given twice" in err


def test_version_and_short_help(monkeypatch, capsys):
    from leakaudit import package_version
    from leakaudit.cli import main

    for args, want in ((["--version"], f"leakaudit {package_version('leakaudit')}\n"), (["score", "-h"], "--model")):
        monkeypatch.setattr("sys.argv", ["leakaudit", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and (out == want if args == ["--version"] else want in out)


@pytest.mark.parametrize("command", [["finetune", "--data", "d.jsonl"], ["backdoor", "finetune", "--limit", "4"]])
def test_fine_tuning_an_adapter_is_refused_before_anything_is_written(command, tmp_path, monkeypatch, capsys):
    """`finetune --model ADAPTER` left an empty --out dir, `backdoor finetune` its downstream data, before
    "merge the adapter first"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "d.jsonl").write_text('{"text": "a line of training data"}\n')
    code, err = run_main([*command, "--model", "adapter", "--method", "lora", "--out", "out"], monkeypatch, capsys)
    assert code == 2 and "merge the adapter first" in err, err
    assert not (tmp_path / "out").exists()


def test_n_targets_zero_means_all_in_both_pii_commands_and_recall_shots_is_not_negative(tmp_path, monkeypatch,
                                                                                         capsys):
    """`pii --n-targets 0` is all targets, `pii-logprob --n-targets 0` was refused; `--recall-shots -2` passed
    unchecked when recall was not among the attacks."""
    import json

    from leakaudit import resources

    monkeypatch.chdir(tmp_path)
    rows = resources.path("pii-enron-pil", "name2email.jsonl").read_text().splitlines()[:4]
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    code, err = run_main(["pii-logprob", "--model", "tiny-opt", "--templates", "A", "--n-targets", "0",
                          "--n-candidates", "2", "--pairs", "pairs.jsonl", "--out", "pl"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "pl" / "pii_logprob.json").read_text())["n_targets"] == 4  # all of them
    code, err = run_main(["mia", "--target", "tiny-opt", "--data", "d.jsonl", "--out", "m", "--recall-shots", "-2"],
                         monkeypatch, capsys)
    assert code == 2 and "--recall-shots" in err


def test_perplexity_and_pii_logprob_take_no_cache_as_the_other_scoring_commands_do(tmp_path, monkeypatch, capsys):
    """`score`, `mia`, `user-inference` had --no-cache; `perplexity` and `pii-logprob`, which score through the
    same cache, did not."""
    import leakaudit.scoring as scoring
    from leakaudit import resources

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(scoring, "_open_cache", lambda: pytest.fail("the score cache was opened"))
    (tmp_path / "d.jsonl").write_text('{"text": "a line of text to measure"}\n')
    rows = resources.path("pii-enron-pil", "name2email.jsonl").read_text().splitlines()[:3]
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    for args in (["perplexity", "--model", "tiny-opt", "--data", "d.jsonl", "--out", "p"],
                 ["pii-logprob", "--model", "tiny-opt", "--templates", "A", "--n-candidates", "2", "--pairs",
                  "pairs.jsonl", "--out", "pl"]):
        code, err = run_main([*args, "--no-cache"], monkeypatch, capsys)
        assert code == 0, err


def test_ctrl_c_in_process_after_an_earlier_sigterm_is_130_and_the_callers_handlers_are_back(tmp_path,
                                                                                          monkeypatch, capsys):
    """main() called again in-process (a notebook, tests): a SIGTERM that stopped an earlier call is not this
    call's, so its Ctrl-C exits 130, not 143; and the caller's SIGTERM and SIGHUP handlers are its own again."""
    import signal

    from conftest import run_main

    import leakaudit.cli as cli
    import leakaudit.models

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(leakaudit.models, "load_model", interrupted)
    monkeypatch.setattr(cli, "_terminated", signal.SIGTERM)  # left by an earlier, stopped call
    def callers(*a):
        pass

    before = signal.signal(signal.SIGTERM, callers)
    hup = getattr(signal, "SIGHUP", None)
    hup_before = signal.signal(hup, signal.SIG_DFL) if hup is not None else None
    try:
        code, err = run_main(["model-info", "--model", "tiny-gpt-neox"], monkeypatch, capsys)
        assert code == 130 and "interrupted: what finished is kept" in err, (code, err)
        assert signal.getsignal(signal.SIGTERM) is callers
        assert hup is None or signal.getsignal(hup) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)
        if hup is not None:
            signal.signal(hup, hup_before)


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGHUP"), reason="Windows has no SIGHUP")
def test_another_rank_stopped_while_reporting_an_error_exits_128_plus_the_signal(monkeypatch):
    """A launched process other than rank 0, stopped while an error unwinds, exits at once with the signal's
    code: 129 for SIGHUP, 143 for SIGTERM."""
    import signal

    import leakaudit.cli as cli

    codes = []
    monkeypatch.setattr(cli, "_terminated", None)  # the handler sets it: put back as it was after the test
    monkeypatch.setattr(cli.os, "_exit", codes.append)
    monkeypatch.setattr(cli, "_other_rank", lambda: True)
    monkeypatch.setattr(cli, "_off_the_closed_terminal", lambda: None)
    for signum in (signal.SIGHUP, signal.SIGTERM):
        try:
            raise ValueError("rank 1's error")
        except ValueError:
            with pytest.raises(cli.Terminated):  # os._exit recorded, not run: the handler goes on
                cli._on_signal(signum, None)
    assert codes == [129, 143]


def test_a_command_refused_for_bad_data_leaves_no_new_output_folder(tmp_path, monkeypatch, capsys):
    """A typo in a data file left the new `--out` (and its new parents) holding only the `.leakaudit` marker;
    a folder that was there before, or one holding anything else, stays."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello world"}\n{"txt": "x"}\n')
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hello there"}\n')
    mia = ["mia", "--target", "tiny-gpt-neox", "--members", bad, "--nonmembers", good, "--attacks", "loss"]
    code, err = run_main([*mia, "--out", tmp_path / "new" / "deeper"], monkeypatch, capsys)
    assert code == 2 and "bad.jsonl:2: field 'text'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl"]
    code, _ = run_main(["finetune", "--model", "tiny-gpt-neox", "--data", bad, "--out", tmp_path / "ft"],
                       monkeypatch, capsys)
    assert code == 2 and not (tmp_path / "ft").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / MARKER).write_text("mia\n")
    (tmp_path / "kept" / "notes.txt").write_text("a file of mine")
    for out in ("mine", "kept"):
        code, _ = run_main([*mia, "--out", tmp_path / out], monkeypatch, capsys)
        assert code == 2 and (tmp_path / out).is_dir()
    assert (tmp_path / "kept" / "notes.txt").read_text() == "a file of mine"
