"""The bf16 CPU attention of another revision against the working tree's, alternating in one process.

    python bench/attention_ab.py --rev HEAD~1 --threads 1

Whole engine passes (default model, bf16, cache off) over the first 40 bench texts and over the 3 longest of
400, the two implementations registered in turn under the same name, 3 pairs; prints tok/s, the median
speed-up and the largest per-token log p difference between the two (0 when they round alike).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import bench_texts  # noqa: E402
from transformers import AttentionInterface  # noqa: E402

from leakaudit.models import cpu_attention, load_model  # noqa: E402
from leakaudit.models.dtype import cpu_has_fast_bf16  # noqa: E402
from leakaudit.scoring import score_texts  # noqa: E402


def revision_module(rev: str):
    """leakaudit/models/cpu_attention.py as it was at `rev`, imported under another name."""
    source = subprocess.run(["git", "show", f"{rev}:leakaudit/models/cpu_attention.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "cpu_attention_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("cpu_attention_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # registers itself under the same name: the loop below re-registers
    return module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", default="HEAD~1")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    old = revision_module(args.rev)
    texts = bench_texts(400)
    lm = load_model("default", dtype="bf16")
    n = [len(lm.tokenizer(t)["input_ids"]) for t in texts]
    longest = sorted(range(len(texts)), key=lambda i: -n[i])[:3]
    sets = {"40 texts": texts[:40], "3 longest of 400": [texts[i] for i in longest]}
    print(f"CPU fast bf16: {cpu_has_fast_bf16()}, threads {args.threads}, {args.rev} vs working tree")
    score_texts(lm, texts[:4], cache=False, progress=False)  # warm-up
    for name, batch in sets.items():
        times: dict[str, list[float]] = {"rev": [], "tree": []}
        scores = {}
        for pair in range(3):
            order = [("rev", old), ("tree", cpu_attention)]
            for which, module in order if pair % 2 == 0 else order[::-1]:
                AttentionInterface.register(cpu_attention.NAME, module.blocked_attention)
                t = time.perf_counter()
                scores[which] = score_texts(lm, batch, cache=False, progress=False)
                times[which].append(time.perf_counter() - t)
        AttentionInterface.register(cpu_attention.NAME, cpu_attention.blocked_attention)
        tokens = sum(len(lm.tokenizer(t)["input_ids"]) for t in batch)
        diff = max(float(np.abs(a.logp - b.logp).max())
                   for a, b in zip(scores["rev"], scores["tree"], strict=True))
        t_rev, t_tree = statistics.median(times["rev"]), statistics.median(times["tree"])
        pairs = [round(a / b, 3) for a, b in zip(times["rev"], times["tree"], strict=True)]
        print(f"{name} ({tokens:,} tokens): {args.rev} {tokens / t_rev:,.0f} tok/s, "
              f"tree {tokens / t_tree:,.0f} tok/s, speed-up {t_rev / t_tree:.3f}x (pairs {pairs}), "
              f"max |d log p| {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
