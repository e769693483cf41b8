"""lira against ref at CPU scale: does calibrating by several reference models beat one? (docs/attacks.md)

A tiny GPT-NeoX is pre-trained on Dolly texts (the base). Per replicate, the rest of the pool is shuffled with
the replicate's seed into members, non-members and four reference shards, all disjoint and of one
distribution; the target is the base fine-tuned on the members, each reference the base fine-tuned the same way
on its own shard (OUT models: none saw a text under attack). Scored on the same texts: `loss`, `ref` against the
base, `ref` against reference 1 alone, `lira` over the four references (global σ, and per-text σ). Reported per
replicate: AUC and TPR at 1% and 10% FPR with 95% intervals (leakaudit.metrics), and the paired Δ AUC of lira
against each ref. The replicate seeds (0, 1, ...) and the recipe (the defaults below) were fixed before any run;
one timing pilot on another split (seed 100) ran first, with the same recipe.

    PYTHONPATH=. python scripts/lira_study.py --replicates 2 --json out/lira_study.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from leakaudit.attacks.mia import run_mia
from leakaudit.data.builtin import builtin_dataset
from leakaudit.metrics import paired_auc_difference, roc_metrics
from leakaudit.models import LoadedModel, load_model


def train(lm: LoadedModel, texts: list[str], epochs: int, lr: float, seed: int, max_length: int) -> torch.nn.Module:
    """A copy of lm's model trained on `texts` for `epochs` (AdamW, batches of 16, shuffled with `seed`)."""
    model = copy.deepcopy(lm.model)
    tok = lm.tokenizer
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(texts))
        for lo in range(0, len(order), 16):
            enc = tok([texts[i] for i in order[lo:lo + 16]], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length)
            loss = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def loaded(model: torch.nn.Module, base: LoadedModel, name: str) -> LoadedModel:
    return LoadedModel(model, base.tokenizer, name, name, base.device, base.dtype)


def summary(scores: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    m = roc_metrics(scores, labels, n_bootstrap=1000, seed=seed, fprs=(0.01, 0.1))
    return {"auc": m.auc, "auc_ci": m.auc_ci, "tpr": {str(f): m.tpr_at_fpr[f] for f in (0.01, 0.1)},
            "tpr_ci": {str(f): m.tpr_ci[f] for f in (0.01, 0.1)}, "warnings": m.warnings}


def replicate(base: LoadedModel, pool: list[str], args: argparse.Namespace, seed: int, out: Path) -> dict:
    n = args.per_set
    order = np.random.default_rng(seed).permutation(len(pool))
    sets = [[pool[i] for i in order[k * n:(k + 1) * n]] for k in range(2 + args.references)]
    members, nonmembers, shards = sets[0], sets[1], sets[2:]
    recipe = {"epochs": args.epochs, "lr": args.lr, "max_length": args.max_length}
    target = loaded(train(base, members, seed=seed, **recipe), base, f"target-{seed}")
    folders = []
    for j, shard in enumerate(shards):
        where = out / f"ref{seed}-{j}"
        train(base, shard, seed=seed * 100 + j + 1, **recipe).save_pretrained(where)
        base.tokenizer.save_pretrained(where)
        folders.append(str(where))
    opts = {"n_bootstrap": 0, "cache": False, "progress": False, "max_length": args.max_length}
    scores = run_mia(target, members, nonmembers, ["loss", "ref", "lira"], reference=base,
                     attack_options={"lira": {"references": folders}}, **opts).scores
    one = run_mia(target, members, nonmembers, ["ref", "lira"], reference=load_model(folders[0], dtype="fp32"),
                  attack_options={"lira": {"references": folders, "variance": "per_text"}}, **opts).scores
    scores = {"loss": scores["loss"], "ref (base)": scores["ref"], "ref (reference 1)": one["ref"],
              "lira (global σ)": scores["lira"], "lira (per-text σ)": one["lira"]}
    labels = np.array([1] * len(members) + [0] * len(nonmembers))
    res = {"seed": seed, "attacks": {k: summary(v, labels, seed) for k, v in scores.items()}, "paired": {}}
    for a in ("ref (base)", "ref (reference 1)"):
        for b in ("lira (global σ)", "lira (per-text σ)"):
            d = paired_auc_difference(scores[a], scores[b], labels, n_bootstrap=1000, seed=seed)
            res["paired"][f"{b} − {a}"] = {"delta": d["delta"], "ci": d["ci"]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicates", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="*", help="replicate seeds (default 0..replicates-1)")
    ap.add_argument("--references", type=int, default=4)
    ap.add_argument("--per-set", type=int, default=300, help="texts per set: members, non-members, each shard")
    ap.add_argument("--base-texts", type=int, default=1000)
    ap.add_argument("--base-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    texts = sorted({r["text"] for r in builtin_dataset("dolly", 0, None) if 80 <= len(r["text"]) <= 400})
    order = np.random.default_rng(12345).permutation(len(texts))
    base_texts = [texts[i] for i in order[:args.base_texts]]
    pool = [texts[i] for i in order[args.base_texts:]]
    need = (2 + args.references) * args.per_set
    assert len(pool) >= need, f"{len(pool)} texts in the pool, {need} needed"
    tiny = load_model("tiny-gpt-neox", dtype="fp32")
    base = loaded(train(tiny, base_texts, args.base_epochs, 3e-3, 12345, args.max_length), tiny, "base")
    seeds = args.seeds if args.seeds else list(range(args.replicates))
    results = {"args": vars(args), "pool": len(pool), "replicates": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            results["replicates"].append(replicate(base, pool, args, seed, Path(tmp)))
            print(json.dumps(results["replicates"][-1], indent=1, default=float), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
