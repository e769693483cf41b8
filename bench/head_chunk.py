"""The LM head's chunk size on a CPU (leakaudit.scoring.CPU_BF16_HEAD_CHUNK_ELEMENTS against HEAD_CHUNK_ELEMENTS),
in one run:

1. the head alone (`scoring._head_scores` on random hidden states, the default model's 576 x 49,152 head with
   random weights), bf16 and fp32, loss only and with the Min-K%++ moments, over several rows per chunk, at the
   torch thread count of this process: ms per 4,096 rows (median of 3 rounds) and the largest difference in log p
   against the first size (expected 0: a row's numbers do not depend on its chunk);
2. whole engine passes on the default model in bf16 (cache off), the former chunk (2^25 logits) and the bf16 one
   alternating in one process, loss only and with moments, with the largest difference in log p.

Usage: python bench/head_chunk.py [--texts 40] [--pairs 3] [--rows 682,341,256,170,128]
Runs on torch's own thread count (taskset/OMP_NUM_THREADS): run it once per thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from peers import cpu_kind  # noqa: E402
from score import ab_of_constant, bench_texts  # noqa: E402

from leakaudit import scoring  # noqa: E402
from leakaudit.models import load_model  # noqa: E402

VOCAB, HIDDEN, ROWS = 49152, 576, 4096
FORMER = scoring.HEAD_CHUNK_ELEMENTS
BF16 = scoring.CPU_BF16_HEAD_CHUNK_ELEMENTS


def head_alone(sizes: list[int]) -> list[dict]:
    """ms per ROWS rows through `_head_scores` for each rows-per-chunk size, sizes interleaved per round."""
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        head = scoring._Head(torch.nn.Linear(HIDDEN, VOCAB, bias=False).to(dtype), None)
        h = torch.randn(ROWS, HIDDEN, dtype=dtype)
        targets = torch.randint(0, VOCAB, (ROWS,))
        setting = "CPU_BF16_HEAD_CHUNK_ELEMENTS" if dtype == torch.bfloat16 else "HEAD_CHUNK_ELEMENTS"
        saved = getattr(scoring, setting)
        for moments in (False, True):
            times: dict[int, list[float]] = {rows: [] for rows in sizes}
            first = None
            diff = 0.0
            with torch.inference_mode():
                for _ in range(3):
                    for rows in sizes:
                        setattr(scoring, setting, rows * VOCAB)
                        t = time.perf_counter()
                        lp = scoring._head_scores(head, h, targets, moments)[0]
                        times[rows].append(time.perf_counter() - t)
                        first = lp if first is None else first
                        diff = max(diff, float(abs(lp - first).max()))
            run = {"dtype": str(dtype).removeprefix("torch."), "moments": moments, "max_diff_logp": diff,
                   "ms": {rows: round(statistics.median(v) * 1e3, 1) for rows, v in times.items()}}
            out.append(run)
            print(json.dumps(run), flush=True)
        setattr(scoring, setting, saved)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--rows", default="682,341,256,170,128")
    args = ap.parse_args()
    report = {"cpu": cpu_kind(), "threads": torch.get_num_threads(),
              "head_alone": head_alone([int(r) for r in args.rows.split(",")]), "passes": []}
    lm = load_model("default", dtype="bf16")
    texts = bench_texts(args.texts)
    report["texts"], report["tokens"] = len(texts), sum(len(lm.tokenizer(t)["input_ids"]) for t in texts)
    scoring.score_texts(lm, texts[:4], cache=False, progress=False)  # warm-up
    for moments in (False, True):
        run = {"moments": moments,
               **ab_of_constant(lm, texts, moments, "CPU_BF16_HEAD_CHUNK_ELEMENTS", (FORMER, "former"),
                                (BF16, "bf16_chunk"), args.pairs, report["tokens"], ("logp",))}
        report["passes"].append(run)
        print(json.dumps(run), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
