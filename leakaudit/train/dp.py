"""DP-SGD fine-tuning through Opacus: per-example clipping + Gaussian noise, with the epsilon spent.

Protects against membership and extraction attacks with a formal bound: any one training example
changes the output distribution by at most (epsilon, delta). Opacus samples batches with Poisson
sampling (expected size batch_size x gradient_accumulation) as its RDP accountant assumes, clips each
example's gradient to `dp_max_grad_norm` and adds noise calibrated to reach `dp_epsilon` after the
configured epochs. Each example's loss is its own mean token NLL, so clipping acts on whole examples.
Default delta: min(1e-5, 1 / n_examples). The result is written to `privacy.json`.
Resume: after each epoch the trainable weights, the optimizer state, the learning-rate schedule's position, the
noise multiplier and the accountant's history are saved, so a killed run continues from the last finished epoch
with the privacy spent so far; each epoch draws its Poisson batches, noise and dropout from its own seed, so the
resumed run draws what an uninterrupted one draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from leakaudit.data.io import open_append, write_json
from leakaudit.errors import InputError, one_line
from leakaudit.train import examples as ex
from leakaudit.train.artifacts import damaged_file, load_saved_weights
from leakaudit.train.callbacks import read_log, say_resuming, write_log


def _tensors(train: list[ex.Example], pad_id: int) -> torch.utils.data.TensorDataset:
    """Fixed-width tensors so Opacus can form (possibly empty) Poisson batches; trimmed per batch later."""
    width = max(len(e.input_ids) for e in train)
    ids = torch.full((len(train), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(train), width), dtype=torch.long)
    labels = torch.full((len(train), width), ex.IGNORE, dtype=torch.long)
    for i, e in enumerate(train):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return torch.utils.data.TensorDataset(ids, mask, labels)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token NLL of each example (shifted labels; -100 ignored)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=ex.IGNORE,
                                            reduction="none")
    counts = (target != ex.IGNORE).sum(1).clamp(min=1)
    return nll.sum(1) / counts


def _load_trainable(model, ckpt: Path, method: str) -> None:
    """Restore the trained weights of an epoch checkpoint into the (wrapped) model."""
    from safetensors.torch import load_file

    if method == "full":
        load_saved_weights(model, ckpt)
    else:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))


def _unsupported(config, exc: BaseException) -> InputError:
    """Opacus computes per-example gradients layer by layer from each layer's input and fails inside its
    hooks on layers it cannot handle (OPT's learned position embeddings take the attention mask; OPT's
    decoder flattens batch and sequence before fc1/fc2): say so on the first step instead of a traceback."""
    from leakaudit.errors import first_line

    targets = f" --target-modules {','.join(config.target_modules)}" if config.target_modules else ""
    return InputError(f"Opacus cannot compute per-example gradients for {config.model} with --method "
                      f"{config.method}{targets} ({first_line(exc)}); LoRA on the attention projections (the "
                      "default --target-modules) works with GPT-NeoX, OPT and Llama", field="--method")


def _check_per_example(dp_model, batch: int, config) -> None:
    """Every trainable weight must hold one gradient per example: a model that flattens batch and tokens
    before a layer (OPT before fc1/fc2) gets one per token there, so Opacus would clip tokens, not examples,
    and the epsilon would not bound what one example changes. Checked on the first step."""
    flat = set()
    for name, p in dp_model.named_parameters():
        sample = getattr(p, "grad_sample", None) if p.requires_grad else None
        sample = sample[0] if isinstance(sample, list) and sample else sample
        if isinstance(sample, torch.Tensor) and sample.shape[0] != batch:
            base = name.split(".lora_")[0]
            flat.add((base if base != name else name.rsplit(".", 1)[0]).split(".")[-1])
    if flat:
        raise InputError(f"Opacus would clip per token, not per example, for {', '.join(sorted(flat))} of "
                         f"{config.model} (the model flattens batch and tokens before them), so the epsilon "
                         "would not hold; use LoRA on the attention projections (the default --target-modules)",
                         field="--target-modules" if config.target_modules else "--method")


@contextmanager
def quiet_empty_batches() -> Iterator[None]:
    """Opacus's "First batch is empty ... may cause issues" log line, which a Poisson draw of no row prints
    raw on stderr when it is the first of a loader's batches (a resumed run's first epoch, a small sampling
    rate): the loop accounts an empty batch and skips it, so it causes none."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("First batch is empty")

    logger = logging.getLogger("opacus.data_loader")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


@contextmanager
def _progress(progress: bool, total: int, done: int) -> Iterator[Callable[[int, float | None], None]]:
    """The fine-tuning bar the Trainer's runs draw (a line now and then in a log): steps and the last loss.
    DP-SGD runs its own loop, which drew none."""
    if not progress:
        yield lambda step, loss: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from leakaudit.progress import progress_bar

    bar = progress_bar(TextColumn("fine-tuning (DP-SGD)"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), unit="steps")
    with bar:
        task = bar.add_task("fine-tuning (DP-SGD)", total=total, completed=done, loss="-")
        yield lambda step, loss: bar.update(task, completed=step, **({} if loss is None else {"loss": f"{loss:.4f}"}))


def train_dp(config, lm, model, train: list[ex.Example], out: Path, progress: bool = True,
             rows_per_user: dict[str, int] | None = None) -> dict:
    """Train with DP-SGD; saves a checkpoint per epoch and the final model; returns the privacy report.
    `rows_per_user` (the training rows of each user, where the data names users) gives the report the group
    size a user-level reading of the bound needs."""
    import json
    import warnings

    from opacus import PrivacyEngine

    from leakaudit.train.artifacts import save_loadable

    if int(__import__("os").environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("DP-SGD runs in a single process here", field="--dp-epsilon")
    n = len(train)
    delta = config.dp_delta or min(1e-5, 1.0 / n)
    epochs = max(1, math.ceil(config.epochs))
    data = _tensors(train, lm.tokenizer.pad_token_id)
    logical_batch = min(n, config.batch_size * config.gradient_accumulation)
    batches = torch.Generator().manual_seed(config.seed)  # Opacus' Poisson sampler draws from it
    loader = torch.utils.data.DataLoader(data, batch_size=logical_batch, shuffle=True, generator=batches)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    with warnings.catch_warnings():  # "Secure RNG turned off ... perfectly fine for experimentation": the noise
        # is torch's seeded generator, as the run's resumability needs; said in docs/finetune.md, not every run
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    state_path = out / "dp_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    common = {"module": model, "optimizer": optimizer, "data_loader": loader,
              "max_grad_norm": config.dp_max_grad_norm, "poisson_sampling": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if state and "noise_multiplier" in state:
                # a resumed run (same config: finetune checks the out dir) needs the same noise; Opacus' search
                # for it evaluates the RDP accountant ~15 times, seconds on a CPU
                dp_model, optimizer, loader = engine.make_private(noise_multiplier=state["noise_multiplier"],
                                                                  **common)
            else:
                dp_model, optimizer, loader = engine.make_private_with_epsilon(
                    target_epsilon=config.dp_epsilon, target_delta=delta, epochs=epochs, **common)
        except (NotImplementedError, ValueError) as exc:
            raise InputError(f"Opacus cannot make this model private: {one_line(exc)}",
                             field="--dp-epsilon") from None
    total = epochs * len(loader) if config.max_steps is None else min(config.max_steps, epochs * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / max(1, total)))
    log_path = out / "train_log.jsonl"
    start_epoch, step, stepped = 0, 0, False
    if state:
        ckpt = out / state["checkpoint"]
        if progress:
            say_resuming(ckpt)
        if (bad := damaged_file(ckpt)) is not None:  # the accountant's history is this checkpoint's alone
            raise InputError(f"{bad} cannot be read, so this DP-SGD run cannot resume; delete the folder to "
                             "train again", file=ckpt)
        _load_trainable(model, ckpt, config.method)
        optimizer.original_optimizer.load_state_dict(torch.load(ckpt / "dp_optimizer.pt", weights_only=True))
        engine.accountant.history = [tuple(h) for h in state["accountant_history"]]
        start_epoch, step = state["epoch"], state["step"]
        with warnings.catch_warnings():  # torch's "lr_scheduler.step() before optimizer.step()": a fast-forward
            # to the killed run's position, which skips nothing (the resumed run's rates are the straight run's)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            for _ in range(state.get("optimizer_steps", step)):  # an empty batch steps neither (older states: all)
                scheduler.step()
        rows = read_log(log_path) if log_path.exists() else []
        write_log(log_path, [r for r in rows if r["step"] <= step])
    else:
        log_path.unlink(missing_ok=True)
    with _progress(progress, total, step) as shown, warnings.catch_warnings(), quiet_empty_batches():
        # torch says so at every step where the first layer's inputs need no gradient (a frozen embedding, as
        # under LoRA): Opacus's per-sample hooks are fine with it; noise to users
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for epoch in range(start_epoch, epochs):
            # each epoch draws its Poisson batches, its noise and its dropout from a seed of its own, so a run
            # resumed at an epoch's end draws what an uninterrupted one draws (one generator seeded once had a
            # resumed run replay epoch 1's batches)
            epoch_seed = int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0])
            batches.manual_seed(epoch_seed)
            torch.manual_seed(epoch_seed)
            for ids, mask, labels in loader:
                if step >= total:
                    break
                step += 1
                if ids.shape[0] == 0:  # an empty Poisson batch still costs privacy: account it, at the rate the
                    # optimizer's own steps are accounted at (expected_batch_size / n is rounded down: less privacy)
                    engine.accountant.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=loader.sample_rate)
                    shown(step, None)
                    continue
                width = int(mask.sum(1).max())
                ids, mask, labels = (t[:, :width].to(lm.device) for t in (ids, mask, labels))
                try:
                    logits = dp_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    loss = per_example_loss(logits, labels).mean()
                    loss.backward()
                    if not stepped:
                        _check_per_example(dp_model, int(ids.shape[0]), config)
                    optimizer.step()
                except (AttributeError, RuntimeError) as exc:
                    if stepped or isinstance(exc, torch.OutOfMemoryError):
                        raise
                    raise _unsupported(config, exc) from None
                stepped = True
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                with open_append(log_path) as fh:
                    fh.write(json.dumps({"step": step, "epoch": round(epoch + 1, 4), "loss": loss.item(),
                                         "learning_rate": scheduler.get_last_lr()[0], "batch": int(ids.shape[0])})
                             + "\n")
                shown(step, loss.item())
            with open_append(log_path) as fh:
                fh.write(json.dumps({"step": step, "epoch": epoch + 1, "epsilon": engine.get_epsilon(delta)}) + "\n")
            ckpt = out / f"checkpoint-{step}"
            save_loadable(model, ckpt, config, lm.tokenizer)
            torch.save(optimizer.original_optimizer.state_dict(), ckpt / "dp_optimizer.pt")
            write_json(state_path, {"checkpoint": ckpt.name, "epoch": epoch + 1, "step": step,
                                    "optimizer_steps": scheduler.last_epoch,
                                    "noise_multiplier": optimizer.noise_multiplier,
                                    "accountant_history": [list(h) for h in engine.accountant.history]})
    # the rate Opacus samples and accounts at: 1 / batches per epoch, which is not batch / n when the batch
    # does not divide n (n 10, batch 4: 1/3, not 0.4; the epsilon recomputed from 0.4 was 9.17, not 8.00)
    # the unit the bound is for: one training row (a plain row longer than max_length is refused before
    # training, so rows and examples are one); a user with k rows is protected as a group of k (epsilon up to
    # k times as large, delta grows too): k is the most rows a user trained (max_rows_per_user, where the data
    # names users), which max_samples_per_user caps
    report = {"epsilon": engine.get_epsilon(delta), "target_epsilon": config.dp_epsilon, "delta": delta,
              "unit": "training row (example-level DP)", "n_rows": n,
              "max_rows_per_user": max(rows_per_user.values(), default=0) if rows_per_user else None,
              "rows_per_user_cap": config.max_samples_per_user,
              "noise_multiplier": optimizer.noise_multiplier, "dp_max_grad_norm": config.dp_max_grad_norm,
              "expected_batch_size": loader.sample_rate * n, "sample_rate": loader.sample_rate, "steps": step,
              "epochs": epochs, "accountant": "rdp"}
    save_loadable(model, out, config, lm.tokenizer)
    write_json(out / "privacy.json", report)
    return report
