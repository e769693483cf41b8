"""The demo's exposure fine-tune (full, default model) with the lean last checkpoint against the Trainer's own
saving, alternating, each in a fresh process: wall time of `finetune` and the bytes the process wrote.

Lean (leakaudit's default): the last step's checkpoint leaves out the optimizer and scheduler states, and the
final model dir links the weights that checkpoint holds. Plain: the Trainer writes the optimizer state into
every checkpoint and the final weights are written again (leakaudit before this change).

Usage: python bench/checkpoint_writes.py [--pairs 2] [--rows 48] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from peers import cpu_kind  # noqa: E402

from leakaudit.data.builtin import enron_exposure  # noqa: E402
from leakaudit.data.io import write_jsonl  # noqa: E402

# experiments/demo.yaml, finetune m0
M0 = {"method": "full", "epochs": 2, "learning_rate": 3e-4, "batch_size": 8, "gradient_accumulation": 1,
      "max_length": 96}


def demo_texts(n: int) -> list[str]:
    """Shipped Enron messages cut to 200 characters, as the demo's corpus P."""
    rows = [r for r in enron_exposure() if len(r["text"]) <= 400]
    random.Random(0).shuffle(rows)
    return [r["text"][:200] for r in rows[:n]]


def written_bytes() -> int:
    """Bytes this process passed to write() so far (/proc/self/io wchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def plain_saving() -> None:
    """The code path before the change: every checkpoint with its optimizer state, final weights written again.
    finetune picks its Trainer with `_trainer_class(lean)`; the `_lean_trainer_class` this replaced before that
    rename was read by nothing, so the plain runs saved lean too."""
    from leakaudit.train import finetune as ft

    trainer_class = ft._trainer_class
    ft._trainer_class = lambda lean: trainer_class(False)
    ft._last_step_checkpoint = lambda ckpt: None


def child(data: str, out: str, lean: bool) -> None:
    from leakaudit.train import finetune as ft

    if not lean:
        plain_saving()
    config = ft.FinetuneConfig(model="default", data=data, out=out, **M0)
    before, t = written_bytes(), time.perf_counter()
    ft.finetune(config, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t, "written_mb": (written_bytes() - before) / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--child", nargs=3, metavar=("DATA", "OUT", "LEAN"))
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2] == "1")
        return
    env = {**os.environ, "LEAKAUDIT_DTYPE": args.dtype}
    print(f"CPU: {cpu_kind()}; dtype {args.dtype}; {args.rows} Enron messages; demo m0 options {M0}")
    results: dict[str, list[dict[str, float]]] = {"plain": [], "lean": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "p.jsonl"
        write_jsonl(data, ({"text": t} for t in demo_texts(args.rows)))
        for pair in range(args.pairs):
            for name in ("plain", "lean"):
                out = Path(tmp) / f"{name}{pair}"
                os.sync()  # start each run with the previous one's writes on disk
                proc = subprocess.run([sys.executable, __file__, "--child", str(data), str(out),
                                       "1" if name == "lean" else "0"], env=env, capture_output=True, text=True,
                                      check=True)
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                results[name].append(row)
                print(f"{name}: {row['seconds']:.1f} s, wrote {row['written_mb']:,.0f} MiB", flush=True)
                subprocess.run(["rm", "-rf", str(out)], check=True)
    plain = statistics.median(r["seconds"] for r in results["plain"])
    lean = statistics.median(r["seconds"] for r in results["lean"])
    print(f"median plain {plain:.1f} s / lean {lean:.1f} s = {plain / lean:.2f}x")


if __name__ == "__main__":
    main()
