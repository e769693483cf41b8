"""Rebuild leakaudit/resources/enron-exposure/messages.jsonl: real Enron messages that pair a person's name
with their e-mail address in the forms real Enron text has, for the 'pre-training' exposure of study 1.

Usage: python scripts/build_enron_exposure.py SOURCE/messages.jsonl [--out FILE] [--n 1200]
(SOURCE: the enron-emails conversion of jpvance123/Amdocs_ML_Email_Analytics, see the resources README).
Deterministic: the same source gives the same file.

A pair (name, address) is kept when the name is a person's name (2-4 capitalised words, no team/desk words),
some word of it (3+ letters) occurs in the address's local part, and it has one of these forms:
  header:    `X-From: Name` with the message's `From: address`;
  angle:     `Name <address>` (X-To / X-cc headers, quoted headers in the body);
  mailto:    `Name [mailto:address]` (forwarded Outlook blocks);
  signature: a line that is the X-From name, followed within 4 lines by a line holding its address
             (near the end of the body).
Each kept message is cleaned to its From, To, Subject, X-From, X-To headers and its body, cut to about 1,000
characters at a line end (further when that is needed to keep the first pair in the body whole); the pairs
are then found again in the cleaned text, so every listed pair occurs in it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from leakaudit.data.pii_find import EMAIL_RE, NAME_RE, NOT_NAMES

KEEP = ("From", "To", "Subject", "X-From", "X-To")
BODY_CHARS = 1000
BODY_MAX = 2500
HEADER_CHARS = 600  # a body pair ending past this is not worth keeping the body that long
PER_SENDER = 15  # messages per From address, so no mailbox dominates
ADDR = EMAIL_RE.pattern.replace("(?<![\\w.%+-])", "").replace("(?![\\w-])", "")
NAME = r"[A-Z][a-zA-Z'\-]*\.?(?: [A-Z][a-zA-Z'\-]*\.?){1,3}"
ANGLE_RE = re.compile(rf"(?<![\w.])\"?({NAME})\"? <({ADDR})>")
MAILTO_RE = re.compile(rf"(?<![\w.])\"?({NAME})\"? \[mailto:\s?({ADDR})\]")
RESOURCE = Path(__file__).resolve().parent.parent / "leakaudit" / "resources"


def is_name(name: str) -> bool:
    return bool(NAME_RE.match(name)) and not any(w.strip(".") in NOT_NAMES for w in name.split())


def consistent(name: str, email: str) -> bool:
    """Some word of the name (3+ letters) occurs in the address's local part: the address is that person's."""
    local = re.sub(r"[^a-z]", "", email.split("@")[0].lower())
    return any(len(w) >= 3 and w in local for w in (re.sub(r"[^a-z]", "", x.lower()) for x in name.split()))


def headers(raw: str) -> tuple[dict[str, str], str]:
    head, _, body = raw.partition("\n\n")
    out: dict[str, str] = {}
    for line in re.split(r"\n(?![ \t])", head):
        key, sep, value = line.partition(":")
        if sep and key in KEEP and key not in out:
            value = " ".join(value.split())
            cut = value.rfind(", ", 0, HEADER_CHARS)
            if len(value) > HEADER_CHARS and cut > 0:  # long recipient lists: cut between recipients
                value = value[:cut] + ", ..."
            out[key] = value
    return out, body


def find_pairs(text: str, head: dict[str, str]) -> list[dict[str, str]]:
    """The name/address pairs of a cleaned message, each with its form, first form wins per address."""
    found: dict[str, dict[str, str]] = {}

    def add(name: str, email: str, form: str) -> None:
        name, email = name.strip().strip("'\""), email.rstrip(".")
        if is_name(name) and consistent(name, email) and email.lower() not in found \
                and name in text and email in text:
            found[email.lower()] = {"name": name, "email": email, "form": form}

    sender = head.get("From", "")
    x_from = head.get("X-From", "")
    if EMAIL_RE.fullmatch(sender):
        add(x_from, sender, "header")
    for rx, form in ((MAILTO_RE, "mailto"), (ANGLE_RE, "angle")):
        for m in rx.finditer(text):
            add(m.group(1), m.group(2), form)
    body = text.partition("\n\n")[2]
    lines = body.splitlines()
    if is_name(x_from):
        for i, line in enumerate(lines):
            if x_from in line and len(line.strip()) <= len(x_from) + 20 and i >= len(lines) - 15:
                for nxt in lines[i + 1:i + 5]:
                    for email in EMAIL_RE.findall(nxt):
                        add(x_from, email, "signature")
    return list(found.values())


def clean(raw: str) -> tuple[str, dict[str, str]]:
    head, body = headers(raw)
    body = body.strip()
    cut = BODY_CHARS
    spans = [m.span() for rx in (MAILTO_RE, ANGLE_RE) for m in rx.finditer(body)]
    first_end = min((e for s, e in spans), default=None)
    if first_end is not None and first_end <= BODY_MAX:
        cut = max(cut, first_end)
    for s, e in spans:  # never cut through a pair
        if s < cut < e:
            cut = e
    if cut < len(body):
        nl = body.find("\n", cut)
        body = body[: nl if nl != -1 else len(body)].rstrip() + "\n[...]"
    text = "\n".join(f"{k}: {head[k]}" for k in KEEP if k in head) + "\n\n" + body + "\n"
    return text, head


def build(source: Path, n: int) -> tuple[list[dict], dict]:
    sample = RESOURCE / "enron-emails" / "sample.jsonl"
    shipped = {json.loads(line)["id"] for line in sample.read_text(encoding="utf-8").splitlines() if line.strip()}
    candidates = []
    for line in source.read_text(encoding="utf-8").splitlines():
        msg = json.loads(line)
        if msg["id"] in shipped:  # disjoint from the enron-sample built-in
            continue
        text, head = clean(msg["text"])
        pairs = find_pairs(text, head)
        if pairs:
            candidates.append({"id": msg["id"], "source_path": msg["source_path"], "text": text,
                               "user": head.get("From", "unknown").lower(), "pairs": pairs})
    random.Random("enron-exposure:0").shuffle(candidates)
    rows, per_sender = [], {}
    for row in candidates:
        if per_sender.get(row["user"], 0) >= PER_SENDER:
            continue
        per_sender[row["user"]] = per_sender.get(row["user"], 0) + 1
        rows.append(row)
        if len(rows) == n:
            break
    rows.sort(key=lambda r: r["id"])
    return rows, {"candidates": len(candidates)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("--out", type=Path, default=RESOURCE / "enron-exposure" / "messages.jsonl")
    ap.add_argument("--n", type=int, default=1200)
    args = ap.parse_args()
    rows, info = build(args.source, args.n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    pil = {json.loads(line)["email"].lower() for line in
           (RESOURCE / "pii-enron-pil" / "name2email.jsonl").read_text(encoding="utf-8").splitlines() if line}
    pairs = {(p["name"], p["email"].lower()) for r in rows for p in r["pairs"]}
    emails = {e for _, e in pairs}
    pil_pairs = {(json.loads(line)["name"], json.loads(line)["email"].lower()) for line in
                 (RESOURCE / "pii-enron-pil" / "name2email.jsonl").read_text(encoding="utf-8").splitlines() if line}
    rows_per_email: dict[str, int] = {}
    for r in rows:
        for e in {p["email"].lower() for p in r["pairs"]}:
            rows_per_email[e] = rows_per_email.get(e, 0) + 1
    forms: dict[str, int] = {}
    for r in rows:
        for p in r["pairs"]:
            forms[p["form"]] = forms.get(p["form"], 0) + 1
    print(json.dumps({"messages": len(rows), "candidates": info["candidates"], "distinct_pairs": len(pairs),
                      "distinct_addresses": len(emails), "addresses_in_pil_name2email": len(emails & pil),
                      "pairs_in_pil_name2email": len(pairs & pil_pairs),
                      "addresses_in_2plus_messages": sum(v >= 2 for v in rows_per_email.values()),
                      "senders": len({r["user"] for r in rows}), "pair_forms": forms,
                      "bytes": args.out.stat().st_size}, indent=1))


if __name__ == "__main__":
    main()
