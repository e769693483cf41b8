"""Trainer callbacks: a resumable JSONL training log, loadable checkpoints, and a rich progress bar."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from leakaudit.data.io import open_append


def read_log(path: Path) -> list[dict]:
    """The rows of a train_log.jsonl, without a last line a kill cut short mid-write (the log is appended a row
    per step); a damaged line before the last is an error naming it."""
    from leakaudit.errors import InputError

    lines = [x for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise InputError("damaged training log line; delete the --out folder to train again", file=path,
                             line=n) from None
    return rows


def write_log(path: Path, rows: list[dict]) -> None:
    """Replace a training log with `rows` (temp file + rename: a kill never leaves it half-written)."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


class JsonlLogCallback(TrainerCallback):
    """Append every logged step to train_log.jsonl; on resume, drop rows past the resumed step first."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        if not state.is_world_process_zero or not self.path.exists():
            return
        # the steps up to the checkpoint resumed from; not the end-of-training row, which a run killed after
        # its last step (before finetune_done.json) had written and the resumed Trainer writes again
        write_log(self.path, [r for r in read_log(self.path)
                              if r.get("step", 0) <= state.global_step and "train_runtime" not in r])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "train_loss" in logs and self.path.exists():
            # the Trainer averages the steps since the last resume (0.0 when none were left); the whole run's
            # mean is the mean of the per-step losses logged here
            losses = [r["loss"] for r in read_log(self.path) if "loss" in r]
            logs = {**logs, "train_loss": sum(losses) / len(losses)} if losses else logs
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
               "elapsed_s": round(time.perf_counter() - self.start, 3), **logs}
        with open_append(self.path) as fh:
            fh.write(json.dumps(row) + "\n")


class LoadableCheckpointCallback(TrainerCallback):
    """Make each checkpoint loadable with --model: adapters name the original base spec; PiSSA gets a
    converted adapter in checkpoint-N/adapter/ (the raw PiSSA state stays for resuming)."""

    def __init__(self, config, model, tokenizer):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from leakaudit.train.artifacts import fix_adapter_base, save_loadable

        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.exists():
            return
        (ckpt / "training_args.bin").unlink(missing_ok=True)  # a pickle; not needed to resume
        if self.config.method == "pissa":
            save_loadable(self.model, ckpt / "adapter", self.config, self.tokenizer)
        else:
            fix_adapter_base(ckpt, self.config.model)


class RichProgressCallback(TrainerCallback):
    """A rich progress bar over optimizer steps with the latest loss (stderr)."""

    def __init__(self):
        self.bar = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        from leakaudit.progress import progress_bar

        self.bar = progress_bar(TextColumn("fine-tuning"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), unit="steps")
        self.bar.start()
        self.task = self.bar.add_task("fine-tuning", total=state.max_steps, completed=state.global_step, loss="-")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.update(self.task, loss=f"{logs['loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Stop the bar. Also when training stops on an exception (Ctrl-C, SIGTERM), where the Trainer calls no
        on_train_end: the live bar went on drawing over the `interrupted:` line and left the cursor hidden."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def say_resuming(checkpoint: Path) -> None:
    """One stderr line when a fine-tune goes on from the checkpoint a killed run left: a rerun said only that the
    stage was running, and trained on in silence (PII masked: the path may name a person)."""
    from leakaudit.data.pii_mask import mask_message

    print(mask_message(f"resuming from {checkpoint.name} (a killed run's last checkpoint in {checkpoint.parent})"),
          file=sys.stderr, flush=True)
