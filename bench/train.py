"""Benchmark: LoRA training tokens/s of `leakaudit finetune` vs a plain transformers Trainer, one run.

Both train the same LoRA (r=8 on q_proj,v_proj) on the same texts of the default model, fp32, for the
same number of optimizer steps of 8 examples each. The baseline is the plain recipe: Trainer with
per-device batch 1 x gradient accumulation 8 and every example padded to max length (512). leakaudit
packs each batch of 8 into one row (no padding, exact block-diagonal attention). Tokens/s counts real
(non-padding) tokens over the Trainer's own train_runtime, so model loading is excluded from both.

On a GPU (`--device cuda`) leakaudit uses bf16 autocast where the GPU supports it; the baseline stays
fp32, as the plain recipe does. `--model random:pythia-1.4b` times a paper-scale shape without a hub.

Usage: .venv/bin/python bench/train.py [--steps 2] [--model default] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("LEAKAUDIT_DTYPE", "fp32")


def texts(n: int) -> list[str]:
    """Varied-length instruction texts from the shipped self-instruct seeds."""
    from leakaudit import resources

    rows = [json.loads(x) for x in resources.path("self-instruct-seed", "seed_tasks.jsonl").read_text().splitlines()]
    out = []
    for r in rows:
        inst = r["instances"][0]
        out.append(f"{r['instruction']}\n{inst['input']}\n{inst['output']}".strip())
        if len(out) == n:
            break
    return out


def baseline(model_spec: str, data: list[str], steps: int, max_length: int, device: str) -> float:
    """Plain Trainer: batch 1 x accumulation 8, padding to max length, fp32. Returns train_runtime (s)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from leakaudit.models import load_model
    from leakaudit.train.finetune import target_modules_for

    lm = load_model(model_spec, device=device, dtype="fp32", for_training=True)
    tok = lm.tokenizer
    model = get_peft_model(lm.model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                                                target_modules=target_modules_for(lm.model, None)))

    class Padded(torch.utils.data.Dataset):
        def __init__(self):
            enc = tok([t + tok.eos_token for t in data], padding="max_length", truncation=True,
                      max_length=max_length, return_tensors="pt")
            self.ids, self.mask = enc["input_ids"], enc["attention_mask"]

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            labels = self.ids[i].clone()
            labels[self.mask[i] == 0] = -100
            return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=1, gradient_accumulation_steps=8,
                                 max_steps=steps, learning_rate=2e-6, save_strategy="no", report_to="none",
                                 use_cpu=lm.device.type == "cpu", disable_tqdm=True, logging_steps=1000)
        result = Trainer(model=model, args=args, train_dataset=Padded()).train()
    return float(result.metrics["train_runtime"])


def leakaudit_run(model_spec: str, data: list[str], steps: int, max_length: int, device: str) -> float:
    """`leakaudit finetune` with packing. Returns the Trainer's train_runtime (s) from train_log.jsonl."""
    import torch

    from leakaudit.models import resolve_device
    from leakaudit.train.finetune import FinetuneConfig, finetune

    # Explicit: LEAKAUDIT_DTYPE=fp32 (set above) would otherwise turn autocast off on the GPU too.
    bf16 = resolve_device(device).type == "cuda" and torch.cuda.is_bf16_supported()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in data))
        out = finetune(FinetuneConfig(model=model_spec, data=str(path), out=str(Path(tmp) / "out"), method="lora",
                                      batch_size=8, gradient_accumulation=1, max_steps=steps,
                                      max_length=max_length, save_steps=10_000, device=device, bf16=bf16),
                       progress=False)
        rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    print("leakaudit step end times (s):", [r["elapsed_s"] for r in rows if "loss" in r])
    return float(next(r["train_runtime"] for r in rows if "train_runtime" in r))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: auto)")
    a = ap.parse_args()
    from leakaudit.models import build_tiny_tokenizer, load_model, resolve_device

    data = texts(8 * a.steps)
    tok = build_tiny_tokenizer() if a.model.startswith("random:") else load_model(a.model, dtype="fp32").tokenizer
    n_tokens = sum(len(tok(t)["input_ids"]) + 1 for t in data)
    if resolve_device(a.device).type == "cuda":  # load kernels and cuBLAS handles before timing either run
        leakaudit_run(a.model, data[:8], 1, a.max_length, a.device)
        baseline(a.model, data[:8], 1, a.max_length, a.device)
    ours = leakaudit_run(a.model, data, a.steps, a.max_length, a.device)
    base = baseline(a.model, data, a.steps, a.max_length, a.device)
    print(f"model={a.model} device={resolve_device(a.device)} examples={len(data)} real_tokens={n_tokens} "
          f"mean_len={n_tokens / len(data):.1f} max_length={a.max_length}")
    print(f"baseline Trainer (pad to max, batch 1 x accum 8): {base:.1f}s  {n_tokens / base:.1f} tok/s")
    print(f"leakaudit finetune (packed batch 8):            {ours:.1f}s  {n_tokens / ours:.1f} tok/s")
    print(f"speedup: {base / ours:.2f}x")


if __name__ == "__main__":
    main()
