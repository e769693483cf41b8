"""Membership labels in a data row: one file holding both members and non-members (or in- and out-of-training
users), each row labelled 1/0, true/false, member/nonmember or in/out.

Why a module: `mia` and `user-inference` both accept such a file, and a label means the same in both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from leakaudit.data.io import Record, load_records
from leakaudit.errors import InputError

TRUE_LABELS = {"1", "true", "yes", "member", "in"}
FALSE_LABELS = {"0", "false", "no", "nonmember", "non-member", "out"}


def parse_label(value: Any, path: Path, line: int, field: str) -> int:
    """A membership label from a data row: 1/0, true/false, member/nonmember, in/out."""
    text = str(value).strip().lower()
    if isinstance(value, bool) or text in TRUE_LABELS | FALSE_LABELS:
        return 1 if (value is True or text in TRUE_LABELS) else 0
    raise InputError(f"label '{value}' is not one of 1/0, true/false, member/nonmember, in/out", file=path,
                     line=line, field=field)


def split_labelled(path: Path, label_field: str, **fields: Any) -> tuple[list[Record], list[Record]]:
    """One labelled file as (label 1 records, label 0 records), each in file order; `fields` go to
    load_records (text_field, id_field, user_field)."""
    ins: list[Record] = []
    outs: list[Record] = []
    for r in load_records(path, **fields):
        if label_field not in r.extra:
            read = (fields.get("text_field", "text"), fields.get("id_field"), fields.get("user_field"))
            have = ", ".join(sorted({*(f for f in read if f), *r.extra}))
            raise InputError(f"missing (row has: {have})", file=path, line=r.line, field=label_field)
        (ins if parse_label(r.extra[label_field], path, r.line, label_field) else outs).append(r)
    return ins, outs


def member_sets(members: Path | None, nonmembers: Path | None, data: Path | None, label_field: str,
                **fields: Any) -> tuple[list[Record], list[Record], Path, Path]:
    """(in records, out records, in file, out file) from either one labelled file (`data`) or two files;
    neither side may be empty and, with an id field, no id may name rows of both files."""
    if data is not None:
        ins, outs = split_labelled(data, label_field, **fields)
        src_in = src_out = data
    else:
        assert members is not None and nonmembers is not None
        ins, outs = load_records(members, **fields), load_records(nonmembers, **fields)
        src_in, src_out = members, nonmembers
        clash = {r.id for r in ins} & {r.id for r in outs}
        if clash and fields.get("id_field"):
            raise InputError(f"id '{sorted(clash)[0]}' is used in both files", file=nonmembers,
                             field=fields["id_field"])
    if fields.get("user_field"):  # as a kind's own reads do, over both sides: one person in and out of training
        from leakaudit.warn import say_lookalike_users

        rows = sorted([(r, src_in) for r in ins] + [(r, src_out) for r in outs],
                      key=lambda x: (x[1] != src_in, x[0].line))  # file order (the members' file first)
        say_lookalike_users([(r.user, f"{src}:{r.line}") for r, src in rows], None, fields["user_field"])
    if not ins:
        raise InputError("no members", file=src_in, field=label_field if data else None)
    if not outs:
        raise InputError("no non-members", file=src_out, field=label_field if data else None)
    return ins, outs, src_in, src_out
