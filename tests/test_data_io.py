"""Data loading: every format, and every bad-input case gives a one-line error naming file, line, field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from leakaudit.data.io import load_records, write_jsonl
from leakaudit.errors import InputError

ROWS = [{"id": "a", "text": "first text", "user": "u1"}, {"id": "b", "text": "second text", "user": "u2"}]


def _check(records):
    assert [r.id for r in records] == ["a", "b"]
    assert [r.text for r in records] == ["first text", "second text"]
    assert [r.user for r in records] == ["u1", "u2"]


def test_jsonl_json_csv(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    (tmp_path / "d.csv").write_text("id,text,user\na,first text,u1\nb,second text,u2\n")
    for name in ("d.jsonl", "d.json", "d.csv"):
        _check(load_records(tmp_path / name, id_field="id", user_field="user"))


def test_parquet_arrow_and_hf_dir(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "d.parquet")
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hf"))
    for name in ("d.parquet", "d.arrow", "hf"):
        _check(load_records(tmp_path / name, id_field="id", user_field="user"))


def test_default_ids_are_file_and_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [r.id for r in load_records(tmp_path / "x.jsonl")] == ["x:1", "x:3"]


def test_json_rows_keep_their_element_ids_and_report_their_file_lines(tmp_path):
    """A pretty-printed JSON array: errors point at the row's line, ids count elements (so reformatting the
    file keeps them); a column dict has no line per row and reports its index."""
    rows = [{"text": "a"}, {"text": "b\nc"}, {"text": "d"}]
    (tmp_path / "x.json").write_text(json.dumps(rows, indent=2))
    records = load_records(tmp_path / "x.json")
    assert [r.id for r in records] == ["x:1", "x:2", "x:3"] and [r.line for r in records] == [2, 5, 8]
    (tmp_path / "x.json").write_text(json.dumps({"data": rows}, indent=1))
    assert [r.line for r in load_records(tmp_path / "x.json")] == [3, 6, 9]
    (tmp_path / "x.json").write_text(json.dumps({"text": ["a", "b"]}, indent=2))
    assert [(r.id, r.line) for r in load_records(tmp_path / "x.json")] == [("x:1", 1), ("x:2", 2)]


@pytest.mark.parametrize(
    ("content", "suffix", "expected"),
    [
        ('{"text": "ok"}\n{"text": "broken"\n', ".jsonl", "x.jsonl:2: malformed JSON"),
        ('{"text": "ok"}\n{"body": "no text"}\n', ".jsonl", "x.jsonl:2: field 'text': missing"),
        ('{"text": "ok"}\n{"text": 42}\n', ".jsonl", "x.jsonl:2: field 'text': must be a string, got int"),
        ("", ".jsonl", "x.jsonl: file is empty"),
        ("\n\n", ".jsonl", "x.jsonl: file is empty"),
        ('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n', ".jsonl", "x.jsonl:2: field 'id': duplicate id '1'"),
        ('[{"text": "a"}, 5]', ".json", "x.json:1: element 2: expected an object"),
        ('[\n  {"text": "a"},\n\n  {\n    "body": "b"\n  }\n]', ".json", "x.json:4: field 'text': missing"),
        ('{"meta": {"x": [1, "]"]},\n "data": [{"text": "a"},\n  {"text": 3}]}', ".json",
         "x.json:3: field 'text': must be a string"),
        ("text\nfine\n", ".txt", "unsupported file type '.txt'"),
        ('{"text": "a"}\n', "", "x: no file type: the format is read from the name's suffix"),  # <(zcat ...)
        ("id,text\n1,a,extra\n", ".csv", "x.csv:2: row has more columns"),
        ("id,text\n1,a\n2\n", ".csv", "x.csv:3: field 'text': missing (row has: id)"),  # a short row
        ('id,text\n1,ok\n2,"never closed\n3,swallowed\n', ".csv", "x.csv:3: unreadable CSV: a quoted field is never"),
        ('id,text\n1,"quoted"then more\n', ".csv", "x.csv:2: unreadable CSV: ',' expected after"),
        ('{"text": "   "}\n', ".jsonl", "x.jsonl:1: field 'text': text is empty"),
    ],
)
def test_bad_input_errors(tmp_path, content, suffix, expected):
    path = tmp_path / f"x{suffix}"
    path.write_text(content)
    with pytest.raises(InputError) as info:
        load_records(path, id_field="id" if '"id"' in content or "id," in content else None)
    assert expected in info.value.format()
    assert "\n" not in info.value.format()


@pytest.mark.parametrize("content, suffix, line", [
    (b'{"text": "a"}\n\n{"text": "\xff"}\n', ".jsonl", 3),
    (b'[{"text": "a"},\n {"text": "b\xc3"}]', ".json", 2),
    (b"text\n\"multi\nline\"\nbad\x80\n", ".csv", 4),
    (b"\xef\xbb\xbftext\nok\n\xe9\n", ".csv", 3),  # line counted from the file start, BOM or not
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)), ".jsonl", 1),  # a binary file (a PNG)
])
def test_not_utf8_names_the_line(tmp_path, content, suffix, line):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        load_records(path)
    assert info.value.format().startswith(f"{path}:{line}: not valid UTF-8")


def test_utf8_bom_and_crlf_are_read(tmp_path):
    """A spreadsheet export (BOM, CRLF) reads like any other file; ids keep their line numbers."""
    (tmp_path / "x.csv").write_bytes("\ufefftext,user\r\ncafé,u1\r\n".encode())
    (tmp_path / "x.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n{"text": "b"}\r\n')
    assert [(r.text, r.user) for r in load_records(tmp_path / "x.csv", user_field="user")] == [("café", "u1")]
    assert [r.id for r in load_records(tmp_path / "x.jsonl")] == ["x:1", "x:3"]


def test_missing_user_field(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "a", "user": "u"}\n{"text": "b"}\n')
    with pytest.raises(InputError, match=r"x.jsonl:2: field 'user': missing"):
        load_records(tmp_path / "x.jsonl", user_field="user")


def test_a_float_user_column_keeps_its_users_and_refuses_a_missing_one(tmp_path):
    """A parquet integer user column with a missing value is read as floats: NaN became a user "nan" (counted
    among the non-member users) and 3.0 a user other than 3."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"text {i}", "user": u} for i, u in enumerate([1.0, 3.0, 3.0])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "u.parquet")
    assert [r.user for r in load_records(tmp_path / "u.parquet", user_field="user")] == ["1", "3", "3"]
    pq.write_table(pa.Table.from_pylist([*rows, {"text": "text 3", "user": float("nan")}]), tmp_path / "n.parquet")
    with pytest.raises(InputError, match=r"n.parquet:4: field 'user': user is empty"):
        load_records(tmp_path / "n.parquet", user_field="user")


def test_a_user_that_is_no_id_is_refused(tmp_path):
    """A list, a mapping or true/false in the user field (a recipients list, a label column named by mistake) was
    taken as its repr: "['a', 'b']" and "True" became users, scored and capped as people, in silence."""
    for bad, kind in ((["a", "b"], "list"), ({"id": 1}, "dict"), (True, "bool")):
        (tmp_path / "x.jsonl").write_text(json.dumps({"text": "a", "user": "u"}) + "\n"
                                          + json.dumps({"text": "b", "user": bad}) + "\n")
        with pytest.raises(InputError, match=rf"x.jsonl:2: field 'user': a user id must be a string or a number, "
                                             rf"got {kind}"):
            load_records(tmp_path / "x.jsonl", user_field="user")


def test_user_ids_written_in_two_unicode_forms_are_said(tmp_path, capsys):
    """"José" with é as one code point and as e + U+0301 print alike and were two users, each with part of the
    person's rows, in silence: kept apart as given, with a warning naming the first row, wherever users are
    read for user inference (a kind's records, an experiment's dataset step; the fine-tune: test_defenses)."""
    from leakaudit import warn
    from leakaudit.kinds.base import KindContext

    rows = [{"text": f"mail {i}", "user": "Jos\u00e9" if i < 2 else "Jose\u0301"} for i in range(4)]
    rows.append({"text": "mail 4", "user": "Ann"})
    (tmp_path / "u.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    warn._WARNED.clear()
    users = [r.user for r in KindContext(out=tmp_path, data={"members": tmp_path / "u.jsonl"}).records(
        "members", user_field="user")]
    assert len(set(users)) == 3
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'u.jsonl'}:1: field 'user': 1 user id(s) are written in more than one Unicode form" in err
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + rows[4:]))
    warn._WARNED.clear()
    KindContext(out=tmp_path, data={"members": tmp_path / "v.jsonl"}).records("members", user_field="user")
    assert "Unicode form" not in capsys.readouterr().err


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    proc = subprocess.run([sys.executable, "-m", "leakaudit", "score", "--model", "tiny-gpt-neox", "--data", str(bad),
                           "--out", str(tmp_path / "o.jsonl")], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.jsonl:2" in lines[0]
    assert "Traceback" not in proc.stderr


def test_a_quoted_value_with_a_line_break_stays_on_the_error_line_and_masked(tmp_path):
    """An id "a\\nb" split the error line in two; in a label, the masker (quotes within a line) left a phone
    number on the first of them unmasked."""
    from leakaudit.data.pii_mask import mask_message

    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"text": "x", "id": "a\\nb"}\n{"text": "y", "id": "a\\nb"}\n')
    with pytest.raises(InputError) as info:
        load_records(dup, id_field="id")
    assert info.value.format().endswith("field 'id': duplicate id 'a\\nb' (first on line 1)")
    err = InputError("label '713-853-1234\r\nno' is not one of 1/0", file="x.jsonl", line=1, field="label")
    assert mask_message(err.format()) == "x.jsonl:1: field 'label': label '***-***-**34\\r\\nno' is not one of 1/0"


def test_jsonl_rows_stay_one_per_line_with_unicode_line_separators(tmp_path):
    """JSON leaves U+2028, U+2029 and U+0085 raw with ensure_ascii=False: json_line escapes them, and a stage
    file's reader splits on "\\n" only, so a file of an earlier version (raw separators) reads too."""
    from leakaudit.data.io import json_line
    from leakaudit.kinds.base import read_jsonl

    rows = [{"text": "a\u2028b\u2029c\x85d é"}, {"text": "plain"}]
    write_jsonl(tmp_path / "x.jsonl", rows)
    text = (tmp_path / "x.jsonl").read_text(encoding="utf-8")
    assert len(text.splitlines()) == 2 and "é" in text and json_line(rows[1]) == '{"text": "plain"}\n'
    assert [r.text for r in load_records(tmp_path / "x.jsonl")] == [r["text"] for r in rows]
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (tmp_path / "old.jsonl").write_text(raw, encoding="utf-8")
    assert read_jsonl(tmp_path / "old.jsonl") == rows


def test_a_lone_surrogate_escape_is_refused_naming_its_line_and_field(tmp_path):
    """JSON can escape half of a surrogate pair; the string is then not text (the tokenizer raised a TypeError
    on it, writing it back a UnicodeEncodeError). A whole pair is an emoji and loads."""
    (tmp_path / "x.jsonl").write_text('{"text": "ok \\ud83d\\ude00"}\n{"text": "fine", "meta": {"who": "a\\ud83d"}}\n')
    with pytest.raises(InputError) as err:
        load_records(tmp_path / "x.jsonl")
    assert "x.jsonl:2: field 'meta.who': holds a lone surrogate" in err.value.format()
    (tmp_path / "x.jsonl").write_text('{"text": "ok \\ud83d\\ude00"}\n')
    assert load_records(tmp_path / "x.jsonl")[0].text == "ok \U0001F600"
    (tmp_path / "x.json").write_text('[\n {"text": "a"},\n {"text": "\\udc00 b"}\n]')
    with pytest.raises(InputError, match="holds a lone surrogate") as err:
        load_records(tmp_path / "x.json")
    assert (err.value.line, err.value.field) == (3, "text")


def test_a_failed_atomic_write_leaves_no_tmp_and_names_its_file(tmp_path, monkeypatch):
    """A full disk mid-write: the error line said only "No space left on device" and a partial .tmp stayed."""
    import errno

    from leakaudit.data.io import write_json

    target = tmp_path / "summary.json"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_open = Path.open

    def open_full(self, *args, **kwargs):
        fh = real_open(self, *args, **kwargs)
        monkeypatch.setattr(fh, "write", full)
        return fh

    monkeypatch.setattr(Path, "open", open_full)
    with pytest.raises(OSError) as err:
        write_json(target, {"a": 1})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_a_csv_row_spanning_lines_is_named_by_its_first_line(tmp_path):
    """A quoted text over three lines was named by its last line (its id and any error pointed past it)."""
    (tmp_path / "m.csv").write_text('text,user\n"one\ntwo\nthree",a\nfour,\n')
    with pytest.raises(InputError) as err:
        load_records(tmp_path / "m.csv", user_field="user")
    assert err.value.line == 5  # the short row after it: its own line
    records = load_records(tmp_path / "m.csv")
    assert [r.id for r in records] == ["m:2", "m:5"]


def test_csv_rows_after_blank_lines_keep_their_own_line(tmp_path):
    """Blank lines (which csv skips) made every later row's line, default id and error point lines too early:
    a bad cell on line 6 was reported at line 3."""
    (tmp_path / "b.csv").write_text('text,user\nhello,a\n\n\nworld,b\n\n\n"two\n\nlines",c\n\nthird,d,extra\n')
    with pytest.raises(InputError) as err:
        load_records(tmp_path / "b.csv")
    assert err.value.line == 12 and "more columns" in err.value.message
    (tmp_path / "b.csv").write_text('text,user\nhello,a\n\n\nworld,b\n\n\n"two\n\nlines",c\n\nthird,\n')
    assert [(r.id, r.line) for r in load_records(tmp_path / "b.csv")] == [
        ("b:2", 2), ("b:5", 5), ("b:8", 8), ("b:12", 12)]
    with pytest.raises(InputError) as err:
        load_records(tmp_path / "b.csv", user_field="user")
    assert err.value.line == 12 and err.value.field == "user"


def test_a_chat_row_without_text_says_what_it_needs(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    for field in ("text", "messages"):
        with pytest.raises(InputError) as err:
            load_records(tmp_path / "c.jsonl", text_field=field)
        assert "format chat where a command takes it" in err.value.message and err.value.line == 1


def test_a_csv_cell_longer_than_the_csv_modules_limit_is_read(tmp_path):
    """csv's default field limit (131,072 characters, ~30k tokens) refused a long document in one cell that
    the same file as JSONL read; the process's own limit is left as it was."""
    import csv

    long = "word " * 40_000  # 200,000 characters
    (tmp_path / "x.csv").write_text(f'text\n"{long}"\nshort\n')
    limit = csv.field_size_limit()
    assert [len(r.text) for r in load_records(tmp_path / "x.csv")] == [len(long), 5]
    assert csv.field_size_limit() == limit


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5"])
def test_a_bad_token_budget_is_one_line(value, tmp_path, monkeypatch, capsys):
    """LEAKAUDIT_TOKEN_BUDGET=abc was a ValueError traceback; 0 was taken (every batch one text)."""
    from conftest import run_main

    monkeypatch.setenv("LEAKAUDIT_TOKEN_BUDGET", value)
    data = tmp_path / "t.jsonl"
    write_jsonl(data, [{"text": "a few words to score"}])
    code, err = run_main(["score", "--model", "tiny-gpt-neox", "--data", str(data), "--out", str(tmp_path / "o.jsonl")],
                         monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"error: field 'LEAKAUDIT_TOKEN_BUDGET': must be a whole number of tokens of at least 1, got {value!r}"]


def test_jsonl_rows_end_at_newlines_only(tmp_path):
    """A raw carriage return between a row's tokens is JSON whitespace (a row was cut there and refused as
    malformed); CRLF rows read as before; a file of CR-only line ends is one line, as JSON Lines reads it, refused saying so (it said "Extra data")."""
    p = tmp_path / "r.jsonl"
    p.write_bytes(b'{"text": "a",\r "id": "x"}\r\n{"text": "b", "id": "y"}\n')
    assert [(r.id, r.text, r.line) for r in load_records(p, id_field="id")] == [("x", "a", 1), ("y", "b", 2)]
    p.write_bytes(b'{"text": "a"}\r{"text": "b"}\r')
    with pytest.raises(InputError) as err:
        load_records(p)
    assert err.value.line == 1 and err.value.message.startswith("lines end in CR alone (an old Mac text file)")
    p.write_bytes(b'{"text": "a"} {"text": "b"}\n')  # two values on one line: still malformed JSON
    with pytest.raises(InputError) as err:
        load_records(p)
    assert err.value.line == 1 and "malformed JSON: Extra data" in err.value.message


def test_blank_lines_before_a_csv_header_are_skipped(tmp_path):
    """A CSV starting with blank lines read as empty (no rows, no error): the header is the first line with cells."""
    (tmp_path / "h.csv").write_text("\n\ntext,id\nhello,a\n\nworld,b\n")
    assert [(r.text, r.line) for r in load_records(tmp_path / "h.csv")] == [("hello", 4), ("world", 6)]
    (tmp_path / "d.csv").write_text("\ntext,text\nhello,a\n")
    with pytest.raises(InputError) as err:
        load_records(tmp_path / "d.csv")
    assert err.value.line == 2 and err.value.field == "text"


def test_a_jsonl_name_list_reads_rows_as_jsonl_does(tmp_path):
    """`--names x.jsonl` read with universal newlines: a raw carriage return inside a row cut it."""
    from leakaudit.data.pii_find import load_name_list

    (tmp_path / "n.jsonl").write_bytes(b'{"name":\r "Ann Lee"}\r\n{"name": "Bo Stone"}\n')
    assert [n for n in load_name_list(tmp_path / "n.jsonl")] == ["Ann Lee", "Bo Stone"]


def test_a_file_name_with_a_line_break_stays_on_the_error_line():
    """A file name may hold a line break too (legal on Linux): the `file:line:` part is escaped as the message is."""
    from leakaudit.errors import InputError

    assert InputError("bad row", file="a\nb.jsonl", line=3, field="x\ry").format() == \
        "a\\nb.jsonl:3: field 'x\\ry': bad row"


def test_conversations_load_as_their_replies_or_for_an_experiment_as_their_turns(tmp_path):
    """A command scoring conversations needs a reply in each (its text is the replies); an experiment's dataset
    step (`messages_field`) also takes a conversation with none yet (a backdoor's query), its text every turn."""
    query = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is my parcel?"}]
    chat = [*query, {"role": "assistant", "content": "On its way."}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"messages": query}) + "\n")
    with pytest.raises(InputError, match="has no assistant turn with content") as err:
        load_records(tmp_path / "c.jsonl", messages_field="messages")
    assert err.value.line == 2
    records = load_records(tmp_path / "c.jsonl", messages_field="messages", replies=False)
    assert [r.text for r in records] == ["Be brief.\nWhere is my parcel?\nOn its way.", "Be brief.\nWhere is my parcel?"]
    assert [r.extra["messages"] for r in records] == [chat, query]
