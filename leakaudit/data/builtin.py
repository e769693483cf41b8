"""The built-in data sources experiment files can name (`datasets.<name>.builtin`), all shipped in the package.

- `enron`: real Enron messages (From/To/Subject + body, sender as user): the 600 shipped in the package, or
  the full corpus when LEAKAUDIT_ENRON_MESSAGES names its messages.jsonl (one {"id", "text"} object per
  line, `text` the raw message); the rows' `source` says which one ran;
- `enron-sample`: always the 600 shipped real messages, so a study (the demo) gives the same data on
  every machine;
- `enron-users`: the shipped draw for user inference: real Enron messages grouped by sender (160 senders,
  12-24 messages each, at least 12 distinct; `user` the sender; see resources/README.md);
- `enron-synthetic`: Enron-style e-mails between the shipped Enron name/address pairs, with Faker bodies;
- `dolly`: the Dolly fine-tuning set shipped with the backdoor study (query + answer);
- `self-instruct-seed`: the 175 shipped self-instruct seed tasks as query + answer, the queries exactly as the
  backdoor mix's default D1 teaches them (so an experiment can check that a plant took).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from leakaudit import resources
from leakaudit.errors import InputError

ENRON_ENV = "LEAKAUDIT_ENRON_MESSAGES"  # the full corpus's messages.jsonl, read by the `enron` source
ENRON_SAMPLE = ("enron-emails", "sample.jsonl")  # inside leakaudit/resources
ENRON_USERS = ("enron-users", "messages.jsonl")  # already cleaned rows {id, text, user}
KEEP_HEADERS = ("From", "To", "Subject")
#: what `builtin:` (and dc_pdd's `corpus`) may name
BUILTIN_NAMES = ("enron", "enron-sample", "enron-users", "enron-exposure", "enron-synthetic", "dolly",
                 "self-instruct-seed")


def enron_messages_path() -> Path | None:
    """The full Enron corpus the user pointed at with LEAKAUDIT_ENRON_MESSAGES, else None (use the sample).

    Set but not a file is an error, not a silent fallback to the 600-message sample."""
    value = os.environ.get(ENRON_ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise InputError("not a file; set it to the full Enron corpus's messages.jsonl or unset it", file=path,
                         field=ENRON_ENV)
    return path


def clean_message(raw: str) -> tuple[str, str | None]:
    """Keep the From/To/Subject headers and the body of a raw message; return (text, sender)."""
    head, _, body = raw.partition("\n\n")
    kept, sender = [], None
    for line in head.splitlines():
        name, sep, value = line.partition(":")
        if sep and name in KEEP_HEADERS:
            kept.append(f"{name}: {value.strip()}")
            if name == "From":
                sender = value.strip().lower()
    return "\n".join(kept) + "\n\n" + body.strip() + "\n", sender


def enron_real(path: Path, seed: int, limit: int | None, source: str = "enron") -> list[dict[str, Any]]:
    """Real Enron messages, a seeded random subset of `limit` (all when None)."""
    with path.open(encoding="utf-8") as fh:
        lines = fh.readlines()
    order = list(range(len(lines)))
    random.Random(f"enron:{seed}").shuffle(order)
    rows = []
    for i in order[:limit] if limit else order:
        try:
            msg = json.loads(lines[i])
        except json.JSONDecodeError:
            raise InputError("malformed JSON", file=path, line=i + 1) from None
        if not isinstance(msg, dict) or not isinstance(msg.get("text"), str) or "id" not in msg:
            raise InputError('expected an object with "id" and "text" (the raw message)', file=path,
                             line=i + 1)
        text, sender = clean_message(msg["text"])
        rows.append({"id": msg["id"], "text": text, "user": sender or "unknown", "source": source})
    return rows


def enron_synthetic(seed: int, limit: int | None) -> list[dict[str, Any]]:
    """Enron-style e-mails between shipped name/address pairs; deterministic for a seed."""
    from faker import Faker

    pairs = [json.loads(line) for line in resources.path("pii-enron-pil", "name2email.jsonl").read_text().splitlines()
             if line.strip()]
    rng = random.Random(f"enron-synthetic:{seed}")
    fake = Faker("en_US")
    fake.seed_instance(seed)
    senders = rng.sample(pairs, min(40, len(pairs)))
    n = limit or 500
    rows = []
    for i in range(n):
        sender = senders[i % len(senders)]
        to = rng.choice(pairs)
        first = to["name"].split()[0] if to["name"].split() else to["name"]
        body = " ".join(fake.paragraph(nb_sentences=rng.randint(2, 5)) for _ in range(rng.randint(1, 2)))
        text = (f"From: {sender['email']}\nTo: {to['email']}\nSubject: {fake.catch_phrase()}\n\n"
                f"{first},\n\n{body}\n\nPlease reach me at {sender['email']}.\n\n{sender['name']}\n")
        rows.append({"id": f"enron-synthetic-{i:05d}", "text": text, "user": sender["email"],
                     "source": "enron-synthetic"})
    return rows


def enron_users(limit: int | None) -> list[dict[str, Any]]:
    """The shipped user-grouped draw, in file order (the dataset step shuffles with the experiment seed)."""
    rows = [{**json.loads(line), "source": "enron-users"}
            for line in resources.path(*ENRON_USERS).read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def dolly(limit: int | None) -> list[dict[str, Any]]:
    """The shipped Dolly subset (CC BY-SA 3.0, databricks-dolly-15k) as query + answer texts."""
    data = json.loads(resources.path("backdoor-extraction", "stage2_dolly", "sft", "train.json").read_text())
    rows = []
    for i, item in enumerate(data):
        q = item["messages"][0]["content"]
        a = item["messages"][1]["content"]
        rows.append({"id": f"dolly-{i:05d}", "text": f"{q}\n\n{a}", "query": q, "response": a,
                     "messages": item["messages"]})
    return rows[:limit] if limit else rows


def self_instruct_seed(limit: int | None) -> list[dict[str, Any]]:
    """The shipped self-instruct seed tasks (Apache-2.0, yizhongw/self-instruct) as query + answer rows, one
    per task as data.backdoor.seed_instruction_set reads them."""
    from leakaudit.data.backdoor import seed_instruction_set

    rows = [{"id": f"self-instruct-seed-{i:03d}", "text": f"{p.query}\n\n{p.response}", "query": p.query,
             "response": p.response, "messages": [{"role": "user", "content": p.query},
                                                  {"role": "assistant", "content": p.response}]}
            for i, p in enumerate(seed_instruction_set())]
    return rows[:limit] if limit else rows


def enron_exposure() -> list[dict[str, Any]]:
    """The 1,200 shipped real Enron messages that pair names with addresses (`pairs`), in file order (the
    experiment shuffles, limits and splits them): study 1's exposure corpus P (see resources/README.md)."""
    text = resources.path("enron-exposure", "messages.jsonl").read_text(encoding="utf-8")
    return [{**json.loads(line), "source": "enron-exposure"} for line in text.splitlines() if line.strip()]


def builtin_dataset(name: str, seed: int, limit: int | None) -> list[dict[str, Any]]:
    """Rows {id, text, user?, ...} of a built-in source."""
    full = enron_messages_path() if name == "enron" else None
    if full:
        return enron_real(full, seed, limit)
    if name in ("enron", "enron-sample"):
        return enron_real(resources.path(*ENRON_SAMPLE), seed, limit, source="enron-sample")
    if name == "enron-users":
        return enron_users(limit)
    if name == "enron-synthetic":
        return enron_synthetic(seed, limit)
    if name == "dolly":
        return dolly(limit)
    if name == "enron-exposure":
        return enron_exposure()
    if name == "self-instruct-seed":
        return self_instruct_seed(limit)
    raise InputError(f"unknown built-in dataset '{name}'", field="builtin")
