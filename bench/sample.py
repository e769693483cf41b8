"""Benchmark: new tokens/s of the batched sampling engine vs one-prompt-at-a-time `model.generate`.

Both sample with top-k 100 and generate exactly --max-new-tokens tokens per prompt (EOS ignored), on
the same model in the same run. The baseline runs on the first --baseline-prompts prompts (its rate is
per token, so a subset measures it without waiting minutes); the engine runs on all --n-prompts.

    .venv/bin/python bench/sample.py [--model default] [--n-prompts 64] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from leakaudit import resources
from leakaudit.models import load_model
from leakaudit.sampling import SamplingConfig, sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--baseline-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", default="auto")
    args = ap.parse_args()

    lm = load_model(args.model)
    with resources.path("self-instruct-seed", "seed_tasks.jsonl").open() as fh:
        prompts = [json.loads(line)["instruction"] for line in fh][:args.n_prompts]
    n_new = args.max_new_tokens
    print(f"model={args.model} device={lm.device} dtype={lm.dtype} torch_threads={torch.get_num_threads()} "
          f"prompts={len(prompts)} max_new_tokens={n_new}")

    # warm-up (first-call allocations, kernels)
    sample(lm, prompts[:2], SamplingConfig(max_new_tokens=4, top_k=100), progress=False)

    tok = lm.tokenizer
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for p in prompts[:args.baseline_prompts]:
            enc = tok(p, return_tensors="pt").to(lm.device)
            out = lm.model.generate(**enc, do_sample=True, top_k=100, max_new_tokens=n_new, min_new_tokens=n_new,
                                    pad_token_id=tok.pad_token_id)
            tokens += out.shape[1] - enc["input_ids"].shape[1]
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    base_s = time.perf_counter() - start
    base_rate = tokens / base_s
    print(f"one-at-a-time generate: {tokens} new tokens in {base_s:.1f}s = {base_rate:.1f} tok/s")

    cfg = SamplingConfig(max_new_tokens=n_new, top_k=100, stop_at_eos=False, seed=0)
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    start = time.perf_counter()
    samples = sample(lm, prompts, cfg, batch_size=batch_size, progress=False)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    eng_s = time.perf_counter() - start
    eng_tokens = sum(s.n_new_tokens for s in samples)
    eng_rate = eng_tokens / eng_s
    print(f"sampling engine (batch {args.batch_size}): {eng_tokens} new tokens in {eng_s:.1f}s = {eng_rate:.1f} tok/s")
    print(f"speedup: {eng_rate / base_rate:.1f}x")


if __name__ == "__main__":
    main()
