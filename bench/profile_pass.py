"""Where one scoring pass spends its time: torch's profiler over one engine pass (default model, shipped texts,
score cache off), the operators' self CPU time as shares of the total, largest first.

Usage: python bench/profile_pass.py [--model default] [--texts 40] [--moments] [--dtype auto] [--top 15]
Runs one batch at a time (CPU_BATCH_WORKERS = 1) so every operator runs on the profiled thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from score import bench_texts, forward_flops, matmul_peak  # noqa: E402

from leakaudit import scoring  # noqa: E402
from leakaudit.models import cpu_has_fast_bf16, load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--texts", type=int, default=40)
    ap.add_argument("--moments", action="store_true")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    scoring.CPU_BATCH_WORKERS = 1
    lm = load_model(args.model, dtype=args.dtype)
    texts = bench_texts(args.texts)
    n_tok = [len(lm.tokenizer(t)["input_ids"]) for t in texts]
    scoring.score_texts(lm, texts[:4], cache=False, progress=False)  # warm-up
    t = time.perf_counter()
    scoring.score_texts(lm, texts, moments=args.moments, cache=False, progress=False)
    seconds = time.perf_counter() - t
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        scoring.score_texts(lm, texts, moments=args.moments, cache=False, progress=False)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    peak = matmul_peak(lm.model.dtype, lm.device)
    achieved = forward_flops(lm.model, n_tok) / seconds / 1e9
    print(f"CPU fast bf16: {cpu_has_fast_bf16()}; threads {torch.get_num_threads()}; dtype {lm.model.dtype}; "
          f"{len(texts)} texts, {sum(n_tok)} tokens; moments {args.moments}")
    print(f"unprofiled pass {seconds:.2f} s = {sum(n_tok) / seconds:.0f} tok/s = {achieved:.0f} GFLOP/s, "
          f"{achieved / peak:.0%} of the {peak:.0f} GFLOP/s matmul peak in this dtype")
    print(f"profiled: {total / 1e6:.2f} s of operator self time")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"{e.self_cpu_time_total / total:6.1%}  {e.self_cpu_time_total / 1e6:7.2f} s  {e.count:6d}x  {e.key}")


if __name__ == "__main__":
    main()
