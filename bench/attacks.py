"""Cost of running every reference-free MIA (loss, zlib, min_k, min_k_pp) relative to `loss` alone.

All four read one shared scoring pass with the Min-K%++ moments, so the ratio should stay near 1 (target:
<= 1.2x). For contrast it also times the naive way: one separate pass per attack. Timings alternate and
repeat (`--repeats`) and the medians are compared, all in this one run. The score cache is off.

    .venv/bin/python bench/attacks.py [--model default] [--texts 64] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from leakaudit import resources
from leakaudit.attacks import ScoringContext, get_attack
from leakaudit.attacks.mia import REFERENCE_FREE
from leakaudit.models import load_model
from leakaudit.scoring import score_texts


def texts(n: int) -> list[str]:
    out = []
    for raw in resources.path("self-instruct-seed", "seed_tasks.jsonl").read_text().splitlines():
        task = json.loads(raw)
        for inst in task["instances"]:
            out.append(f"{task['instruction']}\n{inst['input']}\n{inst['output']}".strip())
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # on a shared, loaded CPU one thread avoids oversubscription
    lm = load_model(args.model, device=args.device)
    data = texts(args.texts)
    opts = {"cache": False, "progress": False}
    n_tok = sum(s.n_tokens for s in score_texts(lm, data, **opts))  # warm-up
    print(f"model={args.model} device={lm.device} dtype={lm.dtype} threads={torch.get_num_threads()} "
          f"texts={len(data)} scored_tokens={n_tok}")

    def loss_only():
        ctx = ScoringContext(lm, data, moments=False, score_options=opts)
        get_attack("loss").score(ctx)

    def shared_pass():
        ctx = ScoringContext(lm, data, moments=True, score_options=opts)
        for name in REFERENCE_FREE:
            get_attack(name).score(ctx)

    def pass_per_attack():
        for name in REFERENCE_FREE:
            attack = get_attack(name)
            ctx = ScoringContext(lm, data, moments=attack.needs_moments, score_options=opts)
            attack.score(ctx)

    runs = {"loss only": loss_only, "all 4, shared pass": shared_pass, "all 4, one pass each": pass_per_attack}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["loss only"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>22}: median {med:7.3f} s  ({n_tok / med:8.0f} tok/s)  ratio to loss {med / base:5.2f}x")


if __name__ == "__main__":
    main()
