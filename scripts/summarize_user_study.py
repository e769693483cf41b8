"""Tables of the user-inference study (leakaudit/resources/experiments/user-inference.yaml) over its seeds.

Reads only what `leakaudit run` left in each output dir (run.json, summary.json, stage files) and prints
Markdown: per arm and seed the user AUC for every m, the paired difference against no mitigation with its
CI and verdict, the utility cost (held-out perplexity) and the training samples kept; and who is exposed
(rank correlations of the user score with the user's training samples and with the outlier measure).

    python scripts/summarize_user_study.py out/users-s0 out/users-s1 out/users-s2 > table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(run: Path) -> dict:
    """Per arm: user-inference result, perplexity, defenses.json; plus the run's comparisons and seed."""
    record = json.loads((run / "run.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    arms: dict[str, dict] = {}
    for stage in record["stages"]:
        res = stage.get("result") or {}
        kind, params = stage["kind"], stage["params"]
        if kind == "user-inference":
            arms.setdefault(params["target_label"], {})["ui"] = res
        elif kind == "perplexity":
            arms.setdefault(params["target_label"], {})["ppl"] = res.get("perplexity")
        elif kind == "finetune":
            arm = stage["id"].split("/", 1)[1]
            defenses = run / stage["folder"] / "model" / "defenses.json"
            if defenses.exists():
                arms.setdefault(arm, {})["kept"] = json.loads(defenses.read_text()).get("n_train_examples")
            privacy = run / stage["folder"] / "model" / "privacy.json"
            if privacy.exists():
                arms[arm]["epsilon"] = json.loads(privacy.read_text()).get("epsilon")
    return {"seed": record["experiment"]["seed"], "arms": arms, "comparisons": summary.get("comparisons", [])}


def f(x, d=3):
    return "–" if x is None else f"{x:.{d}f}"


def ci(c):
    return "" if not c else f" [{f(c[0])}, {f(c[1])}]"


def main(dirs: list[str]) -> None:
    runs = [load(Path(d)) for d in dirs]
    # the user-AUC comparisons only (a run may compare other measures too), against their own baseline
    user = [c for run in runs for c in run["comparisons"] if c.get("metric") == "user AUC"]
    arms = list(runs[0]["arms"])
    if user:
        arms = [user[0]["baseline"]] + [a for a in arms if a != user[0]["baseline"]]
    ms = list((runs[0]["arms"][arms[0]]["ui"].get("per_m") or {}).keys())
    print("User AUC per m (95% BCa bootstrap CI for the largest m), training samples kept, held-out perplexity:\n")
    print("| arm | seed | " + " | ".join(f"AUC m={m}" for m in ms) + " | samples kept | perplexity |")
    print("|---|---|" + "---|" * len(ms) + "---|---|")
    for arm in arms:
        for run in runs:
            a = run["arms"].get(arm, {})
            per_m = (a.get("ui") or {}).get("per_m") or {}
            cells = [f(per_m.get(m, {}).get("auc")) + (ci(per_m.get(m, {}).get("auc_ci")) if m == ms[-1] else "")
                     for m in ms]
            print(f"| {arm} | {run['seed']} | " + " | ".join(cells) + f" | {a.get('kept', '–')} | {f(a.get('ppl'), 2)} |")
    print(f"\nPaired difference in user AUC (largest m) against `{arms[0]}`, same users, paired bootstrap:\n")
    print("| arm | " + " | ".join(f"seed {r['seed']}: Δ [95% CI] → verdict" for r in runs) + " | mean Δ over seeds |")
    print("|---|" + "---|" * len(runs) + "---|")
    for arm in arms[1:]:
        cells, deltas = [], []
        for run in runs:
            comp = next((c for c in run["comparisons"]
                         if c.get("metric") == "user AUC" and c.get("variant") == arm), None)
            if comp is None or comp.get("delta") is None:
                cells.append("–")
                continue
            deltas.append(comp["delta"])
            cells.append(f"{comp['delta']:+.3f}{ci(comp.get('ci'))} → {comp.get('verdict', '')}")
        mean = sum(deltas) / len(deltas) if deltas else None
        print(f"| {arm} | " + " | ".join(cells) + f" | {'–' if mean is None else f'{mean:+.3f}'} |")
    print(f"\nWho is exposed (`{arms[0]}`; Spearman rank correlation over training users, 95% bootstrap CI):\n")
    print("| seed | ρ(score, user's training samples) | ρ(score, user's NLL under the base model) | users |")
    print("|---|---|---|---|")
    for run in runs:
        vul = (run["arms"][arms[0]].get("ui") or {}).get("vulnerability") or {}
        nt, rn = vul.get("n_train") or {}, vul.get("ref_nll") or {}
        print(f"| {run['seed']} | {f(nt.get('rho'))}{ci(nt.get('ci'))} | {f(rn.get('rho'))}{ci(rn.get('ci'))} | "
              f"{nt.get('n') or rn.get('n') or '–'} |")


if __name__ == "__main__":
    main(sys.argv[1:])
