"""Benchmark shared-prefix reuse (scoring and sampling) on study 1's extraction prompts, in one run.

The study's templates A-D put five demonstrations before the target's name: ~90 of a prompt's ~110-130
tokens are the same for every target. The engines run that common start once per group (scoring) or batch
(sampling) and reuse its keys and values. This script measures, on the same prompts and model:
- teacher-forced log p(address | prompt) for N targets x 4 templates (pii-logprob), with and without reuse,
  and the largest difference of the two (in fp32 they agree to ~1e-5; bf16 rounds the two paths differently);
- sampled extraction (template A, temperature 1, top-k 100, 15 new tokens), with and without reuse, and how
  many of the N sampled texts are identical.

Usage: python bench/shared_prefix.py [--targets 100] [--threads 1] [--dtype auto]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from leakaudit import sampling, scoring  # noqa: E402
from leakaudit.data.builtin import enron_exposure  # noqa: E402
from leakaudit.data.enron import resolve_templates, select_targets  # noqa: E402
from leakaudit.data.io import Record  # noqa: E402
from leakaudit.kinds.pii_logprob import draw_candidates, score_targets  # noqa: E402
from leakaudit.models import cpu_has_fast_bf16, load_model  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("default", dtype=args.dtype)
    rows = enron_exposure()
    records = [Record(id=r["id"], text=r["text"], extra=r) for r in rows]
    targets = select_targets(None, records)[:args.targets]
    templates = resolve_templates("fake-privacy")
    candidates = draw_candidates(targets, [t.email for t in targets], 1, 0)
    prompts = [templates[0].render(t, lm.tokenizer) for t in targets]
    config = sampling.SamplingConfig(max_new_tokens=15, temperature=1.0, top_k=100, seed=0)
    print(f"CPU fast bf16: {cpu_has_fast_bf16()}, dtype {lm.dtype}, {torch.get_num_threads()} thread(s), "
          f"{len(targets)} targets")

    def logprob():
        return [r["logp"] for r in score_targets(lm, targets, templates, candidates, progress=False)]

    def extraction():
        return [s.text for s in sampling.sample(lm, prompts, config, progress=False)]

    with tempfile.TemporaryDirectory() as cold:  # a cold score cache for each pass (the model is loaded)
        os.environ["LEAKAUDIT_CACHE"] = os.path.join(cold, "on")
        shared_lp, t_shared_lp = timed(logprob)
        shared_txt, t_shared_txt = timed(extraction)
        scoring.MIN_SHARED_PREFIX = sampling.MIN_SHARED_PREFIX = 1 << 30  # reuse off
        os.environ["LEAKAUDIT_CACHE"] = os.path.join(cold, "off")
        plain_lp, t_plain_lp = timed(logprob)
        plain_txt, t_plain_txt = timed(extraction)
    diff = np.abs(np.array(shared_lp) - np.array(plain_lp))
    same = sum(a == b for a, b in zip(shared_txt, plain_txt, strict=True))
    print("| run | without reuse | with reuse | speed-up |")
    print("|---|---|---|---|")
    print(f"| pii-logprob, {len(shared_lp)} prompts (4 templates) | {t_plain_lp:.1f} s | {t_shared_lp:.1f} s | "
          f"{t_plain_lp / t_shared_lp:.2f}x |")
    print(f"| extraction, {len(prompts)} prompts x 15 new tokens | {t_plain_txt:.1f} s | {t_shared_txt:.1f} s | "
          f"{t_plain_txt / t_shared_txt:.2f}x |")
    print(f"log p(address): largest |difference| {diff.max():.3g}, median {np.median(diff):.3g} nats; "
          f"sampled texts identical: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
