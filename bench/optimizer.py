"""AdamW step time, torch's per-tensor loop (what `optim="adamw_torch"` runs on CPU) against the fused kernel
(`adamw_torch_fused`, what `leakaudit finetune` uses outside FSDP), on the default model's weights (full
fine-tuning: every parameter has a gradient), in one run. Median of 5 steps after a warm-up.

    .venv/bin/python bench/optimizer.py [--model default] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time


def step_seconds(params, repeats: int, **kwargs) -> float:
    import torch

    opt = torch.optim.AdamW(params, lr=1e-5, **kwargs)
    opt.step()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        opt.step()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import torch
    from peers import cpu_kind  # noqa: PLC0415

    from leakaudit.models import load_model

    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype="fp32", for_training=True)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    print(f"{args.model}: {sum(p.numel() for p in params) / 1e6:.1f}M parameters in {len(params)} tensors, "
          f"{args.threads} threads; CPU: {cpu_kind()}")
    loop = step_seconds(params, args.repeats, foreach=False)
    foreach = step_seconds(params, args.repeats, foreach=True)
    fused = step_seconds(params, args.repeats, fused=True)
    print("| AdamW | s/step | vs loop |\n|---|---|---|")
    for name, s in (("per-tensor loop (adamw_torch on CPU)", loop), ("foreach", foreach), ("fused", fused)):
        print(f"| {name} | {s:.3f} | {loop / s:.2f}x |")


if __name__ == "__main__":
    main()
