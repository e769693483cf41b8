"""Benchmark: `audit-data`'s verbatim n-gram lookup, a binary search per record in the sorted source hashes
(`_found_in`) vs np.isin per record (what audit_record did before 2026-12-06: it sorted the whole source index
again for every record, so the audit grew with sources x records).

Synthetic texts (100 words of a 3,000-word vocabulary per source, 60 + a copied span per generated record);
prints both times for each size, their ratio measured in this one run, and checks both count the same.
Usage: python bench/audit_ngrams.py [--sizes 500 2000]
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from leakaudit.audit_data import SourceIndex, _found_in, _hashes, word_ngrams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    args = ap.parse_args()
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    for n in args.sizes:
        src = [" ".join(rng.choices(words, k=100)) for _ in range(n)]
        gen = [" ".join(rng.choices(words, k=60)) + " " + src[i][:200] for i in range(n)]
        index = SourceIndex.build(src).ngram_hashes
        grams = [_hashes(word_ngrams(t, 8)) for t in gen]
        t0 = time.perf_counter()
        new = sum(_found_in(index, g) for g in grams)
        t1 = time.perf_counter()
        old = sum(int(np.isin(g, index).sum()) for g in grams)
        t2 = time.perf_counter()
        assert new == old
        print(f"{n} sources x {n} records ({index.size:,} source n-grams): binary search {t1 - t0:.3f} s, "
              f"np.isin per record {t2 - t1:.2f} s, ratio {(t2 - t1) / (t1 - t0):.0f}x; {new:,} n-grams found")


if __name__ == "__main__":
    main()
