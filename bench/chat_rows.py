"""Benchmark: a multi-turn conversation scored as one row of the engine against one row per reply, in one run.

A chat fine-tune's loss is on every assistant reply, so `mia --format chat` (and user inference, perplexity,
score) read every reply's tokens, each after all before it. `attacks.base.scoring_pass` scores a conversation
as one row (everything after its first reply's context, the replies' tokens kept); the alternative, one row
per reply in its context, passes over the conversation so far once per reply. This script times both on the
same conversations (shipped Dolly pairs chained as user/assistant turns), cold score cache, and prints the
largest difference of their log-probabilities.

Usage: python bench/chat_rows.py [--conversations 30] [--turns 3] [--threads 1] [--dtype auto] [--model default]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from leakaudit.attacks.base import chat_rows, scoring_pass  # noqa: E402
from leakaudit.data.builtin import builtin_dataset  # noqa: E402
from leakaudit.models import load_model  # noqa: E402
from leakaudit.models.dtype import cpu_has_fast_bf16  # noqa: E402
from leakaudit.scoring import TokenScores, score_ids  # noqa: E402


def conversations(n: int, turns: int) -> list[list[dict[str, str]]]:
    """n conversations of `turns` consecutive shipped Dolly pairs each (contents cut to 300 characters)."""
    rows = list(builtin_dataset("dolly", 0, n * turns))
    return [[m for r in rows[i:i + turns] for m in ({"role": "user", "content": r["query"][:300]},
                                                    {"role": "assistant", "content": r["response"][:300]})]
            for i in range(0, n * turns, turns)]


def per_reply(lm, chats) -> list[TokenScores]:
    """Each reply a row of its own, in its context; a conversation's replies joined in order."""
    contexts, replies, owners = chat_rows(lm.tokenizer, chats)
    scored = score_ids(lm, contexts, replies, moments=True, cache=False, progress=False)
    joined: list[list[TokenScores]] = [[] for _ in chats]
    for owner, s in zip(owners, scored, strict=True):
        joined[owner].append(s)
    return [TokenScores(*(np.concatenate([getattr(s, k) for s in parts]) for k in ("logp", "mu", "var")))
            for parts in joined]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=30)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype)
    chats = conversations(args.conversations, args.turns)
    n_tokens = sum(len(c) + len(r) for c, r in zip(*chat_rows(lm.tokenizer, chats)[:2], strict=True))
    print(f"{args.model} ({lm.dtype}, a CPU {'with' if cpu_has_fast_bf16() else 'without'} fast bf16), {args.threads} thread(s), "
          f"{len(chats)} conversations of {args.turns} replies")
    one = scoring_pass(lm, chats=chats, moments=True, cache=False, progress=False)  # warm-up, and the values
    many = per_reply(lm, chats)
    diff = max(float(np.abs(a.logp - b.logp).max()) for a, b in zip(one, many, strict=True))
    times = {"one row per conversation": [], "one row per reply": []}
    for _ in range(2):  # alternated, so a load that comes and goes falls on both
        for name, run in (("one row per conversation", lambda: scoring_pass(lm, chats=chats, moments=True,
                                                                            cache=False, progress=False)),
                          ("one row per reply", lambda: per_reply(lm, chats))):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    for name, t in best.items():
        print(f"{name}: {t:.2f} s (best of 2)")
    print(f"per reply / per conversation: {best['one row per reply'] / best['one row per conversation']:.2f}x; "
          f"reply rows' tokens (contexts + replies) {n_tokens}; largest |Δ log p| {diff:.2e}")


if __name__ == "__main__":
    main()
