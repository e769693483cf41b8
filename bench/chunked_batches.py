"""Benchmark the scoring pass's chunked batching (texts in chunks of about CHUNK_BATCHES batches, longest
first) against one length sort over every window (what it replaced), in one run, on the same model and texts.

Why chunks: a text is stored in the score cache once all its windows are scored, and one sort over every
window put each long text's shorter last window after all the full ones, so a killed pass had stored almost
none of its long texts. What the chunks may cost: a chunk border can leave a short batch, and a sort within
a chunk pairs fewer equal lengths (more padding). This script measures, for both plans:
- the plan: batches, real and padded tokens (padding / real), and the share of texts finished after 50% and
  80% of the batches (what a pass killed there keeps);
- the scoring time of one pass (score cache off), alternating the two plans twice (ABAB) so drift on the host
  falls on both; and the largest difference of the per-token log p between them (batches differ, so bf16
  rounds differently; in fp32 they agree to ~1e-5).

Usage: python bench/chunked_batches.py [--texts 240] [--max-length 128] [--chunk-batches N] [--threads 1]
       [--dtype auto]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from peers import cpu_kind  # noqa: E402

from leakaudit import scoring  # noqa: E402
from leakaudit.data.builtin import enron_exposure  # noqa: E402
from leakaudit.models import load_model  # noqa: E402

ONE_SORT = 1 << 40  # CHUNK_BATCHES so large that every window is in one chunk: the plan before chunking


def plan_stats(batches: list[list]) -> dict[str, float]:
    """Batches, padding and the texts finished part-way through a plan, from the batches scoring made."""
    windows: dict[int, int] = {}
    for batch in batches:
        for s in batch:
            windows[s.text_index] = windows.get(s.text_index, 0) + 1
    real = sum(len(s.ids) for b in batches for s in b)
    padded = sum(len(b) * max(len(s.ids) for s in b) for b in batches)
    finished_at, left = {}, dict(windows)
    for k, batch in enumerate(batches, start=1):
        for s in batch:
            left[s.text_index] -= 1
            if left[s.text_index] == 0:
                finished_at[s.text_index] = k
    share = {f: sum(1 for k in finished_at.values() if k <= f * len(batches)) / len(windows) for f in (0.5, 0.8)}
    return {"batches": len(batches), "windows": sum(windows.values()), "padding": (padded - real) / real,
            "finished_50": share[0.5], "finished_80": share[0.8]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=240)
    ap.add_argument("--max-length", type=int, default=128, help="a window shorter than most messages: "
                    "long texts become several windows, as long texts do at a model's full context")
    ap.add_argument("--chunk-batches", type=int, default=None, help="batches per chunk (default the engine's "
                    "CHUNK_BATCHES); fewer puts more chunk borders in a pass of a few minutes, an upper bound on "
                    "what the borders cost a long pass")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("default", dtype=args.dtype)
    texts = [r["text"] for r in enron_exposure()][:args.texts]
    chunked = args.chunk_batches or scoring.CHUNK_BATCHES
    print(f"CPU: {cpu_kind()}; dtype {lm.dtype}; {torch.get_num_threads()} thread(s); {len(texts)} Enron "
          f"messages, window {args.max_length}, chunks of {chunked} batches (the engine's: {scoring.CHUNK_BATCHES})")
    made: list[list] = []
    plan = scoring._batches

    def recorded(*a, **kw):  # the batches the pass makes (every shared-prefix group's, in plan order)
        out = plan(*a, **kw)
        made.extend(out)
        return out

    # a warm-up pass, untimed: the first pass of a process pays for allocations and kernel choices (two plans
    # that came out identical measured 90.8 s and 76.9 s when the first one ran cold)
    scoring.score_texts(lm, texts[:8], max_length=args.max_length, cache=False, progress=False)
    scoring._batches = recorded
    default_chunk = scoring.CHUNK_BATCHES
    stats, times, logps = {}, {"chunked": [], "one sort": []}, {}
    for name, chunk in (("chunked", chunked), ("one sort", ONE_SORT)) * 2:
        scoring.CHUNK_BATCHES = chunk
        made.clear()
        t0 = time.perf_counter()
        scores = scoring.score_texts(lm, texts, max_length=args.max_length, cache=False, progress=False)
        times[name].append(time.perf_counter() - t0)
        stats[name] = plan_stats(made)
        logps[name] = np.concatenate([s.logp for s in scores])
    scoring.CHUNK_BATCHES, scoring._batches = default_chunk, plan
    gaps = np.abs(logps["chunked"] - logps["one sort"])
    print("| plan | batches (windows) | padding / real tokens | texts finished at 50% / 80% of batches | "
          "pass time (two runs) |")
    print("|---|---|---|---|---|")
    for name in ("one sort", "chunked"):
        s, t = stats[name], times[name]
        print(f"| {name} | {s['batches']} ({s['windows']}) | {s['padding']:.1%} | {s['finished_50']:.0%} / "
              f"{s['finished_80']:.0%} | {t[0]:.1f} s, {t[1]:.1f} s |")
    ratio = min(times["chunked"]) / min(times["one sort"])
    print(f"chunked / one sort, best of two: {ratio:.3f}x the time; per-token |Δ log p| mean {gaps.mean():.2e}, "
          f"largest {gaps.max():.2e} (batches differ: bf16 rounds them differently)")


if __name__ == "__main__":
    main()
