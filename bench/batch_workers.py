"""Batch workers on a CPU: one batch at a time on all torch threads against two batches at once, one thread
each (leakaudit.scoring.CPU_BATCH_WORKERS), alternating in one process, on the same texts and batches.

Also measured in the same run: the bf16 matmul peak as one matmul on all threads and as one matmul per thread
at once (the engine with workers runs like the second), and the largest difference in per-token log p and in
the Min-K%++ moments between the two ways (they run the same batches, so only thread-count rounding differs).

Usage: python bench/batch_workers.py [--model default] [--texts 40] [--data a.jsonl,b.jsonl] [--pairs 3]
                                    [--dtypes bf16,fp32]
(--data: score the `text` field of these JSONL files instead, e.g. the demo's MIA texts, out/demo/data/P/
targets.jsonl and nonmembers.jsonl.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from score import (  # noqa: E402
    alternating_passes,
    bench_texts,
    forward_flops,
    largest_difference,
    matmul_peak,
    matmul_peak_per_thread,
)

from leakaudit import scoring  # noqa: E402
from leakaudit.models import cpu_has_fast_bf16, load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--texts", type=int, default=40)
    ap.add_argument("--data", default=None, help="comma-separated JSONL files whose `text` fields to score")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--dtypes", default="bf16,fp32")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    if args.data:
        texts = [json.loads(line)["text"] for path in args.data.split(",") for line in open(path) if line.strip()]
    else:
        texts = bench_texts(args.texts)
    report = {"cpu_fast_bf16": cpu_has_fast_bf16(), "threads": threads, "texts": len(texts), "runs": []}
    for dname in args.dtypes.split(","):
        lm = load_model(args.model, dtype=dname)
        n_tok = [len(lm.tokenizer(t)["input_ids"]) for t in texts]
        flops = forward_flops(lm.model, n_tok)
        report["tokens"] = sum(n_tok)
        dtype = torch.bfloat16 if dname == "bf16" else torch.float32
        report[f"peak_gflops_{dname}"] = {"one_matmul_all_threads": matmul_peak(dtype, lm.device),
                                          "one_matmul_per_thread": matmul_peak_per_thread(dtype, threads)}
        scoring.score_texts(lm, texts[:4], cache=False, progress=False)  # warm-up
        for moments in (False, True):
            settings = {n: partial(setattr, scoring, "CPU_BATCH_WORKERS", n) for n in (1, 2)}
            times, results = alternating_passes(lm, texts, moments, settings, args.pairs)
            one, two = statistics.median(times[1]), statistics.median(times[2])
            run = {"dtype": dname, "moments": moments, "seconds_1_worker": times[1], "seconds_2_workers": times[2],
                   "tokens_per_s_1_worker": report["tokens"] / one, "tokens_per_s_2_workers": report["tokens"] / two,
                   "speedup": one / two, "gflops_2_workers": flops / two / 1e9,
                   "max_diff_logp": largest_difference(results[1], results[2], "logp")}
            if moments:
                run["max_diff_mu"] = largest_difference(results[1], results[2], "mu")
                run["max_diff_var"] = largest_difference(results[1], results[2], "var")
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
    scoring.CPU_BATCH_WORKERS = 2
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
