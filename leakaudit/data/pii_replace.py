"""Replace names, e-mail addresses and phone numbers with consistent fake ones (the "replaced data" variant).

Why consistent: a model trained on replaced data should still see the *structure* of the original
(the same person writing many e-mails), only not the real values. So one real value always maps to the
same fake value across a whole file: the fake is drawn by Faker seeded with (seed, kind, real value),
which also makes the mapping independent of row order and stable across files for a given seed.
Fakes never collide with each other or with a real value seen so far. Phones keep their layout and use
the fictional 555 exchange, with an area code in service, so the shared detector (pii_find) finds them
as it found the real ones. The originals are never logged: callers get counts only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from faker import Faker

from leakaudit.data.pii_find import (
    PHONE_REGION,
    NameFinder,
    find_pii,
    is_phone,
    name_key,
    names_from_headers,
    phone_digits,
)
from leakaudit.errors import InputError

KINDS = ("email", "name", "phone")
# Mailbox metadata that names its owner in forms no detector reads: "X-Origin: Allen-P",
# "X-FileName: pallen.nsf", "X-Folder: \\Phillip_Allen_Dec2000\\...", and Exchange ids
# ("</O=ENRON/OU=NA/CN=RECIPIENTS/CN=PALLEN>"). Their values are replaced whole, as names.
_MAILBOX_HEADER = re.compile(r"^(X-Origin|X-FileName|X-Folder):[ \t]*(\S[^\n]*)$", re.MULTILINE | re.IGNORECASE)
_EXCHANGE_CN = re.compile(r"(?<=/CN=)(?!RECIPIENTS\b)[A-Za-z0-9._'-]+", re.IGNORECASE)


class PiiReplacer:
    """Maps real PII to fake PII, consistently for the lifetime of the object (one file)."""

    def __init__(self, names: Iterable[str] = (), seed: int = 0, locale: str = "en_US"):
        self.names = NameFinder(names)
        self.seed = seed
        self._faker = Faker(locale)
        self._map: dict[tuple[str, str], str] = {}
        self._used: set[str] = {n.lower() for n in self.names.names}
        self.counts: Counter[str] = Counter()

    def add_names(self, names: Iterable[str]) -> None:
        """Add more names to detect (e.g. names found in the headers of the whole file)."""
        self.names = NameFinder([*self.names.names, *names])
        self._used.update(n.lower() for n in self.names.names)

    def reserve(self, texts: Iterable[str]) -> None:
        """Never draw a fake equal to a real value of these texts (a fake address that is another real one in
        the same file would merge two people and leave a real address standing)."""
        for text in texts:
            for span in find_pii(text):
                self._used.add(phone_digits(span.value) if span.kind == "phone" else span.value.lower())
            self._used.update(m.group(0).lower() for m in _EXCHANGE_CN.finditer(text))

    def replace(self, text: str) -> tuple[str, Counter[str]]:
        """`text` with every detected e-mail, phone and name replaced; returns it with per-kind counts."""
        counts: Counter[str] = Counter()
        text = self._replace_mailbox_ids(text, counts)
        out, pos = [], 0
        for span in find_pii(text, self.names):
            out.append(text[pos:span.start])
            out.append(self.fake(span.kind, text[span.start:span.end]))
            counts[span.kind] += 1
            pos = span.end
        out.append(text[pos:])
        self.counts.update(counts)
        return "".join(out), counts

    def _replace_mailbox_ids(self, text: str, counts: Counter[str]) -> str:
        """Mailbox headers' values and Exchange ids replaced by fakes of the same value (counted as names)."""
        def header(m: re.Match) -> str:
            counts["name"] += 1
            return f"{m.group(1)}: {self.fake('name', m.group(2).strip())}"

        def exchange_id(m: re.Match) -> str:
            counts["name"] += 1
            return self.fake("exchange_id", m.group(0))

        return _EXCHANGE_CN.sub(exchange_id, _MAILBOX_HEADER.sub(header, text))

    @property
    def n_distinct(self) -> dict[str, int]:
        """How many distinct real values of each kind have been replaced so far."""
        c = Counter("name" if kind == "exchange_id" else kind for kind, _ in self._map)  # ids name people
        return {k: c.get(k, 0) for k in KINDS}

    def fake(self, kind: str, real: str) -> str:
        """The fake value standing for `real` (the same one every time)."""
        key = (kind, self._normal(kind, real))
        if key not in self._map:
            self._map[key] = self._draw(kind, key[1])
        fake = self._map[key]
        if kind == "phone":
            return _with_layout(real, fake)
        if kind == "name" and "," in real:  # "Last, First" stays in that order
            *rest, last = fake.split()
            return f"{last}, {' '.join(rest)}"
        return fake

    @staticmethod
    def _normal(kind: str, real: str) -> str:
        if kind in ("email", "exchange_id"):
            return real.lower()
        if kind == "phone":
            return phone_digits(real)
        return name_key(real)  # "ZED QUINLAN" and "Quinlan, Zed" are "Zed Quinlan"

    def _draw(self, kind: str, real: str) -> str:
        # Seeded and public by default, so a run reproduces anywhere; that also means whoever holds a list of
        # candidate real values can recompute their fakes. A secret in LEAKAUDIT_PII_KEY keys the draw instead.
        secret = os.environ.get("LEAKAUDIT_PII_KEY", "").encode()
        for attempt in range(1000):
            message = f"{self.seed}\x1f{kind}\x1f{real}\x1f{attempt}".encode()
            digest = hmac.new(secret, message, "sha256").digest() if secret else hashlib.sha256(message).digest()
            self._faker.seed_instance(int.from_bytes(digest[:8], "little"))
            fake = self._make(kind, real)
            if fake.lower() not in self._used and fake.lower() != real.lower() and (kind != "phone" or is_phone(fake)):
                self._used.add(fake.lower())
                return fake
        raise RuntimeError(f"could not draw a fresh fake {kind}")  # pragma: no cover - 1000 collisions

    def _make(self, kind: str, real: str) -> str:
        f = self._faker
        if kind == "email":
            domain = f.free_email_domain() if f.boolean() else f.domain_name()
            return f"{f.first_name().lower()}.{f.last_name().lower()}{f.random_int(1, 99)}@{domain}"
        if kind == "phone":
            return f"{f.random_int(201, 989)}555{f.random_int(0, 9999):04d}"
        if kind == "exchange_id":  # "/CN=KLARNOLD": an initial and a last name, like Exchange's own ids
            return (f.first_name()[0] + f.last_name()).upper()
        n_words = len(real.split())
        middle = [f"{f.random_uppercase_letter()}." if n_words == 3 else f.first_name()
                  for _ in range(max(0, n_words - 2))]
        return " ".join([f.first_name(), *middle, f.last_name()])


#: a row's chat copy of its text (a backdoor mix's rows, a chat data set's): replaced beside the text fields, else
#: a fine-tune with format chat trained on the raw PII of a "PII-replaced" copy
CHAT_FIELD = "messages"


def replace_pii_file(path: str | Path, fields: Sequence[str] = ("text",), *, names: Iterable[str] | None = None,
                     header_names: bool = True, seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of a data file with PII replaced in `fields` (every other field kept), each with its
    `pii_replaced` counts and `provenance` (source row id, fields, name list, seed), and a summary
    {rows, replaced, distinct} (counts only, never a value).

    `names`: the names to detect (default: the shipped Enron names); with `header_names`, the people named
    in the e-mail headers anywhere in the file are added first, so a name is replaced in every row
    once it heads any of them. What `generate replace-pii` and the experiment's replace-pii step run.
    """
    from leakaudit.data.chat import validate_messages
    from leakaudit.data.io import default_id, read_rows
    from leakaudit.data.pii_find import shipped_names

    rows = read_rows(path)
    chats: dict[int, list[dict[str, str]]] = {}  # row index -> its checked `messages`, replaced beside the fields
    for index, (lineno, row) in enumerate(rows, start=1):
        for f in fields:
            if not isinstance(row.get(f), str):
                raise InputError("missing or not a string", file=path, line=lineno, field=f)
        if CHAT_FIELD not in fields and CHAT_FIELD in row:  # a chat copy of the row's text: a fine-tune with
            chats[index] = validate_messages(row[CHAT_FIELD], path, lineno, CHAT_FIELD)  # format chat reads it
    replacer = PiiReplacer(shipped_names() if names is None else names, seed=seed)
    if header_names:
        replacer.add_names(n for _, row in rows for f in fields for n in names_from_headers(row[f]))
    replacer.reserve([*(row[f] for _, row in rows for f in fields),
                      *(m["content"] for chat in chats.values() for m in chat)])
    out = []
    for index, (lineno, row) in enumerate(rows, start=1):
        new = dict(row)
        counts: Counter[str] = Counter()
        for f in fields:
            new[f], c = replacer.replace(row[f])
            counts.update(c)
        if index in chats:  # the same fakes as the text's: one replacer for the whole file
            new[CHAT_FIELD] = []
            for m in chats[index]:
                content, c = replacer.replace(m["content"])
                new[CHAT_FIELD].append({**m, "content": content})
                counts.update(c)
        new["pii_replaced"] = {k: counts.get(k, 0) for k in KINDS}
        # where the row came from and how it was made, as the generators' rows say it (no PII: counts only)
        new["provenance"] = {"method": "replace-pii", "source_id": str(row.get("id", default_id(Path(path), index, lineno))),
                             "fields": [*fields, *([CHAT_FIELD] if index in chats else [])],
                             "names": "shipped" if names is None else "given",
                             "header_names": header_names, "seed": seed,
                             **({"from": row["provenance"]} if "provenance" in row else {})}  # a generator's kept
        out.append(new)
    summary = {"rows": len(out), "replaced": {k: replacer.counts.get(k, 0) for k in KINDS},
               "distinct": replacer.n_distinct}
    return out, summary


def _with_layout(original: str, digits10: str) -> str:
    """Write the fake 10 digits in the original's layout ("(713) 853-1234" -> "(415) 555-0199"): a written
    country code (+44, 011 44, a leading 1) is kept, the fake fills the number, and an extension's digits
    ("ext. 55") follow from the fake's again, so the 555 exchange stays in place whatever comes around it."""
    import phonenumbers

    digits = re.sub(r"\D", "", original)
    keep = ""
    stripped = original.lstrip()
    try:
        cc = str(phonenumbers.parse(original, PHONE_REGION).country_code)
    except phonenumbers.NumberParseException:
        cc = ""
    if stripped.startswith("+") and digits.startswith(cc):
        keep = cc
    elif stripped.startswith("011") and digits.startswith("011" + cc):
        keep = "011" + cc
    elif cc == "1" and len(digits) >= 11 and digits.startswith("1"):
        keep = "1"
    rest = len(digits) - len(keep)
    fill = iter(keep + (digits10 * (rest // 10 + 1))[:rest])
    return re.sub(r"\d", lambda _: next(fill), original)
