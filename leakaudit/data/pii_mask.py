"""Masking PII in what leakaudit shows: reports, summaries, run records, errors, warnings and progress lines.

Why masking exists: results hold real PII (the addresses, phone numbers and names a model leaked, the data's
own), and reports and logs travel much further than results, so they mask it by default (unless the user asks
for `show_pii`). What is masked is what `leakaudit.data.pii_find` finds, so a value hidden in one artifact is
hidden in all of them. Masking keeps enough shape to read a report ("k***@flash.net", "***-***-**64") without
revealing the value.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from leakaudit.data.pii_find import NameFinder, PiiSpan, find_pii, name_finder, shipped_name_finder

#: the names `mask_message` masks besides the shipped ones: the list of the experiment this process runs
_message_names: NameFinder | None = None


def mask_names_in_messages(mask_names: str | Path | None) -> None:
    """From now on errors and progress lines of this process mask that list's names too (set when an
    experiment with `report.mask_names` is checked, before any stage)."""
    global _message_names
    _message_names = name_finder(mask_names) if mask_names is not None else None


def mask_email(email: str) -> str:
    """Keep the first character of the local part and the domain: "klarnold@flash.net" -> "k***@flash.net".
    Three stars whatever the length: a kept length singled out 74% of the 3,333 shipped addresses among
    themselves (first character and domain alone: 42%)."""
    local, _, domain = email.partition("@")
    if not local:
        return email
    return local[0] + "***@" + domain


def mask_phone(phone: str) -> str:
    """Keep the layout and the last two digits: "713-853-1234" -> "***-***-**34"."""
    n_digits = sum(c.isdigit() for c in phone)
    out, seen = [], 0
    for c in phone:
        if c.isdigit():
            seen += 1
            out.append(c if seen > n_digits - 2 else "*")
        else:
            out.append(c)
    return "".join(out)


def mask_name(name: str) -> str:
    """Keep initials, not lengths: "Karen Arnold" -> "K*** A***"."""
    return " ".join(w[0] + "***" for w in name.split())


def mask_pii(text: str, names: NameFinder | Iterable[str] | None = None,
             keep: Callable[[PiiSpan], bool] | None = None) -> str:
    """`text` with every e-mail address and phone number (and the given names) masked, but the spans `keep`
    says to leave. Masked again until nothing changes: an address glued to the next one
    ("a@x.comjohn.doe@enron.com") is found as "a@x.comjohn.doe", and its mask left "john.doe@enron.com" whole
    (each pass stars the local part before one more "@", so it ends)."""
    finder = names if isinstance(names, NameFinder) or names is None else NameFinder(names)
    while (masked := _mask_once(text, finder, keep)) != text:
        text = masked
    return text


def _mask_once(text: str, finder: NameFinder | None, keep: Callable[[PiiSpan], bool] | None) -> str:
    masks = {"email": mask_email, "phone": mask_phone, "name": mask_name}
    out, pos = [], 0
    for s in find_pii(text, finder, phone_shapes=True):
        if keep is not None and keep(s):
            continue
        out.append(text[pos:s.start])
        out.append(masks[s.kind](text[s.start:s.end]))
        pos = s.end
    out.append(text[pos:])
    return "".join(out)


def mask_own_name(text: str, name: str | NameFinder) -> str:
    """`text` with one known person's name (a PII target's own, from a pairs file of your people, which no list
    masks), or every name of a NameFinder (all the targets'), masked wherever it stands, as `mask_pii` masks a
    listed name; names of one word are left, as there."""
    finder = name if isinstance(name, NameFinder) else NameFinder([name])
    for m in reversed(finder.find(text)):
        text = text[:m.start()] + mask_name(m.group(0)) + text[m.end():]
    return text


def active_names() -> NameFinder:
    """The names masked now: the shipped Enron names, and the running experiment's `report.mask_names`."""
    return _message_names or shipped_name_finder()


def mask_message(text: str) -> str:
    """A one-line message (an error, a progress line): addresses and the shipped Enron names (and those of the
    running experiment's `report.mask_names`) masked anywhere, phone numbers only inside the '...' that quote
    values. Unquoted digits there are paths, seeds and timestamps ("runs/2025061514/",
    "finetune[seed=2024061501]") that read as phone numbers, and masking them printed paths that do not exist."""
    names = active_names()
    out = re.sub(r"'[^'\n]*'", lambda m: mask_pii(m.group(0), names), text)
    masks = {"email": mask_email, "name": mask_name}
    done = None
    while done != out:  # until nothing changes, as in mask_pii (an address glued to the next one)
        done = out
        for s in reversed(find_pii(out, names, phones=False)):
            out = out[:s.start] + masks[s.kind](out[s.start:s.end]) + out[s.end:]
    return out


def mask_yaml_text(text: str, names: NameFinder | None = None) -> str:
    """`mask_pii` for an experiment file's text that leaves its numbers alone: a seed such as 2024061501 reads
    as a phone number, and masking it lost the seed from the report's copy of the file. Every string and
    comment is masked (with `names`, those names too); a text that is not YAML is masked whole."""
    import yaml

    try:
        tokens = list(yaml.scan(text))
    except yaml.YAMLError:
        return mask_pii(text, names)
    resolver = yaml.resolver.Resolver()
    numbers = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
    out, pos = [], 0
    for t in tokens:
        if (isinstance(t, yaml.ScalarToken) and t.plain
                and resolver.resolve(yaml.ScalarNode, t.value, (True, False)) in numbers):
            out += [mask_pii(text[pos:t.start_mark.index], names), text[t.start_mark.index:t.end_mark.index]]
            pos = t.end_mark.index
    out.append(mask_pii(text[pos:], names))
    return "".join(out)


def mask_labels(ids: Iterable[str], names: NameFinder | None = None, numbers: Collection[str] = ()) -> dict[str, str]:
    """Stage ids and labels (made of an experiment's step names and grid values) → masked forms that stay
    apart: each /-separated part masked, but a grid value that is one of the grid's `numbers` (`grid_numbers`:
    YAML numbers, not strings) is kept as the experiment file's copy keeps it (the seed 2024061501 is no phone
    number; a quoted "7138536161" is masked there and here), and a part that masks like an earlier one gets "~2",
    "~3" (two addresses of one domain, a***@acme.com). Masked alike, two variants became one row of the report
    and one entry of summary.json, and their comparisons compared a variant with itself."""
    parts: dict[str, str] = {}
    taken: set[str] = set()
    ids = list(dict.fromkeys(ids))
    for part in (p for i in ids for p in i.split("/")):
        if part in parts:
            continue
        first = mask_pii(part, names, keep=functools.partial(_grid_number, part, frozenset(numbers)))
        label, n = first, 1
        while label in taken:
            n += 1
            label = f"{first}~{n}"
        parts[part] = label
        taken.add(label)
    return {i: "/".join(parts[p] for p in i.split("/")) for i in ids}


def _grid_number(label: str, numbers: frozenset[str], span: PiiSpan) -> bool:
    """A "phone number" that is a grid label's number value (`seed=2024061501` in "ft[seed=2024061501,lr=1]")."""
    return (span.kind == "phone" and span.value in numbers and label[span.start - 1:span.start] == "="
            and label[span.end:span.end + 1] in (",", "]"))


def grid_numbers(experiment: Any) -> set[str]:
    """The integers of an experiment's grids (its model_dump, or run.json's `experiment`), as labels write
    them: the values `mask_labels` may keep."""
    found: set[str] = set()

    def walk(x: Any, in_grid: bool) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, in_grid or k == "grid")
        elif isinstance(x, list):
            for v in x:
                walk(v, in_grid)
        elif in_grid and isinstance(x, int) and not isinstance(x, bool):
            found.add(str(x))

    walk(experiment, False)
    return found


def mask_obj(obj: Any, names: NameFinder | Iterable[str] | None = None, *, keep: Collection[str] = (),
             labels: Mapping[str, str] | None = None) -> Any:
    """A copy of a JSON-like value with every string in it masked by `mask_pii`, dict keys included
    (stage ids and labels are keys and can hold an address). Values under a key in `keep` are copied as
    they are: e.g. a run record's stage `folder`, a path on disk the report must still open. A string that is
    one of `labels` (from `mask_labels`) becomes its masked form there."""
    finder = names if isinstance(names, NameFinder) or names is None else NameFinder(names)
    labels = labels or {}

    def mask(x: str) -> str:
        return labels[x] if x in labels else mask_pii(x, finder)

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return mask(x)
        if isinstance(x, dict):
            out: dict[Any, Any] = {}
            for k, v in x.items():
                mk = mask(k) if isinstance(k, str) else k
                while mk in out:  # two keys that mask alike stay two entries
                    mk = f"{mk}'"
                out[mk] = v if k in keep else walk(v)
            return out
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        return x

    return walk(obj)
