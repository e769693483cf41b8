"""One experiment in one process against the same under torchrun, on the default model, in one run.

Why: on a CPU box a user can give a run's cores to one process's threads (torch's OpenMP) or to several
processes of one thread each (`torchrun --nproc-per-node N -m leakaudit run`, DDP for the fine-tune, a shard
each for user inference). Which is faster is measured, not assumed. The experiment is study 3's shape at a
small size: 40 real Enron senders, one LoRA fine-tune (1 epoch, batch 8, max_length 128) and user inference
against the base model, score cache off. Each configuration runs from an empty output dir; stage times are
the ones `run.json` records, the whole wall includes process start and model loads.

    .venv/bin/python bench/launched.py [--cores 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from peers import cpu_kind  # noqa: E402

EXPERIMENT = """\
name: launched-bench
seed: 0
models:
  base: default
datasets:
  users:
    builtin: enron-users
    max_users: 40
    max_chars: 200
    min_texts_per_user: 12
    split: {in: 0.5, out: 0.5}
    split_by: user
    holdout_per_user: 8
finetune:
  none:
    model: base
    data: users.in
    method: lora
    options: {epochs: 1, learning_rate: 0.002, batch_size: 8, gradient_accumulation: 1, max_length: 128,
              user_field: user}
evaluate:
  users:
    kind: user-inference
    targets: [none]
    reference: base
    members: users.in_holdout
    nonmembers: users.out_holdout
    options: {m_values: [1, 8], cache: false}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(exp: Path, out: Path, processes: int, threads: int) -> dict:
    """Run the experiment; return the whole wall and each stage's recorded seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LEAKAUDIT_THREADS": str(threads)}
    leakaudit = [sys.executable, "-m", "leakaudit", "run", str(exp), "--out", str(out), "--no-report"]
    cmd = leakaudit if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
        str(_free_port()), *leakaudit[1:]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    stages = {s["id"]: s["seconds"] for s in json.loads((out / "run.json").read_text())["stages"]}
    auc = next(s["result"]["auc"] for s in json.loads((out / "run.json").read_text())["stages"]
               if s["id"].startswith("evaluate/"))
    return {"processes": processes, "threads": threads, "wall_s": round(wall, 1), "stages_s": stages, "auc": auc}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cores", type=int, default=2, help="cores to give each configuration")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exp = Path(tmp) / "exp.yaml"
        exp.write_text(EXPERIMENT)
        runs = [run(exp, Path(tmp) / f"p{p}", p, args.cores // p) for p in (1, args.cores)]
    one, many = runs
    print(f"CPU: {cpu_kind()}; {args.cores} cores per configuration")
    print("| configuration | whole run (s) | fine-tune (s) | user inference (s) | user AUC (m=8) |")
    print("|---|---|---|---|---|")
    for r in runs:
        ft = next(v for k, v in r["stages_s"].items() if k.startswith("finetune/"))
        ui = next(v for k, v in r["stages_s"].items() if k.startswith("evaluate/"))
        print(f"| {r['processes']} process(es) x {r['threads']} thread(s) | {r['wall_s']} | {ft} | {ui} | "
              f"{r['auc']:.3f} |")
    for what in ("finetune/", "evaluate/"):
        a = next(v for k, v in one["stages_s"].items() if k.startswith(what))
        b = next(v for k, v in many["stages_s"].items() if k.startswith(what))
        print(f"{what.rstrip('/')}: {args.cores} processes x 1 thread are {a / b:.2f}x the speed of 1 process x "
              f"{args.cores} threads")
    print(f"whole run: {one['wall_s'] / many['wall_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_kind(), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
