"""Load text datasets from any common file format with strict, line-precise validation.

Why strict: a membership-inference number computed on a silently half-parsed file is worse than no
number. Every problem is an InputError naming the file, the line (1-based; for CSV and JSON the file line
where the row starts, for Parquet/Arrow/HF datasets the row number) and the field.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from leakaudit.errors import InputError, one_line

SUPPORTED = (".jsonl", ".json", ".csv", ".arrow", ".parquet", "HF dataset dir")


@dataclass
class Record:
    """One text with its identity. `extra` keeps every other field of the row (labels, prompts, ...)."""

    id: str
    text: str
    user: str | None = None
    line: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Read raw rows as (line number, dict) from any supported format; no field checks yet."""
    p = Path(path)
    if not p.exists():
        raise InputError("file not found", file=p)
    if p.is_dir():
        return _read_hf_dir(p)
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = read_jsonl_rows(p)
    elif suffix == ".json":
        rows = _read_json(p)
    elif suffix == ".csv":
        rows = _read_csv(p)
    elif suffix in (".parquet", ".arrow"):
        rows = _read_table(p)
    elif not suffix:  # `--data <(zcat x.jsonl.gz)` is /dev/fd/63: the format is read from the name
        raise InputError(f"no file type: the format is read from the name's suffix ({', '.join(SUPPORTED)}); "
                         "a pipe or process substitution has none: write it to a file first", file=p)
    else:
        raise InputError(f"unsupported file type '{suffix}'; use one of {', '.join(SUPPORTED)}", file=p)
    if not rows:
        raise InputError("file is empty (no rows)", file=p)
    return rows


def read_text(path: str | Path) -> str:
    """A user's text file as str; bytes that are not UTF-8 are an InputError naming their line.

    A UTF-8 byte-order mark (spreadsheet exports) is dropped."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", file=p) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(p, raw, exc) from None


def read_lines(path: str | Path, jsonl: bool = False) -> io.StringIO:
    """`read_text` as a file object to iterate line by line: universal newlines, like a text-mode file; with
    `jsonl`, lines end at "\n" only, as JSON Lines says (a raw "\r" inside a row is JSON whitespace, and
    universal newlines cut the row there)."""
    return io.StringIO(read_text(path), newline="\n" if jsonl else None)


def _not_utf8(p: Path, raw: bytes, exc: UnicodeDecodeError) -> InputError:
    """`FILE:LINE: not valid UTF-8`, the line being the one that holds the first bad byte."""
    start = exc.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)  # utf-8-sig counts after the BOM
    # what the first bytes say it is (Excel's "Unicode text" export is UTF-16; `x.jsonl` may be gzip'd)
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) and _mostly_ascii_utf16(raw):
        return InputError("is UTF-16 (its first bytes say so), not UTF-8: save it as UTF-8", file=p)
    if raw.startswith(b"\x1f\x8b"):
        return InputError("is gzip-compressed: decompress it first (gunzip)", file=p)
    return InputError("not valid UTF-8 (a binary file, or another text encoding?)", file=p,
                      line=raw[:start].count(b"\n") + 1)


def _mostly_ascii_utf16(raw: bytes) -> bool:
    """Whether bytes that open with a UTF-16 byte-order mark read as UTF-16 text of the kind data files hold
    (nine in ten characters ASCII), not as binary that happens to start with those two bytes."""
    try:
        text = raw[:4096 - len(raw[:4096]) % 2].decode("utf-16")
    except UnicodeDecodeError:
        return False
    return bool(text) and sum(c < "\x80" for c in text) >= 0.9 * len(text)


def read_jsonl_rows(p: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line, row) of every non-blank line of a JSONL file; each row a JSON object (else an InputError)."""
    rows = []
    with read_lines(p, jsonl=True) as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                if exc.msg == "Extra data" and "\r" in raw.rstrip("\r\n"):  # a JSON value ended at a bare CR
                    raise InputError("lines end in CR alone (an old Mac text file); save it with LF line ends",
                                     file=p, line=lineno) from None
                raise InputError(f"malformed JSON: {exc.msg} (column {exc.colno})", file=p, line=lineno) from None
            except (ValueError, RecursionError) as exc:  # an integer past Python's digit limit; deep nesting
                raise InputError(f"unreadable JSON: {one_line(exc)}", file=p, line=lineno) from None
            if not isinstance(obj, dict):
                raise InputError(f"expected a JSON object, got {type(obj).__name__}", file=p, line=lineno)
            if _SURROGATE_ESCAPE.search(raw):
                _refuse_lone_surrogates(obj, p, lineno)
            rows.append((lineno, obj))
    return rows


# a UTF-8 file holds no surrogate; only a JSON escape can make one, alone (half of an emoji's pair)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _refuse_lone_surrogates(obj: Any, p: Path, line: int, field: str | None = None) -> None:
    """A string with a lone surrogate escape (e.g. "\\ud83d" without its pair) is not text: tokenizers raise
    on it and it cannot be written back as UTF-8, so it is refused here, naming its field."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError("holds a lone surrogate escape (half of a \\uD8xx\\uDCxx pair), not valid text",
                             file=p, line=line, field=field) from None
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _refuse_lone_surrogates(key, p, line, field)
            _refuse_lone_surrogates(value, p, line, key if field is None else f"{field}.{key}")
    elif isinstance(obj, list):
        for value in obj:
            _refuse_lone_surrogates(value, p, line, field)


def _read_json(p: Path) -> list[tuple[int, dict[str, Any]]]:
    text = read_text(p)
    if not text.strip():
        return []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON: {exc.msg}", file=p, line=exc.lineno) from None
    except (ValueError, RecursionError) as exc:  # an integer past Python's digit limit; deep nesting
        raise InputError(f"unreadable JSON: {one_line(exc)}", file=p) from None
    if isinstance(obj, dict):
        # {"data": [...]} or a column dict {"text": [...], "id": [...]}
        if "data" in obj and isinstance(obj["data"], list):
            obj = obj["data"]
        elif obj and all(isinstance(v, list) for v in obj.values()):
            n = {len(v) for v in obj.values()}
            if len(n) != 1:
                raise InputError("column lists have different lengths", file=p)
            keys = list(obj)
            obj = [dict(zip(keys, vals, strict=True)) for vals in zip(*obj.values(), strict=True)]
        else:
            raise InputError("expected a JSON array of objects (or {\"data\": [...]})", file=p, line=1)
    if not isinstance(obj, list):
        raise InputError("expected a JSON array of objects", file=p, line=1)
    lines = _element_lines(text, obj)
    rows = []
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    for i, (item, line) in enumerate(zip(obj, lines, strict=True), start=1):
        if not isinstance(item, dict):
            raise InputError(f"element {i}: expected an object, got {type(item).__name__}", file=p, line=line)
        if surrogates:
            _refuse_lone_surrogates(item, p, line)
        rows.append((line, item))
    return rows


_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_SEPARATOR = re.compile(r"[ \t\n\r]*[,:]?[ \t\n\r]*")


def _element_lines(text: str, rows: list) -> list[int]:
    """The file line where each row of a valid JSON file starts, so an error in a pretty-printed array
    points at its line; rows that come from a column dict (no line of their own) get their index."""
    decoder = json.JSONDecoder()
    at = _JSON_SPACE.match(text).end()
    if text[at] == "{":  # {"data": [...]}: find where its (last) "data" value starts
        at, start = at + 1, None
        while text[at := _JSON_SEPARATOR.match(text, at).end()] != "}":
            key, at = decoder.raw_decode(text, at)
            at = _JSON_SEPARATOR.match(text, at).end()
            if key == "data":
                start = at
            _, at = decoder.raw_decode(text, at)
        if start is None or text[start] != "[":
            return list(range(1, len(rows) + 1))
        at = start
    lines, line, done = [], 1, 0
    at += 1
    while text[at := _JSON_SEPARATOR.match(text, at).end()] != "]":
        line, done = line + text.count("\n", done, at), at
        lines.append(line)
        _, at = decoder.raw_decode(text, at)
    return lines


def _read_csv(p: Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows with the file line each ends on (its id). Strict quoting: an unclosed quote is an error naming the
    line the unreadable row starts after, where the lenient default read the rest of the file into one field."""
    # the csv module's default field limit is 131,072 characters (~30k tokens): a long document in one cell
    # was refused though the same text in JSONL scores fine. Raised for this read only (a caller's own limit,
    # process-wide, comes back)
    before = csv.field_size_limit(2**31 - 1)
    try:
        return _read_csv_rows(p)
    finally:
        csv.field_size_limit(before)


def _read_csv_rows(p: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with io.StringIO(read_text(p), newline="") as fh:
        # csv.reader, not DictReader: DictReader skips blank lines inside its next(), so the line counted
        # before it was the blank line's, and every row after one was named (and its id numbered) too early
        reader = csv.reader(fh, strict=True)
        start = 1
        try:
            header = next(reader, None)
            while header == []:  # blank lines before the header
                header = next(reader, None)
            if not header:
                return []
            twice = sorted({f for f in header if header.count(f) > 1})
            if twice:  # a dict keeps the last column of a name silently
                raise InputError(f"column '{twice[0]}' appears twice in the header", file=p, line=reader.line_num,
                                 field=twice[0])
            while True:
                start = reader.line_num + 1
                values = next(reader, None)
                if values is None:
                    return rows
                if not values:  # a blank line: no row
                    continue
                if len(values) > len(header):
                    raise InputError("row has more columns than the header", file=p, line=start)
                # a short row leaves out the fields it lacks (that says which field the row is missing). A row
                # is named by the line it starts on (line_num is the last line of a quoted field spanning several)
                rows.append((start, dict(zip(header, values, strict=False))))
        except csv.Error as exc:  # an unclosed quote, a field over the csv module's size limit
            problem = "a quoted field is never closed" if "unexpected end of data" in str(exc) else one_line(exc)
            raise InputError(f"unreadable CSV: {problem}", file=p, line=start) from None


def _read_table(p: Path) -> list[tuple[int, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if p.suffix.lower() == ".parquet":
            table = pq.read_table(p)
        else:
            try:
                with pa.memory_map(str(p)) as src:
                    table = pa.ipc.open_stream(src).read_all()
            except pa.ArrowInvalid:
                with pa.memory_map(str(p)) as src:
                    table = pa.ipc.open_file(src).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"cannot read as {p.suffix[1:]}: {exc}", file=p) from None
    return [(i, r) for i, r in enumerate(table.to_pylist(), start=1)]


def _read_hf_dir(p: Path) -> list[tuple[int, dict[str, Any]]]:
    if not ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        raise InputError("directory is not a saved Hugging Face dataset (no dataset_info.json)", file=p)
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except (OSError, ValueError, KeyError, TypeError) as exc:  # FileNotFoundError, a broken dataset_info.json
        raise InputError(f"cannot load the saved Hugging Face dataset: {one_line(exc)}", file=p) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise InputError(f"dataset dict has splits {list(ds)}; expected a 'train' split", file=p)
        ds = ds["train"]
    return [(i, r) for i, r in enumerate(ds.to_list(), start=1)]


#: said where a chat row (`messages`) has no text: the attacks and the dataset step read a text; fine-tuning,
#: membership and user inference, perplexity and score with format chat read the messages
CHAT_HINT = ("; rows of conversations are read with format chat where a command takes it (finetune, mia, "
             "user-inference, perplexity, score), and in an experiment's datasets with `messages_field: messages`")


def open_lock(path: Path, mode: int) -> int:
    """A lock file's descriptor, never through a symbolic link: a `.lock` planted as a link in a shared run dir
    made the next run truncate the file it pointed to and write its pid there (any file of the user's)."""
    return _no_follow(path, mode | os.O_CREAT)


def open_append(path: str | Path) -> TextIO:
    """A log or resumable file opened to append to, never through a symbolic link: one planted in an unfinished
    stage's folder had the resumed run append to the file it pointed to."""
    return os.fdopen(_no_follow(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8")


def _no_follow(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise InputError("is a symbolic link; leakaudit never writes through one (remove it)",
                             file=path, field="--out") from None
        raise exc


def default_id(path: Path, index: int, lineno: int) -> str:
    """The id of a row without one: `<file stem>:<line>`, or `<file stem>:<element>` (counted from 1) in a JSON
    array file, where the id then survives reformatting the file. Loaders and generators' provenance share it,
    so a generated row's source_id finds its source row."""
    return f"{id_stem(path)}:{index if path.suffix.lower() == '.json' else lineno}"


def id_stem(path: Path) -> str:
    """A file's stem as the text of an id: a name that is not UTF-8 (Latin-1 bytes, read as surrogates) shows its
    bad bytes as `\\xe9`, since an id with a surrogate cannot be written (`score` failed after scoring)."""
    return as_text(path.stem)


def as_text(path: str | Path) -> str:
    """A path as text any UTF-8 writer takes: bytes of a name that is not UTF-8 (read as surrogates) as `\\xe9`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def load_records(
    path: str | Path,
    *,
    text_field: str = "text",
    id_field: str | None = None,
    user_field: str | None = None,
    keep_empty: bool = False,
    messages_field: str | None = None,
    replies: bool = True,
    limit: int | None = None,
) -> list[Record]:
    """Load and validate texts: the text field must be a string, ids unique, users present if asked.

    Without `id_field`, ids are `<file stem>:<line>` so they stay stable and traceable. With `messages_field`
    the rows are conversations (a chat fine-tune's): each record's text is its assistant replies' contents (one per
    line; `reply_text`), and its checked messages are kept in `extra` under that field (data/chat.py). With
    `replies=False` (an experiment's dataset step, whose rows may be a backdoor's queries with no reply yet) the
    text is every turn's content, one per line, and a conversation needs no reply. `limit`: the first N records
    only (a command's `--limit`): the rows after them are not checked, so a bad row further down is no error.
    """
    p = Path(path)
    rows = read_rows(p)
    records: list[Record] = []
    seen: dict[str, int] = {}
    read = text_field if messages_field is None else messages_field  # the field each record's text comes from
    dropped = {id_field, user_field, *([text_field] if messages_field is None else [])}  # the rest goes to extra
    for index, (lineno, row) in enumerate(rows, start=1):
        if limit is not None and len(records) >= limit:
            break
        chat = isinstance(row, dict) and isinstance(row.get("messages"), list)
        if messages_field is not None:
            from leakaudit.data.chat import last_reply, reply_text, validate_messages

            messages = validate_messages(field_value(row, messages_field, p, lineno), p, lineno, messages_field)
            row = {**row, messages_field: messages}
            if replies:
                last_reply(messages, p, lineno, messages_field)  # a reply to score, or an error naming this line
                text = reply_text(messages)
            else:
                text = "\n".join(m["content"] for m in messages)
        else:
            try:
                text = field_value(row, text_field, p, lineno)
            except InputError as exc:
                raise InputError(exc.message + (CHAT_HINT if chat else ""), file=p, line=lineno,
                                 field=text_field) from None
        if not isinstance(text, str):
            raise InputError(f"must be a string, got {type(text).__name__}" + (CHAT_HINT if chat else ""), file=p,
                             line=lineno, field=read)
        if not text.strip() and not keep_empty:
            raise InputError("text is empty", file=p, line=lineno, field=read)
        rid = default_id(p, index, lineno)
        if id_field:
            raw_id = field_value(row, id_field, p, lineno)
            if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):  # str(None) was id "None"
                raise InputError("id is empty", file=p, line=lineno, field=id_field)
            rid = str(raw_id)
        if rid in seen:
            raise InputError(f"duplicate id '{rid}' (first on line {seen[rid]})", file=p, line=lineno, field=id_field)
        seen[rid] = lineno
        user = user_value(field_value(row, user_field, p, lineno), p, lineno, user_field) if user_field else None
        extra = {k: v for k, v in row.items() if k not in dropped}
        records.append(Record(id=rid, text=text, user=user, line=lineno, extra=extra))
    return records


def user_value(u: Any, path: Path, line: int, field: str) -> str:
    """A row's user id as text, the one rule for every reader of users (user inference, experiments, the
    fine-tune's per-user defenses): 3.0 is user 3 (an integer column with a missing value is read as floats),
    and a missing one (None, blank, a float column's NaN, which became the user "nan") is an error, as is one that is
    no id (a list, a mapping, true/false: the field holds something else, and its repr became a user)."""
    if isinstance(u, bool) or not isinstance(u, (str, int, float, type(None))):
        raise InputError(f"a user id must be a string or a number, got {type(u).__name__}", file=path, line=line,
                         field=field)
    if u is None or (isinstance(u, str) and not u.strip()) or (isinstance(u, float) and not math.isfinite(u)):
        raise InputError("user is empty", file=path, line=line, field=field)
    return str(int(u)) if isinstance(u, float) and u.is_integer() else str(u)


def field_value(row: dict[str, Any], name: str, p: Path, lineno: int) -> Any:
    """Field lookup supporting dotted paths (`meta.user`) with a precise error when absent."""
    cur: Any = row
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            have = ", ".join(sorted(row)) if isinstance(row, dict) else ""
            raise InputError(f"missing (row has: {have})", file=p, line=lineno, field=name)
        cur = cur[part]
    return cur


# and lone surrogates, escaped as JSON writes them with ensure_ascii: a path whose name is not UTF-8 (a Latin-1
# folder) is text with surrogates, which no UTF-8 file can hold raw; escaped, json.loads gives the same path back
_LINE_BREAKS_JSON_KEEPS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085",
                                         **{chr(c): f"\\u{c:04x}" for c in range(0xD800, 0xE000)}})


def json_line(row: Any) -> str:
    """One JSONL line, readable text (not \\u-escaped) but with the line breaks JSON leaves raw (U+2028,
    U+2029, U+0085) escaped, so any line reader (str.splitlines, editors) sees one row per line."""
    return json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS_JSON_KEEPS) + "\n"


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows atomically (temp file + rename) so a kill never leaves a half-written result."""
    write_atomic(path, lambda fh: fh.writelines(json_line(row) for row in rows))


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically."""
    text = json.dumps(obj, indent=2, ensure_ascii=False).translate(_LINE_BREAKS_JSON_KEEPS) + "\n"
    write_atomic(path, lambda fh: fh.write(text))


def write_atomic(path: str | Path, write: Any) -> None:
    """`write(file)` into PATH.<pid>.tmp, then rename it over PATH. A failed write (a full disk) leaves no .tmp and
    names PATH: an OSError from write() carries no file name, so the error line said only "No space left on
    device"."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")  # one per process: two writers shared PATH.tmp
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            write(fh)
        tmp.replace(p)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno is not None and exc.filename in (None, str(tmp)):  # the temp file is ours, not the user's:
            raise OSError(exc.errno, exc.strerror, str(p)) from None  # a read-only run dir said `report.html.7607.tmp`
        raise


def link_or_copy(src: str | Path, dest: str | Path) -> None:
    """Hard-link `src` as `dest` (no second copy on disk), or copy it where the file system has no links."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
