"""Paths and environments users have: names that are not UTF-8 (a Latin-1 folder on Linux), the cache dir's
environment variables. Each case is one clear line or works; none is a traceback after the work."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from leakaudit.errors import InputError


def _latin1(parent: Path, name: bytes) -> Path:
    """parent/name with `name` in Latin-1 bytes, or a skip where the file system takes UTF-8 names only (macOS)."""
    p = parent / os.fsdecode(name)
    try:
        p.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes UTF-8 names only")
    p.rmdir()
    return p


def test_file_hash_under_a_latin1_folder(tmp_path, monkeypatch):
    """The memo key named the path as UTF-8 text: a data file under a Latin-1 folder failed `run`'s plan."""
    from leakaudit.models.fingerprint import file_sha256

    monkeypatch.setenv("LEAKAUDIT_CACHE", str(tmp_path / "cache"))
    folder = _latin1(tmp_path, b"caf\xe9")
    folder.mkdir()
    f = folder / "d.jsonl"
    f.write_bytes(b'{"text": "x"}\n')
    assert file_sha256(f) == hashlib.sha256(b'{"text": "x"}\n').hexdigest()
    assert file_sha256(f) == hashlib.sha256(b'{"text": "x"}\n').hexdigest()  # from the memo


def test_json_writers_keep_a_latin1_path(tmp_path):
    """A record naming a Latin-1 path (run.json's dataset path) is written, and read back as the same path."""
    from leakaudit.data.io import json_line, write_json, write_jsonl

    row = {"path": os.fsdecode(b"/data/caf\xe9/d.jsonl"), "text": "é 日本"}
    assert json.loads(json_line(row)) == row
    write_json(tmp_path / "r.json", row)
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == row
    write_jsonl(tmp_path / "r.jsonl", [row])
    assert json.loads((tmp_path / "r.jsonl").read_text(encoding="utf-8")) == row
    assert "é 日本" in (tmp_path / "r.jsonl").read_text(encoding="utf-8")  # text stays readable, unescaped


def test_default_id_of_a_latin1_file_name(tmp_path):
    """`<file stem>:<line>` of a file named in Latin-1: `score` scored it, then failed writing the ids."""
    from leakaudit.data.io import load_records, write_jsonl

    f = tmp_path / os.fsdecode(b"caf\xe9.jsonl")
    try:
        f.write_text('{"text": "a"}\n{"text": "b"}\n')
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes UTF-8 names only")
    ids = [r.id for r in load_records(f)]
    assert ids == ["caf\\xe9:1", "caf\\xe9:2"]
    write_jsonl(tmp_path / "out.jsonl", [{"id": i} for i in ids])


def test_out_not_utf8_is_one_line(tmp_path):
    """An --out the model libraries cannot write (a fine-tune failed at its first checkpoint) is refused first."""
    from leakaudit.outputs import prepare_output

    out = _latin1(tmp_path, b"caf\xe9")
    with pytest.raises(InputError) as err:
        prepare_output(out, command="mia")
    assert err.value.field == "--out" and "not valid UTF-8" in err.value.message
    assert err.value.file.endswith("caf\\xe9")
    assert not out.exists()


def test_empty_cache_variable_is_unset(tmp_path, monkeypatch):
    """`LEAKAUDIT_CACHE=` made the working directory the cache (models/, filehash/ and scores.sqlite there)."""
    from leakaudit.models.fingerprint import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LEAKAUDIT_CACHE", "")
    monkeypatch.chdir(tmp_path)
    assert cache_dir() == tmp_path / "home" / ".cache" / "leakaudit"
    monkeypatch.setenv("LEAKAUDIT_CACHE", "~/c")  # `~` is the home folder, not a folder named `~` here
    assert cache_dir() == tmp_path / "home" / "c"
    assert not (tmp_path / "~").exists()


def test_no_home_directory_is_one_line(monkeypatch):
    """No HOME and no passwd entry (a container run with an arbitrary uid): Path.home() raised RuntimeError."""
    from leakaudit.models import fingerprint

    monkeypatch.delenv("LEAKAUDIT_CACHE", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(fingerprint.Path, "home", staticmethod(no_home))
    with pytest.raises(InputError) as err:
        fingerprint.cache_dir()
    assert err.value.field == "LEAKAUDIT_CACHE" and "set LEAKAUDIT_CACHE" in err.value.message


def test_unwritable_cache_says_what_to_set(tmp_path, monkeypatch):
    """A read-only HOME: "error: /home/u/.cache: Permission denied" did not say it is leakaudit's cache."""
    from leakaudit.models import fingerprint

    monkeypatch.delenv("LEAKAUDIT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(fingerprint.Path, "mkdir", refuse)
    with pytest.raises(PermissionError) as err:  # still an OSError: file_sha256 and the score cache go on without
        fingerprint.cache_dir()
    assert "set LEAKAUDIT_CACHE to a writable directory" in err.value.strerror
    assert err.value.filename == str(tmp_path / ".cache" / "leakaudit")


def test_stdout_not_in_utf8_writes_every_result(monkeypatch):
    """stdout in cp1252 (Windows, redirected to a file): mia's table failed on its `≥` with a traceback, exit 1."""
    import io
    import sys

    from leakaudit import cli

    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="cp1252", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    cli._printable_streams()
    from leakaudit.cli.core import print_table

    print_table("MIA on m", ("attack", "TPR"), [("loss", "n/a (needs ≥ 100 non-members)")])
    stdout.flush()
    assert b"needs \\u2265 100" in raw.getvalue()

    # LC_ALL=C where Python stays in ASCII: its stdout's surrogateescape wrote a path's bytes but failed on `≥`
    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="ascii", errors="surrogateescape")
    monkeypatch.setattr(sys, "stdout", stdout)
    cli._printable_streams()
    print("needs ≥ 100; report: " + os.fsdecode(b"run\xe9/report.html") + "\udcff≥")
    stdout.flush()
    assert raw.getvalue() == b"needs \\u2265 100; report: run\xe9/report.html\xff\\u2265\n"


def test_a_title_in_a_script_the_font_lacks_warns_nothing(tmp_path):
    """A run dir named `日本 run` put four matplotlib "Glyph ... missing from font(s)" warnings per ROC figure on
    the run's stderr."""
    import warnings

    from leakaudit.metrics import roc_metrics
    from leakaudit.report.plots import plot_roc

    m = roc_metrics([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0])
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        plot_roc({"loss": m}, tmp_path / "roc.png", title="membership inference: 日本 run/model")
    assert not [w for w in got if "missing from font" in str(w.message)]
    assert (tmp_path / "roc.png").stat().st_size > 0


def test_tilde_after_an_equals_sign_is_the_home(tmp_path, monkeypatch, capsys):
    """`--data=~/d.jsonl` (the shell leaves `~` after `=` as it is) named `./~/d.jsonl`, and `--out=~/x` wrote
    into a folder named `~` in the working directory."""
    from conftest import run_main

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, err = run_main(["score", "--model", "tiny-gpt-neox", "--data=~/missing.jsonl", "--out=~/o.jsonl"],
                         monkeypatch, capsys)
    assert code == 2 and err.strip() == f"error: {tmp_path / 'home' / 'missing.jsonl'}: file not found", err
    assert not (tmp_path / "~").exists()


def test_launcher_variables_that_are_no_number(monkeypatch, capsys):
    """`RANK=abc` failed every command with a ValueError traceback before it read its arguments; `RANK=` set
    empty is unset."""
    from conftest import run_main

    from leakaudit.distributed import world

    monkeypatch.setenv("RANK", "")
    monkeypatch.setenv("WORLD_SIZE", " ")
    assert world() == (0, 1)
    monkeypatch.setenv("RANK", "abc")
    code, err = run_main(["model-info", "--model", "tiny-gpt-neox"], monkeypatch, capsys)
    assert code == 2 and err == ("error: field 'RANK': 'abc' is not a number (a launcher's process index, which "
                                 "torchrun sets): unset it to run as one process\n"), err


def test_a_write_refused_names_the_file_not_its_temp(tmp_path, monkeypatch):
    """`leakaudit report` on a read-only run dir said `error: run/report.html.7607.tmp: Permission denied`."""
    from leakaudit.data import io as dio

    real_open = Path.open

    def refuse(self, mode="r", *args, **kwargs):
        if "w" in mode and self.name.endswith(".tmp"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(PermissionError) as err:
        dio.write_json(tmp_path / "report.json", {"a": 1})
    assert err.value.filename == str(tmp_path / "report.json")


def test_a_name_longer_than_the_file_system_allows(tmp_path, monkeypatch, capsys):
    """A name of over 255 bytes (90 CJK characters) in --out, --data or an experiment file's path: every
    command failed with an OSError traceback (ENAMETOOLONG) from its first look at the path."""
    from conftest import run_main

    long = tmp_path / ("日" * 90 + ".jsonl")
    code, err = run_main(["report", long], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "longer than the file system allows" in err, err
    assert err.startswith(f"error: {long}")


def test_an_experiment_file_that_is_a_directory(tmp_path, monkeypatch, capsys):
    """`leakaudit run out/ ...` (a run dir first): "experiment file not found" of a folder that is there."""
    from conftest import run_main

    (tmp_path / "exp.yaml").mkdir()
    code, err = run_main(["run", tmp_path / "exp.yaml", "--out", tmp_path / "out"], monkeypatch, capsys)
    assert code == 2 and err == f"error: {tmp_path / 'exp.yaml'}: is a directory; expected an experiment file (YAML)\n"


@pytest.mark.parametrize("encode, says", [
    (lambda text: text.encode("utf-16"), "is UTF-16 (its first bytes say so), not UTF-8: save it as UTF-8"),
    (lambda text: __import__("gzip").compress(text.encode()), "is gzip-compressed: decompress it first (gunzip)"),
    (lambda text: b"\xff\xfe not text\n", None),  # binary that opens like a UTF-16 mark: the line, as before
])
def test_a_data_file_in_utf16_or_gzip_says_which(tmp_path, encode, says):
    """Excel's "Unicode text" export (UTF-16) and a gzip'd JSONL were each "not valid UTF-8 (a binary file, or
    another text encoding?)"."""
    from leakaudit.data.io import load_records

    path = tmp_path / "d.jsonl"
    path.write_bytes(encode('{"text": "é 日本"}\n{"text": "two"}\n'))
    with pytest.raises(InputError) as err:
        load_records(path)
    assert err.value.message == (says or "not valid UTF-8 (a binary file, or another text encoding?)")


def test_a_working_directory_deleted_under_the_shell(monkeypatch, capsys):
    """A cwd deleted under the shell: torch's import died with "Intel oneMKL FATAL ERROR: Cannot load
    .../libtorch_cpu.so", which reads as a broken install."""
    from conftest import run_main

    def gone():
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(os, "getcwd", gone)
    code, err = run_main(["model-info", "--model", "tiny-gpt-neox"], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: the working directory no longer exists") and err.count("\n") == 1


def test_stage_names_that_differ_only_in_case(tmp_path):
    """`finetune: {Real: ..., real: ...}`: one folder on macOS and Windows, where the second trained over the
    first and both evaluations read one model; refused on every system, so an experiment file moves."""
    import yaml

    from leakaudit.config import parse_experiment
    from leakaudit.experiment import Plan

    ft = {"model": "base", "data": "emails"}
    cfg = {"name": "x", "models": {"base": "tiny-gpt-neox"},
           "datasets": {"emails": {"builtin": "enron-synthetic", "limit": 4}},
           "finetune": {"Real": ft, "real": {**ft, "options": {"epochs": 2}}}}
    with pytest.raises(InputError) as err:
        Plan(parse_experiment(yaml.safe_dump(cfg, sort_keys=False), "exp.yaml"))
    assert err.value.file == "exp.yaml" and err.value.line == 12 and err.value.field == "finetune.real"
    assert "'finetune/Real' and 'finetune/real' differ only in letter case" in err.value.message


def test_matplotlib_with_a_home_it_cannot_write(tmp_path):
    """A read-only HOME (here: ~/.config and ~/.cache are files, which root cannot write through either):
    matplotlib printed "mkdir -p failed ..." and "Matplotlib created a temporary cache directory ..." on every
    command that draws; its folder is now in leakaudit's cache."""
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    (home / ".config").write_text("")
    (home / ".cache").write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), LEAKAUDIT_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    code = ("import os; from leakaudit.report.plots import _plt; plt = _plt(); fig, ax = plt.subplots(); "
            "fig.savefig(os.devnull, format='png'); print(os.environ['MPLCONFIGDIR'])")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.strip() == str(tmp_path / "cache" / "matplotlib")
