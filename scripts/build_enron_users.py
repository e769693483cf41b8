"""Rebuild leakaudit/resources/enron-users/messages.jsonl: a user-grouped draw of real Enron messages.

Why shipped: the user-inference study needs many senders with several messages each, identical on every
machine; the product never reads the development layout, so the draw is copied into the package once.

Usage: python scripts/build_enron_users.py SOURCE_MESSAGES_JSONL [OUT_JSONL]
SOURCE is the 17,787-row `messages.jsonl` ({"id","source_path","text"}, raw messages) described in
leakaudit/resources/README.md. The draw is deterministic (seeded; no dependence on the machine).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

from leakaudit.data.builtin import clean_message

SEED = "enron-users:0"
USERS = 160  # senders drawn
MIN_PER_USER = 12  # senders with fewer distinct (cleaned, truncated) messages are not eligible
MAX_PER_USER = 24  # a sender with more keeps a seeded choice of this many (so senders contribute 12..24)
BODY_CHARS = 500  # body truncated (CPU budget of the study)
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "leakaudit" / "resources" / "enron-users" / "messages.jsonl"


def draw(source: Path) -> list[dict[str, str]]:
    """Rows {id, text, user}: cleaned (From/To/Subject + body), body truncated, grouped by sender."""
    by_user: dict[str, list[dict[str, str]]] = defaultdict(list)
    with source.open(encoding="utf-8") as fh:
        for line in fh:
            msg = json.loads(line)
            text, sender = clean_message(msg["text"])
            head, _, body = text.partition("\n\n")
            body = body.strip()
            if not sender or not body:
                continue
            by_user[sender].append({"id": msg["id"], "text": f"{head}\n\n{body[:BODY_CHARS].rstrip()}\n",
                                    "user": sender})
    kept = {}  # each sender's seeded choice of at most MAX_PER_USER messages, in source order
    for user, mine in sorted(by_user.items()):
        pick = random.Random(f"{SEED}:{user}").sample(range(len(mine)), min(MAX_PER_USER, len(mine)))
        kept[user] = [mine[i] for i in sorted(pick)]
    # eligible: at least MIN_PER_USER distinct texts among the kept ones (duplicates stay in the rows, but a
    # held-out attacker sample must be a text the user's training part does not also hold)
    eligible = sorted(u for u, rows in kept.items() if len({r["text"] for r in rows}) >= MIN_PER_USER)
    rows = []
    for user in sorted(random.Random(SEED).sample(eligible, min(USERS, len(eligible)))):
        rows.extend(kept[user])
    return rows


def stats(rows: list[dict[str, str]]) -> dict[str, object]:
    """The counts the resources README records."""
    per_user = Counter(r["user"] for r in rows)
    texts = Counter((r["user"], r["text"]) for r in rows)
    counts = sorted(per_user.values())
    return {"users": len(per_user), "messages": len(rows), "per_user_min": counts[0],
            "per_user_median": statistics.median(counts), "per_user_max": counts[-1],
            "users_at_max": sum(1 for c in counts if c == MAX_PER_USER),
            "users_at_min": sum(1 for c in counts if c == MIN_PER_USER),
            "distinct_per_user_min": min(len({t for (u, t) in texts if u == user}) for user in per_user),
            "within_user_duplicate_rows": sum(n - 1 for n in texts.values() if n > 1),
            "users_with_duplicates": len({u for (u, _), n in texts.items() if n > 1})}


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 3):
        sys.exit(__doc__)
    out = Path(argv[2]) if len(argv) == 3 else DEFAULT_OUT
    rows = draw(Path(argv[1]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(json.dumps({**stats(rows), "bytes": out.stat().st_size}))


if __name__ == "__main__":
    main(sys.argv)
