"""Benchmark: finding the shipped names in the shipped messages with one prefix-tree regex (NameFinder) vs
one alternation of every name form (what NameFinder compiled before 2026-12-05).

Prints both times, their ratio measured in this one run, and checks both find the same spans.
Usage: python bench/names.py [--messages 400]
"""

from __future__ import annotations

import argparse
import json
import re
import time

from leakaudit import resources
from leakaudit.data.pii_find import NameFinder, shipped_names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=400)
    args = ap.parse_args()
    texts = []
    for part in (("enron-exposure", "messages.jsonl"), ("enron-emails", "sample.jsonl"), ("enron-users", "messages.jsonl")):
        with resources.path(*part).open(encoding="utf-8") as fh:
            texts += [json.loads(line)["text"] for line in fh]
    texts = texts[:args.messages]
    finder = NameFinder(shipped_names())
    forms = sorted({*finder.names, *(f"{n.split()[-1]}, {' '.join(n.split()[:-1])}" for n in finder.names)},
                   key=lambda n: (-len(n), n))
    alternation = re.compile(r"(?<![\w@.])(?:" + "|".join(r"\s+".join(re.escape(w) for w in n.lower().split())
                                                          for n in forms) + r")(?!\w)")
    t0 = time.perf_counter()
    tree = [[(m.start(), m.end()) for m in finder.find(t)] for t in texts]
    t_tree = time.perf_counter() - t0
    t0 = time.perf_counter()
    flat = [[(m.start(), m.end()) for m in alternation.finditer(t.lower())] for t in texts]
    t_flat = time.perf_counter() - t0
    assert tree == flat, "the two patterns found different spans"
    print(f"{len(texts)} messages, {len(finder.names)} names ({len(forms)} forms), {sum(map(len, tree))} matches")
    print(f"alternation: {t_flat:.3f} s; prefix tree: {t_tree:.3f} s; ratio {t_flat / t_tree:.0f}x")


if __name__ == "__main__":
    main()
