"""What torch.compile would buy the scoring engine, and what it costs: eager passes against compiled ones, in
one run, with the compile time of the first compiled pass stated (why the engine does not compile).

The engine (`score_texts`, cache off, dtype `auto`) scores the same texts twice eagerly, then with the model's
forward wrapped in `torch.compile(dynamic=True)` (inductor) once to compile and twice more; the compiled
pass's log p must agree with the eager one. The inductor cache lives in TORCHINDUCTOR_CACHE_DIR (default
/tmp/torchinductor_$USER): empty it to measure a cold compile.

    .venv/bin/python bench/compile.py [--model default] [--texts 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from peers import cpu_kind  # noqa: E402
from score import bench_texts  # noqa: E402

from leakaudit.models import load_model  # noqa: E402
from leakaudit.scoring import score_texts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--texts", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    texts = bench_texts(args.texts)
    tokens = sum(len(lm.tokenizer(t)["input_ids"]) for t in texts)
    print(f"CPU: {cpu_kind()}\nmodel={args.model} dtype={lm.dtype} threads={args.threads} texts={len(texts)} "
          f"tokens={tokens}")

    def timed(label: str):
        t = time.perf_counter()
        scores = score_texts(lm, texts, cache=False, progress=False)
        dt = time.perf_counter() - t
        print(f"{label:<26} {dt:7.2f} s  {tokens / dt:7.0f} tok/s", flush=True)
        return scores, dt

    eager, _ = timed("eager")
    _, t_eager = timed("eager again")
    lm.model.forward = torch.compile(lm.model.forward, dynamic=True)
    _, t_first = timed("compiled, first (compiles)")
    times = [timed("compiled")[1] for _ in range(2)]
    compiled = score_texts(lm, texts, cache=False, progress=False)
    diff = max(float(np.abs(a.logp - b.logp).max()) for a, b in zip(eager, compiled, strict=True))
    best = min(times)
    saved = (t_eager - best) / tokens
    print(f"compiled / eager: {t_eager / best:.2f}x once compiled; the first compiled pass cost {t_first:.0f} s; "
          f"break-even after ~{(t_first - best) / saved:,.0f} tokens" if saved > 0 else "compiled is not faster")
    print(f"max |log p eager - compiled| = {diff:.2e}")


if __name__ == "__main__":
    main()
