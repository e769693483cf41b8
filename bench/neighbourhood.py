"""Cost of the neighbourhood attack against the shared pass every other reference-free attack reads, in one run.

The target is the embedded default model; the masked LM is a BERT-base-shaped model (12 layers, hidden 768)
with random weights and the default model's tokenizer (no masked LM ships and there is no hub here: the cost
of its passes does not depend on its weights, and its proposals are arbitrary words, which cost the target
what real ones do). Timed: the shared pass alone (`loss`), proposing the neighbours (the masked LM's passes),
and the whole attack (proposals plus the target's pass over n neighbours per text); and the proposals once more
with the masked LM's output layer over every position (before `_head_at`), which must propose the same. Score
cache off.

    .venv/bin/python bench/neighbourhood.py [--texts 16] [--neighbours 25] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from peers import cpu_kind  # noqa: E402
from score import bench_texts  # noqa: E402

from leakaudit.attacks import ScoringContext, get_attack  # noqa: E402
from leakaudit.attacks import neighbourhood as nb  # noqa: E402
from leakaudit.attacks.neighbourhood import load_masked_lm, neighbours  # noqa: E402
from leakaudit.models import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=16)
    ap.add_argument("--neighbours", type=int, default=25)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import BertConfig, BertForMaskedLM

    target = load_model("default")
    texts = [t[:400] for t in bench_texts(args.texts)]  # a few sentences each, as MIA texts usually are
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        BertForMaskedLM(BertConfig(vocab_size=len(target.tokenizer))).save_pretrained(tmp)
        target.tokenizer.save_pretrained(tmp)
        mlm = load_masked_lm(tmp, target.device)
        options = {"cache": False, "progress": False}
        t0 = time.perf_counter()
        _ = ScoringContext(target, texts, moments=False, score_options=options).target_scores
        shared = time.perf_counter() - t0
        t0 = time.perf_counter()
        proposed = [neighbours(mlm, t, n=args.neighbours) for t in texts]
        propose = time.perf_counter() - t0
        real_head = nb._head_at
        nb._head_at = lambda *a: contextlib.nullcontext()  # the output layer over every position, as before
        t0 = time.perf_counter()
        assert [neighbours(mlm, t, n=args.neighbours) for t in texts] == proposed
        propose_full_head = time.perf_counter() - t0
        nb._head_at = real_head
        ctx = ScoringContext(target, texts, moments=False, score_options=options)
        _ = ctx.target_scores  # the shared pass, which the attack reads, is not its cost
        t0 = time.perf_counter()
        get_attack("neighbourhood", model=tmp, n_neighbours=args.neighbours).score(ctx)
        attack = time.perf_counter() - t0
    n_tok = sum(len(target.tokenizer(t)["input_ids"]) for t in texts)
    res = {"cpu": cpu_kind(), "threads": args.threads, "dtype": str(target.dtype), "texts": len(texts),
           "target_tokens": n_tok, "neighbours": args.neighbours,
           "neighbours_found_mean": sum(map(len, proposed)) / len(proposed),
           "shared_pass_s": round(shared, 2), "propose_s": round(propose, 2), "attack_s": round(attack, 2),
           "propose_with_the_output_layer_everywhere_s": round(propose_full_head, 2),
           "output_layer_at_one_position_speedup": round(propose_full_head / propose, 2),
           "attack_over_shared_pass": round(attack / shared, 1), "propose_share_of_attack": round(propose / attack, 2)}
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
