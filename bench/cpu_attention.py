"""The bf16 CPU attention of the scoring engine (leakaudit.models.cpu_attention: causal query blocks on bf16
matmuls) against torch's CPU flash kernel (sdpa, as transformers calls it), in one run:

1. the kernel alone on the engine's shapes (9 query heads sharing 3 key/value heads of 64, as the default
   model; rows x tokens of its batches), with 1 and 2 torch threads: ms per call and GFLOP/s (causal FLOPs,
   4 x rows x heads x tokens^2 x 64 / 2), medians of 7;
2. whole engine passes on the default model in bf16 (cache off), alternating blocks and flash in one process,
   loss only and with Min-K%++ moments, with each one's mean |log p - fp32 log p| per token.

Usage: python bench/cpu_attention.py [--texts 40] [--pairs 3] [--block 64]
Part 2 runs on torch's own thread count (taskset/OMP_NUM_THREADS); part 1 sets 1 and 2 itself.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from peers import cpu_kind  # noqa: E402
from score import alternating_passes, bench_texts  # noqa: E402

from leakaudit import scoring  # noqa: E402
from leakaudit.models import cpu_attention, load_model  # noqa: E402

SHAPES = [(32, 128), (16, 256), (8, 400), (4, 1024)]  # rows x tokens
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def median_ms(fn, calls: int = 7) -> float:
    fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def flash_attention(q, k, v, mask):
    """What transformers runs with sdpa: key/value heads repeated for their query heads (repeat_kv), then sdpa."""
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=mask)


def kernels() -> list[dict]:
    module = types.SimpleNamespace(is_causal=True)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for b, n in SHAPES:
            q = torch.randn(b, n, HEADS, HEAD_DIM, dtype=torch.bfloat16).transpose(1, 2)
            k = torch.randn(b, n, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16).transpose(1, 2)
            v = torch.randn(b, n, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16).transpose(1, 2)
            mask = torch.ones(b, 1, n, n, dtype=torch.bool).tril()  # what the engine's right-padded batches pass
            flops = 4 * b * HEADS * n * n * HEAD_DIM / 2
            f_ms = median_ms(functools.partial(flash_attention, q, k, v, mask))
            b_ms = median_ms(functools.partial(cpu_attention.blocked_attention, module, q, k, v, mask))
            row = {"threads": threads, "rows": b, "tokens": n, "flash_ms": round(f_ms, 2),
                   "blocks_ms": round(b_ms, 2), "flash_gflops": round(flops / f_ms / 1e6),
                   "blocks_gflops": round(flops / b_ms / 1e6), "speedup": round(f_ms / b_ms, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def passes(texts: list[str], threads: int, pairs: int) -> list[dict]:
    torch.set_num_threads(threads)
    ref = scoring.score_texts(load_model("default", dtype="fp32"), texts, cache=False, progress=False)
    ref_lp = np.concatenate([r.logp for r in ref])
    lm = load_model("default", dtype="bf16")
    tokens = sum(len(r.logp) + 1 for r in ref)
    blocks_ctx = scoring.scoring_attention
    settings = {"flash": lambda: setattr(scoring, "scoring_attention", lambda *a: contextlib.nullcontext()),
                "blocks": lambda: setattr(scoring, "scoring_attention", blocks_ctx)}
    scoring.score_texts(lm, texts[:4], cache=False, progress=False)  # warm-up
    runs = []
    for moments in (False, True):
        times, results = alternating_passes(lm, texts, moments, settings, pairs)
        run = {"threads": threads, "moments": moments, "tokens": tokens}
        for label in settings:
            lp = np.concatenate([r.logp for r in results[label]])
            run[f"{label}_s"] = [round(t, 2) for t in times[label]]
            run[f"{label}_tok_per_s"] = round(tokens / statistics.median(times[label]))
            run[f"{label}_mean_abs_diff_vs_fp32"] = round(float(np.abs(lp - ref_lp).mean()), 5)
        run["speedup"] = round(statistics.median(times["flash"]) / statistics.median(times["blocks"]), 3)
        runs.append(run)
        print(json.dumps(run), flush=True)
    scoring.scoring_attention = blocks_ctx
    return runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--block", type=int, default=cpu_attention.BLOCK)
    args = ap.parse_args()
    cpu_attention.BLOCK = args.block
    threads = torch.get_num_threads()
    report = {"cpu": cpu_kind(), "block": args.block, "kernels": kernels(),
              "passes": passes(bench_texts(args.texts), threads, args.pairs)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
