"""Where a command may write, checked before any work: never over an input, never over a file or directory
leakaudit did not write, and only where writing works (so a bad `--out` fails in a second, not after training).

The rule, the same for every command:
- `--out` may not be an input, lie inside an input directory, or contain an input.
- an existing output *file* is ours when its first row (or, written indented, the whole file) is a JSON object
  with the keys that command writes, a text output's first line starts as that command writes it, or it is
  empty; it is then resumed or replaced. Anything else is refused.
- an existing non-empty output *directory* is ours when it holds the `.leakaudit` marker (written here on
  first use) or a file the command itself writes; anything else is refused.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from leakaudit.data.io import as_text, open_append
from leakaudit.errors import InputError

MARKER = ".leakaudit"

#: folders this process created for its outputs, outermost first: a command refused for bad input before it wrote
#: anything removes them again (`remove_unwritten`), as if it had not started (a typo in a data file left a new
#: `--out` holding only the marker)
_created: list[Path] = []


def prepare_output(out: str | Path, *, command: str, inputs: Mapping[str, str | Path | None] | None = None,
                   kind: Literal["file", "dir"] = "dir", suffixes: Iterable[str] = (),
                   keys: Iterable[str] = (), files: Iterable[str] = (), marker: bool = True,
                   option: str = "--out", starts: str = "") -> Path:
    """Check `out` against the rule above, create it (dir) or its parent (file), and return it.

    `inputs`: option name -> path of every input (None for an absent option or a model spec that is no path).
    `keys`: JSON keys of the rows a file output holds; `starts`: how a text file output's first line begins.
    `files`: names (relative paths) a dir output holds.
    `marker=False` for dirs another check owns (a fine-tuning run, a merged model): no marker is written.
    """
    p = Path(out)
    require_utf8(p, option)
    where = p.resolve()
    for name, inp in (inputs or {}).items():
        if inp is None:
            continue
        src = Path(inp).resolve()
        if where == src:
            raise InputError(f"is the same path as {name}; write the output elsewhere", file=p, field=option)
        if src.is_dir() and src in where.parents:
            raise InputError(f"is inside the {name} directory; write the output elsewhere", file=p, field=option)
        if where in src.parents:
            raise InputError(f"contains the {name} path {inp}; write the output elsewhere", file=p, field=option)
    if kind == "file":
        _check_file(p, command, tuple(suffixes), tuple(keys), option, starts)
        _writable_dir(p.parent, p, option)
    else:
        _check_dir(p, command, tuple(files), option)
        # the marker is the write test where there is one (no stray temp file another rank could see)
        _writable_dir(p, p, option, mark=command if marker else None)
    return p


def require_utf8(p: Path, option: str = "--out") -> None:
    """A path whose name is not UTF-8 (a folder named in Latin-1 bytes) is refused before any work: Python reads
    it as text with surrogates, and the tokenizer's and the JSON writers' UTF-8 cannot write it (a fine-tune
    failed at its first checkpoint with a traceback). The error shows the bad byte as `\\xe9`."""
    try:
        str(p.absolute()).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("the path is not valid UTF-8 (a name in another encoding): leakaudit cannot write there; "
                         "rename it or choose another path", file=as_text(p), field=option) from None


def _check_file(p: Path, command: str, suffixes: tuple[str, ...], keys: tuple[str, ...], option: str,
                starts: str = "") -> None:
    if p.is_dir():
        raise InputError("is a directory; expected a file", file=p, field=option)
    if suffixes and p.suffix.lower() not in suffixes:
        raise InputError(f"output must be a {' or '.join(suffixes)} file", file=p, field=option)
    if p.exists() and not _file_is_ours(p, keys, starts):
        raise InputError(f"exists and was not written by `leakaudit {command}`; use a new {option} or delete it",
                         file=p, field=option)


def _file_is_ours(p: Path, keys: tuple[str, ...], starts: str = "") -> bool:
    """Empty, or its first row (the whole file when that row opens an indented object) is a JSON object with
    every key this command writes, or its first line begins with `starts`."""
    try:
        with p.open("rb") as fh:
            first = fh.readline()
            while first and not first.strip():
                first = fh.readline()
            if not first.strip():
                return True
            if starts:
                return first.decode("utf-8").startswith(starts)
            row = json.loads(first + fh.read() if first.strip() == b"{" else first)
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return False
    return isinstance(row, dict) and bool(keys) and all(k in row for k in keys)


def _check_dir(p: Path, command: str, files: tuple[str, ...], option: str) -> None:
    if p.exists() and not p.is_dir():
        raise InputError("exists and is a file; expected a directory", file=p, field=option)
    if p.is_dir() and any(p.iterdir()) and not any((p / f).exists() for f in (MARKER, *files)):
        raise InputError(f"directory is not empty and was not written by `leakaudit {command}`; use a new "
                         f"{option} or empty it", file=p, field=option)


def _writable_dir(directory: Path, out: Path, option: str, mark: str | None = None) -> None:
    """Create `directory` (and its parents) and prove a file can be written there: write the marker
    naming command `mark`, or else a temporary file."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{existing} is a file, not a directory", file=out, field=option)
    new = [d for d in (directory, *directory.parents) if not d.exists()][::-1]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _created.extend(new)
        if mark is not None:
            _mark(directory, mark)
        else:
            with tempfile.TemporaryFile(dir=directory):
                pass
    except OSError as exc:
        raise InputError(f"cannot write here: {exc.strerror or exc}", file=out, field=option) from None


def _mark(p: Path, command: str) -> None:
    """Record which leakaudit commands wrote into this dir (what makes a later run recognise it as ours)."""
    path = p / MARKER
    done = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
    if command not in done:
        with open_append(path) as fh:
            fh.write(f"{command}\n")


def forget_created() -> None:
    """Start a command's record of created folders afresh (commands called in one process: tests, a notebook)."""
    _created.clear()


def remove_unwritten() -> None:
    """Remove the folders this process created that hold nothing but the marker, innermost first: what a command
    refused for bad input leaves. Anything else in them (a result, a file another process wrote) keeps them."""
    while _created:
        d = _created.pop()
        try:
            if {p.name for p in d.iterdir()} <= {MARKER}:
                (d / MARKER).unlink(missing_ok=True)
                d.rmdir()
        except OSError:  # gone, or written meanwhile: kept
            continue
