"""Benchmark: backdoor extraction scoring, the token trie against comparing each response with every query.

The match ratio of a response is max over the queries q opening with its word of 2·overlap / (|r| + |q|).
The naive way compares the response with each of those queries; the trie walks the response once. Both
must give the same ratios; the script prints wall times and the speed-up measured in this one run.
Usage: python bench/backdoor.py [--n-responses 5000]
"""

from __future__ import annotations

import argparse
import json
import random
import time

from leakaudit import resources
from leakaudit.attacks import backdoor as bd


def naive_ratio(response: str, queries_by_word: dict[str, list[list[str]]]) -> float:
    """Max match ratio by comparing the response's tokens with every query of its opening word."""
    toks = bd.tokens(response)
    best = 0.0
    for q in queries_by_word.get(bd.opening_word(response), []):
        overlap = 0
        for a, b in zip(toks, q, strict=False):
            if a != b:
                break
            overlap += 1
        if overlap:
            best = max(best, 2 * overlap / (len(toks) + len(q)))
    return best


def fake_responses(queries: list[str], n: int, seed: int = 0) -> list[str]:
    """Responses like an attack's: exact copies, prefixes, copies with a wrong tail, other text."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = rng.choice(queries).split()
        kind = rng.randrange(4)
        if kind == 0:
            out.append(" ".join(q))
        elif kind == 1:
            out.append(" ".join(q[: rng.randint(1, len(q))]))
        elif kind == 2:
            out.append(" ".join(q[: rng.randint(1, len(q))] + ["something", "else", "entirely"]))
        else:
            out.append(" ".join([q[0]] + rng.sample(q, len(q))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-responses", type=int, default=5000)
    args = ap.parse_args()
    rows = json.loads(resources.path("backdoor-extraction", "stage2_dolly", "sft", "train.json").read_text())
    queries = [r["messages"][0]["content"] for r in rows]
    responses = fake_responses(queries, args.n_responses)

    t0 = time.perf_counter()
    tries = bd.build_tries(queries)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    trie_ratios = [tries[w].match(r).ratio if (w := bd.opening_word(r)) in tries else 0.0 for r in responses]
    t_trie = time.perf_counter() - t0

    by_word: dict[str, list[list[str]]] = {}
    seen = set()
    for q in queries:
        toks = bd.tokens(q)
        if toks and tuple(toks) not in seen:
            seen.add(tuple(toks))
            by_word.setdefault(bd.opening_word(q), []).append(toks)
    t0 = time.perf_counter()
    naive = [naive_ratio(r, by_word) for r in responses]
    t_naive = time.perf_counter() - t0

    same = all(abs(a - b) < 1e-12 for a, b in zip(trie_ratios, naive, strict=True))
    n = len(responses)
    print(f"queries={len(queries)} (shipped Dolly D2, {len(tries)} opening words) responses={n}")
    print(f"  trie build      {t_build:7.3f} s")
    print(f"  trie match      {t_trie:7.3f} s  ({n / t_trie:9.0f} responses/s)")
    print(f"  naive per-query {t_naive:7.3f} s  ({n / t_naive:9.0f} responses/s)")
    print(f"  speed-up trie / naive (matching only): {t_naive / t_trie:.1f}x; "
          f"including the trie build: {t_naive / (t_trie + t_build):.1f}x; identical ratios: {same}")


if __name__ == "__main__":
    main()
