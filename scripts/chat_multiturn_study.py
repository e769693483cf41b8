"""The multi-turn chat check of docs/attacks.md ("A chat fine-tune's members", multi-turn): scoring every reply of
a conversation (`mia --format chat`) against scoring its last reply only, on the same target and rows.

    python scripts/chat_multiturn_study.py data OUT       # OUT/data: 200 three-turn conversations, two splits, pretraining rows
    python scripts/chat_multiturn_study.py last OUT       # OUT/last_rR: last-reply-only scores (library); OUT/checks.json
    python scripts/chat_multiturn_study.py analyse OUT    # per attack and mode AUC, TPR@10%FPR; paired Δ AUC all - last

scripts/chat_multiturn_study.sh OUT runs the whole study (pre-training, two fine-tunes, the mia runs) between them.
The last-reply scores use the product's scoring engine and attack classes: a ScoringContext whose conversation pass
keeps only the last (context, reply) span of `replies_in_context` (its context unchanged: every earlier turn and
reply, the assistant header); `texts` (zlib's) are the last reply's content.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import numpy as np

ATTACKS = ["loss", "min_k", "min_k_pp", "zlib", "ref"]
N_CONV, N_MEMBERS, TURNS, MAX_TOKENS = 200, 100, 3, 256  # 256: tiny-gpt-neox's context, finetune's max_length
N_BOOT = 2000
DTYPE = os.environ.get("MT_DTYPE", "auto")  # as the CLI runs (--dtype auto)


def _joined(row: dict) -> str:
    return row["query"] + "\n" + row["response"]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_data(out: Path) -> None:
    """200 conversations of three Dolly (instruction, response) pairs as user/assistant turns: pairs of 60-170
    characters with a response of >= 20, shuffled (seed 12345), taken three at a time; a triple whose chat example
    is longer than 256 tokens is skipped. Split 100/100 per replicate (seed 0, 1); every other Dolly row, as plain
    text, for the base's pre-training. Replicate 0's conversations cut after their first reply: the check."""
    from leakaudit.data.builtin import dolly
    from leakaudit.models import load_model
    from leakaudit.train.examples import chat_example

    tok = load_model("tiny-gpt-neox", device="cpu").tokenizer
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = dolly(None)
    seen: set[str] = set()
    candidates = []
    for r in rows:
        n = len(r["query"]) + len(r["response"])
        if 60 <= n <= 170 and len(r["response"]) >= 20 and _joined(r) not in seen:
            seen.add(_joined(r))
            candidates.append(r)
    random.Random(12345).shuffle(candidates)
    pool, skipped = [], 0
    for start in range(0, len(candidates) - TURNS + 1, TURNS):
        triple = candidates[start:start + TURNS]
        messages = [m for r in triple for m in ({"role": "user", "content": r["query"]},
                                                {"role": "assistant", "content": r["response"]})]
        if len(chat_example(tok, messages, "assistant", 10**9).input_ids) > MAX_TOKENS:
            skipped += 1
            continue
        pool.append({"id": "+".join(r["id"] for r in triple), "rows": triple, "messages": messages})
        if len(pool) == N_CONV:
            break
    assert len(pool) == N_CONV, f"only {len(pool)} conversations"
    used = [r for c in pool for r in c["rows"]]
    texts, ids = {_joined(r) for r in used}, {r["id"] for r in used}
    assert len(ids) == TURNS * N_CONV
    pretrain = [{"text": _joined(r)} for r in rows if r["id"] not in ids and _joined(r) not in texts]
    _write(data / "pretrain.jsonl", pretrain)
    for rep in (0, 1):
        order = list(range(len(pool)))
        random.Random(rep).shuffle(order)
        evaluated = [{"id": pool[i]["id"], "label": int(j < N_MEMBERS), "messages": pool[i]["messages"]}
                     for j, i in enumerate(order)]
        _write(data / f"eval_r{rep}.jsonl", evaluated)
        _write(data / f"members_r{rep}.jsonl", [{"messages": e["messages"]} for e in evaluated if e["label"]])
        if rep == 0:
            _write(data / "first_r0.jsonl", [{**e, "messages": e["messages"][:2]} for e in evaluated])
    lengths = [len(chat_example(tok, c["messages"], "assistant", 10**9).input_ids) for c in pool]
    print(f"{len(candidates)} candidate pairs, {skipped} triples skipped (> {MAX_TOKENS} tokens), {N_CONV} "
          f"conversations of {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}); "
          f"{len(pretrain)} pretraining rows")


def _contexts():
    """The two ScoringContexts: the product's (every reply) and the last-reply-only one."""
    from leakaudit.attacks.base import ScoringContext, chat_rows
    from leakaudit.data.chat import with_replies
    from leakaudit.distributed import score_ids_distributed

    class LastReplyContext(ScoringContext):
        """Each conversation scored at its last reply only, in its full context (earlier turns and replies as
        context, exactly the tokens `chat_rows` gives that reply)."""

        def _pass(self, lm, change, prefix, moments, name):
            assert self.chats is not None and prefix is None
            chats = [with_replies(c, change) for c in self.chats]
            contexts, replies, owners = chat_rows(lm.tokenizer, chats, model=lm.spec)
            last = {o: j for j, o in enumerate(owners)}  # each conversation's last span
            keep = [last[i] for i in range(len(chats))]
            return score_ids_distributed(lm, [contexts[j] for j in keep], [replies[j] for j in keep],
                                         moments=moments, description=f"scoring last ({name})", **self.score_options)

    return ScoringContext, LastReplyContext


def _score(ctx_cls, target, reference, chats: list[list[dict]], texts: list[str]) -> tuple[dict, list[int]]:
    from leakaudit.attacks.base import get_attack

    ctx = ctx_cls(target, texts, reference, moments=True, chats=chats,
                  score_options={"batch_size": "auto", "max_length": None, "stride": None, "cache": False,
                                 "progress": False})
    scores = {name: np.asarray(get_attack(name).score(ctx), dtype=np.float64) for name in ATTACKS}
    return scores, [s.n_tokens for s in ctx.target_scores]


def _cli_order(path: Path) -> list[dict]:
    """The rows in the order `mia` scores them: members first, then non-members, each in file order."""
    rows = _read(path)
    return [r for r in rows if r["label"]] + [r for r in rows if not r["label"]]


def last_scores(out: Path) -> None:
    """OUT/last_rR/scores.jsonl (last reply only) and OUT/checks.json: the all-replies pass recomputed here against
    the CLI's scores, and the last-reply path on one-reply conversations against the CLI's."""
    from leakaudit.data.chat import reply_text
    from leakaudit.models import load_model

    Plain, Last = _contexts()
    checks: dict = {"dtype_requested": DTYPE}
    base = load_model(str(out / "base"), device="cpu", dtype=DTYPE)
    for rep in (0, 1):
        target = load_model(str(out / f"ft_r{rep}"), device="cpu", dtype=DTYPE)
        checks["dtype"] = str(target.dtype)
        rows = _cli_order(out / "data" / f"eval_r{rep}.jsonl")
        chats = [r["messages"] for r in rows]
        last_texts = [[m for m in c if m["role"] == "assistant"][-1]["content"] for c in chats]
        last, n_last = _score(Last, target, base, chats, last_texts)
        allr, n_all = _score(Plain, target, base, chats, [reply_text(c) for c in chats])
        cli = {r["id"]: r for r in _read(out / f"mia_r{rep}_all" / "scores.jsonl")}
        checks[f"r{rep}_all_vs_cli_max_abs_diff"] = {
            a: float(np.max(np.abs(allr[a] - np.array([cli[r["id"]][a] for r in rows])))) for a in ATTACKS}
        checks[f"r{rep}_mean_scored_tokens"] = {"all": float(np.mean(n_all)), "last": float(np.mean(n_last))}
        d = out / f"last_r{rep}"
        d.mkdir(exist_ok=True)
        _write(d / "scores.jsonl", [{"id": r["id"], "label": r["label"], **{a: float(last[a][i]) for a in ATTACKS}}
                                    for i, r in enumerate(rows)])
        if rep == 0:  # one reply each: last reply only is every reply, so the two must agree
            first = _cli_order(out / "data" / "first_r0.jsonl")
            fchats = [r["messages"] for r in first]
            one, _ = _score(Last, target, base, fchats, [c[-1]["content"] for c in fchats])
            cli1 = {r["id"]: r for r in _read(out / "mia_r0_first" / "scores.jsonl")}
            checks["first_reply_last_vs_cli_max_abs_diff"] = {
                a: float(np.max(np.abs(one[a] - np.array([cli1[r["id"]][a] for r in first])))) for a in ATTACKS}
        del target
    (out / "checks.json").write_text(json.dumps(checks, indent=1))
    print(json.dumps(checks, indent=1))


def _auc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUC of each row (members `pos`, non-members `neg`, one resample a row), ties counted half."""
    from scipy.stats import rankdata

    both = np.concatenate([pos, neg], axis=1)
    ranks = rankdata(both, axis=1)[:, :pos.shape[1]]
    n_pos, n_neg = pos.shape[1], neg.shape[1]
    return (ranks.sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def stratified_paired_delta(a: np.ndarray, b: np.ndarray, labels: np.ndarray, n_boot: int = N_BOOT,
                            seed: int = 0) -> dict:
    """AUC(b) - AUC(a) with a paired percentile bootstrap: members and non-members resampled separately (each
    with replacement, to its own size), the same resample scored in both modes. `se`: the SD of the resampled Δ."""
    pos, neg = labels == 1, labels == 0
    rng = np.random.default_rng(seed)
    mi = rng.integers(0, pos.sum(), size=(n_boot, pos.sum()))
    ni = rng.integers(0, neg.sum(), size=(n_boot, neg.sum()))
    da = _auc(a[pos][mi], a[neg][ni])
    db = _auc(b[pos][mi], b[neg][ni])
    d = db - da
    delta = float(_auc(b[pos][None], b[neg][None])[0] - _auc(a[pos][None], a[neg][None])[0])
    return {"delta": delta, "ci": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
            "se": float(d.std(ddof=1))}


def _loss_line(folder: Path) -> str:
    log = [json.loads(line) for line in (folder / "train_log.jsonl").open()]
    losses = [r["loss"] for r in log if "loss" in r]
    return f"{folder.name}: {len(losses)} logged steps, train loss {losses[0]:.2f} -> {losses[-1]:.2f}"


def analyse(out: Path) -> None:
    """The table (markdown): per attack, per replicate, AUC [BCa 95% CI] and TPR@10%FPR for all replies and for
    the last reply, and the paired Δ AUC (all - last) [95% stratified paired bootstrap CI]; then the Δ these sizes
    detect with 80% power (2.8 x the bootstrap SE of Δ)."""
    from leakaudit.metrics import roc_metrics

    for f in ("base", "ft_r0", "ft_r1"):
        if (out / f / "train_log.jsonl").exists():
            print(_loss_line(out / f))
    if (out / "checks.json").exists():
        print("checks:", (out / "checks.json").read_text())
    cells: dict[str, list[str]] = {a: [] for a in ATTACKS}
    mde: dict[str, list[str]] = {a: [] for a in ATTACKS}
    for rep in (0, 1):
        allr = {r["id"]: r for r in _read(out / f"mia_r{rep}_all" / "scores.jsonl")}
        last = _read(out / f"last_r{rep}" / "scores.jsonl")
        assert set(allr) == {r["id"] for r in last} and len(last) == N_CONV
        labels = np.array([r["label"] for r in last])
        assert all(allr[r["id"]]["label"] == r["label"] for r in last)
        for attack in ATTACKS:
            s_all = np.array([allr[r["id"]][attack] for r in last])
            s_last = np.array([r[attack] for r in last])
            for s in (s_all, s_last):
                m = roc_metrics(s, labels, n_bootstrap=N_BOOT, seed=0, fprs=[0.1])
                cells[attack].append(f"{m.auc:.3f} [{m.auc_ci[0]:.3f}, {m.auc_ci[1]:.3f}], {m.tpr_at_fpr[0.1]:.2f}")
            d = stratified_paired_delta(s_last, s_all, labels)
            cells[attack].append(f"{d['delta']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]")
            mde[attack].append(f"{2.8 * d['se']:.3f}")
    print("| attack | rep. 1 all | rep. 1 last | rep. 1 Δ | rep. 2 all | rep. 2 last | rep. 2 Δ |")
    print("|---|---|---|---|---|---|---|")
    for attack in ATTACKS:
        print(f"| {attack} | " + " | ".join(cells[attack]).replace("-", "−") + " |")
    print("detectable Δ (80% power, 2.8 × bootstrap SE), rep. 1 / rep. 2: "
          + "; ".join(f"{a} {' / '.join(mde[a])}" for a in ATTACKS))


if __name__ == "__main__":
    stages = {"data": make_data, "last": last_scores, "analyse": analyse}
    if len(sys.argv) != 3 or sys.argv[1] not in stages:
        sys.exit(__doc__)
    stages[sys.argv[1]](Path(sys.argv[2]))
