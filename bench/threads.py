"""A forward pass with and without another busy process on the machine: torch's inherited thread count
("before") against leakaudit's choice (leakaudit/threads.py, "after"), all in one run.

Each measurement runs in a fresh process (OpenMP reads its thread count once), with OMP_NUM_THREADS and
LEAKAUDIT_THREADS unset: one batched forward of the default model over 8 texts of 128 tokens, median of 5
after a warm-up. The busy process is a Python `while True: pass` loop.

    .venv/bin/python bench/threads.py [--model default] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, statistics, sys, time
choose = sys.argv[1] == "leakaudit"
if choose:
    from leakaudit.threads import configure_threads
    configure_threads()
import torch
from leakaudit.models import load_model
lm = load_model(sys.argv[2])
ids = torch.randint(0, lm.model.config.vocab_size, (8, 128))
runs = []
with torch.inference_mode():
    lm.model(input_ids=ids)
    for _ in range(int(sys.argv[3])):
        t = time.perf_counter()
        lm.model(input_ids=ids)
        runs.append(time.perf_counter() - t)
print(json.dumps({"threads": torch.get_num_threads(), "seconds": statistics.median(runs)}))
"""


def measure(who: str, model: str, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LEAKAUDIT_THREADS")}
    out = subprocess.run([sys.executable, "-c", CHILD, who, model, str(repeats)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from peers import cpu_kind  # noqa: PLC0415

    print(f"CPU: {cpu_kind()}, {os.cpu_count()} CPUs; forward of 8 x 128 tokens, median of {args.repeats}")
    rows = []
    for load in ("idle", "one busy process"):
        loop = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load != "idle" else None
        try:
            time.sleep(0.5)
            for who in ("torch default", "leakaudit"):
                r = measure("leakaudit" if who == "leakaudit" else "torch", args.model, args.repeats)
                rows.append((load, who, r["threads"], r["seconds"]))
                print(f"{load:>17} | {who:>13} | {r['threads']} threads | {r['seconds'] * 1000:8.1f} ms", flush=True)
        finally:
            if loop:
                loop.kill()
                loop.wait()
    idle = {who: s for load, who, _, s in rows if load == "idle"}
    busy = {who: s for load, who, _, s in rows if load != "idle"}
    print(f"slowdown under load: torch default {busy['torch default'] / idle['torch default']:.2f}x, "
          f"leakaudit {busy['leakaudit'] / idle['leakaudit']:.2f}x; "
          f"under load leakaudit is {busy['torch default'] / busy['leakaudit']:.2f}x faster than the default")


if __name__ == "__main__":
    main()
