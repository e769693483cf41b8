"""Benchmark: one fake-privacy cell (template A, 15 new tokens, top-k 100) batched vs one prompt at a time.

Prints wall times and the speed-up ratio measured in this one run, and checks both give the same responses.
Usage: python bench/bench_pii.py [--model tiny-gpt-neox] [--n-targets 32]
"""

from __future__ import annotations

import argparse
import time

from leakaudit.attacks.pii import make_grid, run_cell
from leakaudit.data import enron
from leakaudit.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-gpt-neox")
    ap.add_argument("--n-targets", type=int, default=32)
    args = ap.parse_args()
    lm = load_model(args.model)
    targets = enron.load_targets(n_targets=args.n_targets)
    cell = make_grid([enron.TEMPLATES["A"]], [1.0])[0]
    run_cell(lm, cell, targets[:2], progress=False)  # warm-up
    times, outs = {}, {}
    for label, bs in (("batched (auto)", "auto"), ("one at a time", 1)):
        t0 = time.perf_counter()
        outs[label] = run_cell(lm, cell, targets, batch_size=bs, progress=False)
        times[label] = time.perf_counter() - t0
    same = [x["response"] for x in outs["batched (auto)"].extractions] == \
        [x["response"] for x in outs["one at a time"].extractions]
    print(f"model={args.model} dtype={lm.dtype} targets={len(targets)} cell=A t=1 top_k=100 new_tokens=15")
    for label, t in times.items():
        print(f"  {label:15s} {t:7.2f} s  ({len(targets) / t:6.2f} prompts/s)")
    print(f"  speed-up batched / one-at-a-time: {times['one at a time'] / times['batched (auto)']:.1f}x; "
          f"identical responses: {same}")


if __name__ == "__main__":
    main()
