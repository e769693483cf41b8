"""The laptop-scale first study (`leakaudit demo`), and the built-in data sources experiment files can name.

Built-in datasets (`datasets.<name>.builtin`):
- `enron`: real Enron messages (From/To/Subject + body, sender as user): all 17,787 of the shared data
  folder's file (`$LEAKAUDIT_SHARED_DATA/enron-emails/messages.jsonl` or `../shared/data/...` next to the
  repo) when present, else the 600 of them shipped in the package (the log says which one ran);
- `enron-sample`: always the 600 shipped real messages, so a study (the demo) gives the same data on
  every machine;
- `enron-synthetic`: Enron-style e-mails between the shipped Enron name/address pairs, with Faker bodies;
- `dolly`: the Dolly fine-tuning set shipped with the backdoor study (query + answer).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from leakaudit import resources
from leakaudit.errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_EXPERIMENT = resources.ROOT / "experiments" / "demo.yaml"  # also linked from experiments/
ENRON_MESSAGES = Path("enron-emails") / "messages.jsonl"
ENRON_SAMPLE = ("enron-emails", "sample.jsonl")  # inside leakaudit/resources
KEEP_HEADERS = ("From", "To", "Subject")


def shared_data_dirs() -> list[Path]:
    """Where the shared data folder may be: $LEAKAUDIT_SHARED_DATA, then ../shared/data beside the repo."""
    dirs = []
    if os.environ.get("LEAKAUDIT_SHARED_DATA"):
        dirs.append(Path(os.environ["LEAKAUDIT_SHARED_DATA"]))
    dirs += [REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return dirs


def enron_messages_path() -> Path | None:
    for d in shared_data_dirs():
        if (d / ENRON_MESSAGES).is_file():
            return d / ENRON_MESSAGES
    return None


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


def builtin_dataset(name: str, seed: int, limit: int | None) -> list[dict[str, Any]]:
    """Rows {id, text, user?, ...} of a built-in source."""
    full = enron_messages_path() if name == "enron" else None
    if full:
        return enron_real(full, seed, limit)
    if name in ("enron", "enron-sample"):
        return enron_real(resources.path(*ENRON_SAMPLE), seed, limit, source="enron-sample")
    if name == "enron-synthetic":
        return enron_synthetic(seed, limit)
    if name == "dolly":
        return dolly(limit)
    raise InputError(f"unknown built-in dataset '{name}'", field="builtin")


def run_demo(out: str | Path, log=print) -> dict[str, str]:
    """Run experiments/demo.yaml into `out` (resumable), writing report.html and summary.json."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import run_experiment

    if not DEMO_EXPERIMENT.is_file():
        raise InputError("the demo experiment file is missing (run from a source checkout)", file=DEMO_EXPERIMENT)
    exp = load_experiment(DEMO_EXPERIMENT)
    log(f"demo: {exp.name} on real Enron messages (the sample shipped in the package)")
    return run_experiment(exp, out, config_text=DEMO_EXPERIMENT.read_text(encoding="utf-8"), log=log)
