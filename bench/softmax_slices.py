"""Log-softmax and Min-K%++ moments over cache-sized slices of each LM-head chunk
(leakaudit.scoring.CPU_SOFTMAX_SLICE_ELEMENTS) against over the whole chunk, alternating in one process, on the
same texts and batches; prints tokens/s both ways and the largest difference in log p, mu and var (expected 0).

Usage: python bench/softmax_slices.py [--model default] [--texts 40] [--pairs 3] [--dtypes bf16,fp32]
Run it once per thread count (LEAKAUDIT_THREADS is not read here: torch's own count, or taskset/OMP_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from score import ab_of_constant, bench_texts  # noqa: E402

from leakaudit import scoring  # noqa: E402
from leakaudit.models import cpu_has_fast_bf16, load_model  # noqa: E402

SLICED = scoring.CPU_SOFTMAX_SLICE_ELEMENTS
WHOLE_CHUNK = scoring.HEAD_CHUNK_ELEMENTS  # a slice as large as a chunk: the way before slices


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--texts", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--dtypes", default="bf16,fp32")
    args = ap.parse_args()
    texts = bench_texts(args.texts)
    report = {"cpu_fast_bf16": cpu_has_fast_bf16(), "threads": torch.get_num_threads(), "texts": len(texts),
              "runs": []}
    for dname in args.dtypes.split(","):
        lm = load_model(args.model, dtype=dname)
        report["tokens"] = tokens = sum(len(lm.tokenizer(t)["input_ids"]) for t in texts)
        scoring.score_texts(lm, texts[:4], cache=False, progress=False)  # warm-up
        for moments in (False, True):
            run = {"dtype": dname, "moments": moments,
                   **ab_of_constant(lm, texts, moments, "CPU_SOFTMAX_SLICE_ELEMENTS", (WHOLE_CHUNK, "whole_chunk"),
                                    (SLICED, "sliced"), args.pairs, tokens,
                                    ("logp", "mu", "var") if moments else ("logp",))}
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
