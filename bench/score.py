"""Benchmark the scoring engine against the naive loop common MIA code uses, in one run.

Naive loop (as in mimir / LLM-PBE style code): one text per forward pass, fp32, full logits, then a
Python loop over positions gathering log p of each next token.
Engine: leakaudit.scoring.score_texts with the default dtype policy, length-bucketed batches, cache off.
Also measured in the same run: the matmul peak (GFLOP/s) of fp32 and bf16 on this device, and the
achieved GFLOP/s of the engine (forward FLOPs = 2 x linear-layer parameters per token + attention).

Usage: python bench/score.py [--model default] [--texts 48] [--device auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from leakaudit import resources, scoring  # noqa: E402
from leakaudit.models import load_model, resolve_device, resolve_dtype  # noqa: E402
from leakaudit.scoring import score_texts  # noqa: E402


def bench_texts(n: int) -> list[str]:
    """Varied-length texts from shipped data (self-instruct seed tasks), 20 to ~400 tokens."""
    rows = [json.loads(x) for x in resources.path("self-instruct-seed", "seed_tasks.jsonl").open()]
    texts = []
    while len(texts) < n:  # past the 175 seed tasks, cycle with a numbered prefix so every text is new
        for i, row in enumerate(rows):
            inst = row["instances"][0]
            body = f"{row['instruction']}\n{inst['input']}\n{inst['output']}"
            texts.append(f"({len(texts)}) " * (len(texts) >= len(rows)) + (body + "\n") * (1 + i % 4))
            if len(texts) == n:
                break
    return texts


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_peak(dtype: torch.dtype, dev: torch.device, budget_s: float = 2.0) -> float:
    """GFLOP/s of a square matmul, sized so the measurement takes about budget_s."""
    size = 256
    while True:
        a = torch.randn(size, size, dtype=dtype, device=dev)
        b = torch.randn(size, size, dtype=dtype, device=dev)
        a @ b
        sync(dev)
        t = time.perf_counter()
        a @ b
        sync(dev)
        one = time.perf_counter() - t
        if one > 0.05 or size >= 8192:
            break
        size *= 2
    reps = max(1, int(budget_s / max(one, 1e-6)))
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * size**3 * reps / (time.perf_counter() - t) / 1e9


def matmul_peak_per_thread(dtype: torch.dtype, threads: int, size: int = 2048, reps: int = 12) -> float:
    """GFLOP/s of `threads` square matmuls at once, each on one thread (CPU): the peak the scoring engine's
    batch workers (one batch per thread) can reach, which on some CPUs exceeds one matmul on all threads."""
    from concurrent.futures import ThreadPoolExecutor

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)

    def run(n: int) -> None:
        for _ in range(n):
            a @ b

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            list(pool.map(run, [1] * threads))
            t = time.perf_counter()
            list(pool.map(run, [reps] * threads))
            return 2 * size**3 * reps * threads / (time.perf_counter() - t) / 1e9
    finally:
        torch.set_num_threads(before)


def forward_flops(model, n_tokens_per_text: list[int]) -> float:
    """2 x (linear weights incl. LM head) per token, plus causal attention (QK^T and AV)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = model.get_output_embeddings()
    if not any(head is m for m in model.modules() if isinstance(m, torch.nn.Linear)):
        linear += head.weight.numel()
    cfg = model.config
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    total = 0.0
    for t in n_tokens_per_text:
        total += 2 * linear * t + 2 * 2 * layers * hidden * t * (t + 1) / 2
    return total


def alternating_passes(lm, texts: list[str], moments: bool, settings: dict, pairs: int) -> tuple[dict, dict]:
    """An A/B of engine settings in one process: `pairs` rounds, each timing one pass (cache off) per setting in
    turn, so drift in the host's speed hits every setting alike. `settings` maps a label to a function that
    applies it; returns (label -> seconds of each round, label -> the last round's results)."""
    times: dict = {label: [] for label in settings}
    results: dict = {}
    for _ in range(pairs):
        for label, apply in settings.items():
            apply()
            t = time.perf_counter()
            results[label] = score_texts(lm, texts, moments=moments, cache=False, progress=False)
            times[label].append(time.perf_counter() - t)
    return times, results


def ab_of_constant(lm, texts: list[str], moments: bool, name: str, before: tuple, after: tuple, pairs: int,
                   tokens: int, fields: tuple[str, ...]) -> dict:
    """`ab_summary` of `alternating_passes` between two values of one constant of leakaudit.scoring; `before` and
    `after` are (value, name) pairs. The constant gets back the value it had."""
    saved = getattr(scoring, name)
    settings = {value: partial(setattr, scoring, name, value) for value, _ in (before, after)}
    try:
        times, results = alternating_passes(lm, texts, moments, settings, pairs)
    finally:
        setattr(scoring, name, saved)
    return ab_summary(times, results, before, after, tokens, fields)


def largest_difference(a, b, field: str) -> float:
    """The largest |a - b| of one per-token field (logp, mu, var) over two lists of TokenScores."""
    return max(float(np.max(np.abs(getattr(x, field) - getattr(y, field)), initial=0.0)) for x, y in zip(a, b, strict=True))


def ab_summary(times: dict, results: dict, before: tuple, after: tuple, tokens: int, fields: tuple[str, ...]) -> dict:
    """One A/B of `alternating_passes` as a JSON row: `before` and `after` are (label, name) pairs; seconds of
    each round, tokens/s of the medians and their ratio under each name, and the largest difference per field."""
    (a, a_name), (b, b_name) = before, after
    ta, tb = statistics.median(times[a]), statistics.median(times[b])
    run = {f"seconds_{a_name}": times[a], f"seconds_{b_name}": times[b], f"tokens_per_s_{a_name}": tokens / ta,
           f"tokens_per_s_{b_name}": tokens / tb, "speedup": ta / tb}
    for field in fields:
        run[f"max_diff_{field}"] = largest_difference(results[a], results[b], field)
    return run


def naive_loop(lm, texts: list[str]) -> list[float]:
    """One text per forward, fp32 full logits, per-token Python gather."""
    out = []
    with torch.no_grad():
        for text in texts:
            ids = lm.tokenizer(text, return_tensors="pt").input_ids.to(lm.device)
            logits = lm.model(ids).logits[0].float()
            total = 0.0
            for t in range(ids.shape[1] - 1):
                total += torch.log_softmax(logits[t], dim=-1)[ids[0, t + 1]].item()
            out.append(total)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--texts", type=int, default=48)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="print where one engine run spends its time")
    args = ap.parse_args()

    dev = resolve_device(args.device)
    texts = bench_texts(args.texts)
    engine_dtype = resolve_dtype(None, dev)
    lm_fp32 = load_model(args.model, device=str(dev), dtype="fp32")
    n_tok = [len(lm_fp32.tokenizer(t)["input_ids"]) for t in texts]
    total_tokens = sum(n_tok)

    peaks = {"fp32": matmul_peak(torch.float32, dev), "bf16": matmul_peak(torch.bfloat16, dev)}

    naive_loop(lm_fp32, texts[:2])  # warm-up
    t = time.perf_counter()
    naive = naive_loop(lm_fp32, texts)
    sync(dev)
    naive_s = time.perf_counter() - t

    lm = lm_fp32 if engine_dtype == torch.float32 else load_model(args.model, device=str(dev), dtype=engine_dtype)
    score_texts(lm, texts[:4], cache=False, progress=False)  # warm-up
    runs = []
    for _ in range(3):
        sync(dev)
        t = time.perf_counter()
        res = score_texts(lm, texts, cache=False, progress=False)
        sync(dev)
        runs.append(time.perf_counter() - t)
    engine_s = statistics.median(runs)
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(score_texts, lm, texts, cache=False, progress=False)
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)

    max_diff = max(abs(a - r.sum_logp) / max(1, r.n_tokens) for a, r in zip(naive, res, strict=True))
    flops = forward_flops(lm.model, n_tok)
    engine_gflops = flops / engine_s / 1e9
    dname = "bf16" if engine_dtype == torch.bfloat16 else "fp32"
    result = {
        "model": args.model,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "texts": len(texts),
        "tokens": total_tokens,
        "naive_tokens_per_s": total_tokens / naive_s,
        "engine_dtype": dname,
        "engine_tokens_per_s": total_tokens / engine_s,
        "speedup_vs_naive": naive_s / engine_s,
        "matmul_peak_gflops": peaks,
        "engine_gflops": engine_gflops,
        "engine_fraction_of_own_dtype_peak": engine_gflops / peaks[dname],
        "engine_fraction_of_bf16_peak": engine_gflops / peaks["bf16"],
        "max_abs_diff_mean_logp_vs_naive": max_diff,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
