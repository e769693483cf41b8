"""Per-example attention for packed training rows (leakaudit/train/packed_attention.py) against sdpa under the
block-diagonal mask, on the demo's exposure fine-tune: forward + backward of one packed batch of the default
model, the two alternating in one process (fp32, then bf16 autocast), and with `--finetune` whole fine-tunes
with the demo's M0 options, each a fresh process, alternating.

Usage: python bench/packed_attention.py [--repeats 5] [--threads 2] [--finetune 0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from checkpoint_writes import M0, demo_texts  # noqa: E402
from peers import cpu_kind  # noqa: E402

from leakaudit.data.io import write_jsonl  # noqa: E402


def steps(repeats: int) -> None:
    from contextlib import nullcontext

    from leakaudit.models import load_model
    from leakaudit.train import examples as ex
    from leakaudit.train.packed_attention import packed_attention

    lm = load_model("default", dtype="fp32")
    model = lm.model.train()
    items = []
    for text in demo_texts(M0["batch_size"]):
        ids = lm.tokenizer(text)["input_ids"][: M0["max_length"] - 1] + [lm.tokenizer.eos_token_id]
        items.append({"input_ids": ids, "labels": ids})
    batch = ex.PackedCollator(lm.max_length)(items)
    print(f"one packed row of {batch['input_ids'].shape[1]} tokens ({len(items)} examples)")

    def step(per_example: bool, bf16: bool) -> tuple[float, float]:
        ctx = packed_attention(model, lm.device) if per_example else nullcontext()
        t = time.perf_counter()
        with ctx, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t, loss.item()

    for bf16 in (False, True):
        name = "bf16 autocast" if bf16 else "fp32"
        step(False, bf16), step(True, bf16)  # warm-up
        times: dict[bool, list[float]] = {False: [], True: []}
        losses = {}
        for _ in range(repeats):
            for per_example in (False, True):
                t, losses[per_example] = step(per_example, bf16)
                times[per_example].append(t)
        sdpa, per = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name}: sdpa + mask {sdpa:.3f} s, per example {per:.3f} s (medians of {repeats}): "
              f"{sdpa / per:.2f}x; loss {losses[False]:.7f} / {losses[True]:.7f}", flush=True)


def sdpa_attention() -> None:
    """Row-long sdpa under the block-diagonal mask: `packed_attention` replaced in its own module, which finetune
    imports it from when it trains (since 569a711; replaced in finetune's namespace, it went unread and both
    arms trained example by example)."""
    from contextlib import nullcontext

    from leakaudit.train import packed_attention as pa

    pa.packed_attention = lambda model, device: nullcontext()


def child(data: str, out: str, per_example: bool) -> None:
    from leakaudit.train import finetune as ft

    if not per_example:
        sdpa_attention()
    t = time.perf_counter()
    ft.finetune(ft.FinetuneConfig(model="default", data=data, out=out, **M0), progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t}))


def finetunes(pairs: int, dtype: str) -> None:
    env = {**os.environ, "LEAKAUDIT_DTYPE": dtype}
    times: dict[str, list[float]] = {"sdpa": [], "per example": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "p.jsonl"
        write_jsonl(data, ({"text": t} for t in demo_texts(48)))
        for pair in range(pairs):
            for name in times:
                out = Path(tmp) / f"{pair}-{name.replace(' ', '_')}"
                os.sync()
                proc = subprocess.run([sys.executable, __file__, "--child", str(data), str(out),
                                       "1" if name == "per example" else "0"], env=env, capture_output=True,
                                      text=True, check=True)
                times[name].append(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])
                print(f"{dtype} fine-tune, {name}: {times[name][-1]:.1f} s", flush=True)
                subprocess.run(["rm", "-rf", str(out)], check=True)
    a, b = statistics.median(times["sdpa"]), statistics.median(times["per example"])
    print(f"{dtype} fine-tune medians: sdpa {a:.1f} s / per example {b:.1f} s = {a / b:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--finetune", type=int, default=0, metavar="PAIRS", help="also time whole M0 fine-tunes")
    ap.add_argument("--child", nargs=3, metavar=("DATA", "OUT", "PER_EXAMPLE"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["LEAKAUDIT_THREADS"] = str(args.threads)
    if args.child:
        child(args.child[0], args.child[1], args.child[2] == "1")
        return
    print(f"CPU: {cpu_kind()}; {args.threads} threads; default model; demo M0 options {M0}")
    steps(args.repeats)
    for dtype in ("fp32", "bf16") if args.finetune else ():
        finetunes(args.finetune, dtype)


if __name__ == "__main__":
    main()
