"""The chat-format check of docs/attacks.md ("A chat fine-tune's members", Measured here): its data and its table.

    python scripts/chat_mia_study.py data OUT      # OUT/data: the 200-conversation pool, two splits, pretraining rows
    python scripts/chat_mia_study.py analyse OUT   # per attack and mode AUC, TPR@10%FPR; paired Δ AUC chat - text

scripts/chat_mia_study.sh OUT runs the whole study (pre-training, two fine-tunes, four mia runs) between them.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ATTACKS = ["loss", "min_k", "min_k_pp", "zlib", "ref"]


def _joined(row: dict) -> str:
    return row["query"] + "\n" + row["response"]


def make_data(out: Path) -> None:
    """200 single-turn Dolly conversations of 80-400 characters (seed 12345), split 100/100 per replicate (seed
    0, 1); every other Dolly row, as plain text, for the base's pre-training."""
    from leakaudit.data.builtin import dolly

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = dolly(None)
    seen: set[str] = set()
    candidates = []
    for r in rows:
        if 80 <= len(r["query"]) + len(r["response"]) <= 400 and len(r["response"]) >= 20 and _joined(r) not in seen:
            seen.add(_joined(r))
            candidates.append(r)
    random.Random(12345).shuffle(candidates)
    pool = candidates[:200]
    texts, ids = {_joined(r) for r in pool}, {r["id"] for r in pool}
    pretrain = [{"text": _joined(r)} for r in rows if r["id"] not in ids and _joined(r) not in texts]
    (data / "pretrain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pretrain))
    for rep in (0, 1):
        order = list(range(len(pool)))
        random.Random(rep).shuffle(order)
        evaluated = [{"id": pool[i]["id"], "label": int(j < 100), "messages": pool[i]["messages"],
                      "text": _joined(pool[i])} for j, i in enumerate(order)]
        (data / f"eval_r{rep}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evaluated))
        (data / f"members_r{rep}.jsonl").write_text("".join(json.dumps({"messages": e["messages"]}) + "\n"
                                                            for e in evaluated if e["label"]))


def analyse(out: Path) -> None:
    """The table: AUC [CI] and TPR@10%FPR per attack and mode, the paired Δ AUC (chat - text) per replicate,
    and the Δ these texts detect with 80% power (2.8 x the paired interval's standard error)."""
    from leakaudit.metrics import paired_auc_difference, roc_metrics

    for rep in (0, 1):
        scores = {m: [json.loads(line) for line in (out / f"mia_r{rep}_{m}" / "scores.jsonl").open()]
                  for m in ("chat", "text")}
        assert [r["id"] for r in scores["chat"]] == [r["id"] for r in scores["text"]]
        labels = [r["label"] for r in scores["chat"]]
        print(f"## replicate {rep + 1} (split seed {rep})")
        for attack in ATTACKS:
            line = [attack]
            for mode in ("chat", "text"):
                m = roc_metrics([r[attack] for r in scores[mode]], labels, n_bootstrap=1000, seed=0, fprs=[0.1])
                line.append(f"{mode}: AUC {m.auc:.3f} [{m.auc_ci[0]:.3f}, {m.auc_ci[1]:.3f}], "
                            f"TPR@10% {m.tpr_at_fpr[0.1]:.2f}")
            d = paired_auc_difference([r[attack] for r in scores["text"]], [r[attack] for r in scores["chat"]],
                                      labels, n_bootstrap=2000, seed=0)
            se = (d["ci"][1] - d["ci"][0]) / 3.92
            line.append(f"Δ chat − text {d['delta']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}], "
                        f"detectable {2.8 * se:.3f}")
            print(" | ".join(line))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("data", "analyse"):
        sys.exit(__doc__)
    (make_data if sys.argv[1] == "data" else analyse)(Path(sys.argv[2]))
