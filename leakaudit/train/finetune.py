"""Fine-tune a causal LM (full, LoRA, DoRA, PiSSA) on plain, instruction or chat data, resumably.

Engine: the transformers Trainer, which gives epoch checkpoints, exact resume (optimizer, scheduler,
RNG and data position), gradient accumulation, and DDP/FSDP under `accelerate launch` / `torchrun`
without extra code. DP-SGD runs through Opacus instead (see leakaudit.train.dp).

Defaults follow the original study's scripts: per-device batch 1, gradient accumulation 8, 4 epochs,
lr 2e-6, linear schedule, AdamW, weight decay 0, warmup 0.

The output dir holds the final model (full) or adapter (LoRA/DoRA/PiSSA, with base_model_name_or_path =
the spec trained from), `train_log.jsonl`, `defenses.json`, `finetune_config.json`, and one
`checkpoint-N/` per epoch. Every one of them loads with `--model DIR`; for PiSSA the loadable adapter of a
checkpoint is `checkpoint-N/adapter/` (the checkpoint root keeps the raw PiSSA state needed to resume).
Rerunning the same command resumes from the last checkpoint; a finished run is returned as is, and its
checkpoints keep their weights but drop the optimizer, scheduler and RNG states that only a resume reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from leakaudit.data.chat import validate_messages
from leakaudit.data.io import read_rows, user_value, write_json
from leakaudit.distributed import check_rendezvous, is_main, world
from leakaudit.errors import InputError
from leakaudit.models import attention_kernels
from leakaudit.models.tokens import encode
from leakaudit.options import Seed, numbers_are_not_booleans
from leakaudit.train import examples as ex
from leakaudit.train.artifacts import (
    DONE_MARKER,
    drop_resume_state,
    last_checkpoint,
    link_loadable,
    load_saved_weights,
    save_loadable,
)
from leakaudit.train.defenses import HELDOUT_RULE, DefenseReport, dedup_and_cap, pii_scrubber
from leakaudit.warn import say_lookalike_users, warn_once

DEFAULT_TARGETS = {"gpt_neox": ["query_key_value"], "opt": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"]}


class FinetuneConfig(BaseModel):
    """Every option of `leakaudit finetune` (CLI options are these names in kebab-case)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # --epochs inf overflowed, --learning-rate inf trained on NaN

    model: str
    data: str
    out: str
    method: Literal["full", "lora", "dora", "pissa"] = "lora"
    format: Literal["plain", "instruction", "chat"] = "plain"
    epochs: float = Field(4, gt=0)
    learning_rate: float = Field(2e-6, gt=0)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation: int = Field(8, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                          "constant_with_warmup", "inverse_sqrt"] = "linear"  # those needing no extra arguments
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = None
    max_length: int = Field(512, ge=2)
    packing: bool = True
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    loss_on: Literal["assistant", "all"] = "assistant"
    user_field: str | None = None
    # defenses
    max_samples_per_user: int | None = Field(None, ge=1)
    dedup_within_user: bool = False
    max_grad_norm: float | None = Field(1.0, gt=0)
    early_stopping_patience: int | None = Field(None, ge=1)
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    scrub_pii: bool = False
    dp_epsilon: float | None = Field(None, gt=0)
    dp_delta: float | None = Field(None, gt=0, lt=1)
    dp_max_grad_norm: float = Field(1.0, gt=0)
    # engine
    seed: Seed = 0
    max_steps: int | None = Field(None, ge=1)
    save_steps: int | None = Field(None, ge=1)
    bf16: bool | None = None  # None: models.default_autocast_bf16 (LEAKAUDIT_DTYPE, else the hardware)
    device: str | None = None
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the GPUs (accelerate FSDP2)

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_modules(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [m.strip() for m in v.split(",") if m.strip()] or None
        return v

    _numbers_are_not_booleans = field_validator("*", mode="before")(numbers_are_not_booleans)

    @field_validator("max_grad_norm", mode="before")
    @classmethod
    def _zero_clip_norm_is_off(cls, v: Any) -> Any:
        """0 turns clipping off, as documented and as the CLI's --max-grad-norm 0 does."""
        return None if v == 0 and not isinstance(v, bool) else v

    @field_validator("dp_epsilon")
    @classmethod
    def _dp_runs_its_own_loop(cls, v: Any, info: ValidationInfo) -> Any:
        """DP-SGD trains in its own Opacus loop: whole epochs, linear decay without warmup, no held-out data.
        An option that loop would silently ignore is refused."""
        if v is None:
            return v
        d = info.data
        if d.get("method") in ("dora", "pissa"):
            raise ValueError("DP-SGD supports method lora or full")
        for name, ignored in (("early_stopping_patience", d.get("early_stopping_patience")),
                              ("eval_fraction", d.get("eval_fraction")),
                              ("warmup_steps", d.get("warmup_steps")),
                              ("lr_scheduler", d.get("lr_scheduler", "linear") != "linear")):
            if ignored:
                raise ValueError(f"DP-SGD's training loop has no {name} (it decays the learning rate linearly "
                                 "from the first step and holds nothing out): drop it or train without DP")
        epochs = d.get("epochs")
        if epochs is not None and epochs != int(epochs):
            raise ValueError(f"DP-SGD trains whole epochs (its accountant counts Poisson-sampled epochs), not "
                             f"{epochs:g}: use a whole number, or max_steps")
        return v

    @field_validator("save_steps", "fsdp")
    @classmethod
    def _not_with_dp(cls, v: Any, info: ValidationInfo) -> Any:
        """DP-SGD checkpoints once per epoch in one process: these would be silently ignored."""
        if v and info.data.get("dp_epsilon") is not None:
            raise ValueError("not available with DP-SGD (dp_epsilon): it checkpoints each epoch, in one process")
        return v

    @model_validator(mode="before")
    @classmethod
    def _no_batch_clip_with_dp(cls, data: Any) -> Any:
        """DP-SGD clips each example at dp_max_grad_norm; a max_grad_norm given beside it (the batch's clip)
        was silently unused. Given as 0 or None (off) it asks for nothing DP does not do."""
        if isinstance(data, dict) and data.get("dp_epsilon") is not None and data.get("max_grad_norm") not in (
                None, 0):
            # raised at max_grad_norm's own key: a plain ValueError here has no field, so the error named
            # `--option` / `finetune.NAME.options.options` and the line of `options:`, not the option
            msg = ("max_grad_norm (the batch's clip) is not used by DP-SGD, which clips each example at "
                   "dp_max_grad_norm: drop it, or set dp_max_grad_norm")
            raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(
                type=PydanticCustomError("value_error", msg), loc=("max_grad_norm",),
                input=data["max_grad_norm"])])
        return data

    @model_validator(mode="before")
    @classmethod
    def _early_stopping_holds_out(cls, data: Any) -> Any:
        """Early stopping needs held-out data to watch: without `eval_fraction` it holds out 10% (before, an
        experiment file silently trained without stopping)."""
        if isinstance(data, dict) and data.get("early_stopping_patience") and not data.get("eval_fraction"):
            data = {**data, "eval_fraction": 0.1}
        return data

    @field_validator("max_samples_per_user", "dedup_within_user")
    @classmethod
    def _per_user_defenses_need_users(cls, v: Any, info: ValidationInfo) -> Any:
        """A per-user cap or dedup without `user_field` would treat the whole training set as one user."""
        if v and info.data.get("user_field") is None:
            raise ValueError("needs user_field (without it the whole training set counts as one user)")
        return v

    def fingerprint(self) -> str:
        """Hash of everything that changes the trained weights (to refuse resuming a different run). Local
        data and model paths enter by content, so the same run reached by another path (`--out kk` and then
        `--out $PWD/kk`, a moved folder) resumes."""
        from leakaudit.models import dir_fingerprint, file_sha256

        keep = self.model_dump(exclude={"out", "device", "fsdp"})
        if (rule := heldout_rule(self)) is not None:  # a run killed under the row-by-row split is not resumed
            keep["heldout"] = rule
        for name in ("model", "data"):
            p = Path(keep[name]).expanduser()
            if p.exists():
                keep[name] = dir_fingerprint(p) if p.is_dir() else file_sha256(p)
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def heldout_rule(config: FinetuneConfig) -> str | None:
    """The held-out split's rule where the run holds data out: in its fingerprint and its finetune_config.json,
    so that a run of an earlier release is refused naming the split, not files that did not change."""
    return HELDOUT_RULE if config.eval_fraction > 0 or config.early_stopping_patience is not None else None


# ----------------------------------------------------------------------------------------- data
def _field(row: dict[str, Any], name: str, path: Path, line: int, kind: type = str) -> Any:
    if name not in row:
        raise InputError(f"missing (row has: {', '.join(sorted(row))})", file=path, line=line, field=name)
    value = row[name]
    if kind is str and (not isinstance(value, str) or not value.strip()):
        raise InputError("must be a non-empty string", file=path, line=line, field=name)
    return value


def load_examples(config: FinetuneConfig, tokenizer, max_length: int | None = None
                  ) -> tuple[list[ex.Example], list[ex.Example], DefenseReport]:
    """Read, validate, defend and tokenise the data; returns (train, held-out, what the defenses did).

    `max_length`: tokens per example when it must be below `config.max_length` (the model's context)."""
    path = Path(config.data)
    max_length = max_length or config.max_length
    rows = read_rows(path)
    items: list[tuple[str | None, Any]] = []  # (user, content) per row
    users: list[tuple[str, int]] = []  # (user, line), for the look-alike check
    for line, row in rows:
        user = None
        if config.user_field:
            user = user_value(_field(row, config.user_field, path, line, kind=object), path, line, config.user_field)
            users.append((user, line))
        if config.format == "plain":
            content: Any = _field(row, config.text_field, path, line)
        elif config.format == "instruction":
            content = (_field(row, config.prompt_field, path, line), _field(row, config.response_field, path, line))
        else:
            content = validate_messages(_field(row, config.messages_field, path, line, kind=object), path, line,
                                        config.messages_field)
            if config.loss_on == "assistant" and not any(m["role"] == "assistant" for m in content):
                # nothing of it is trained on: it was left out under a warning that blamed --max-length
                # both commands that train on chat rows named: `backdoor finetune` has no --loss-on
                raise InputError("has no assistant turn: with the loss on the assistant turns alone nothing of it is "
                                 "trained on; add its reply, drop the row, or train on every turn (finetune "
                                 "--loss-on all; backdoor finetune without --mask-user)", file=path, line=line,
                                 field=config.messages_field)
        items.append((user, content))
    if users:
        say_lookalike_users(users, path, config.user_field)
    keep, report = dedup_and_cap([(u, json.dumps(c, sort_keys=True)) for u, c in items],
                                 dedup_within_user=config.dedup_within_user,
                                 max_samples_per_user=config.max_samples_per_user)
    items = [items[i] for i in keep]
    lines = [rows[i][0] for i in keep]
    if config.scrub_pii:
        items, report.pii_replaced = _scrub(items, config.format, config.seed)
    contents = [c for _, c in items]
    if not contents:
        raise InputError("no training rows left after the defenses", file=path)
    rng = random.Random(config.seed)
    order = list(range(len(contents)))
    n_eval = int(round(len(contents) * config.eval_fraction))
    if config.eval_fraction > 0 and n_eval == 0:
        # a fraction of a few rows rounds to none: evaluation (and early stopping) would silently not happen
        n_eval = 1
    held: set[int] = set(rng.sample(order, n_eval)) if n_eval else set()
    if held:  # every copy of a held-out text is held out: a copy left in training put trained text in the eval
        # loss early stopping watches (3 of the 25 held-out messages of study 3's `early` arm, seed 0)
        keys = [json.dumps(c, sort_keys=True) for c in contents]
        held_keys = {keys[i] for i in held}
        held = {i for i in order if keys[i] in held_keys}
        n_eval = len(held)
    if n_eval and n_eval == len(contents):
        raise InputError(f"the held-out split would take every row ({len(contents)} left after the defenses)",
                         field="--eval-fraction")
    if held and report.per_user_out:  # the rows each user trains: held-out rows are evaluated, not trained on
        trained = Counter(str(items[i][0]) for i in order if i not in held and items[i][0] is not None)
        report.per_user_out = {u: trained[u] for u in report.per_user_out}

    def build(idx: list[int]) -> list[ex.Example]:
        if config.format == "plain":
            return ex.plain_examples(tokenizer, [contents[i] for i in idx], max_length)
        if config.format == "instruction":
            return [ex.instruction_example(tokenizer, *contents[i], max_length) for i in idx]
        try:
            return [ex.chat_example(tokenizer, contents[i], config.loss_on, max_length) for i in idx]
        except ValueError as exc:
            raise InputError(str(exc), file=path, field=config.messages_field) from None

    if config.dp_epsilon is not None and config.format == "plain":
        _one_example_per_row(tokenizer, contents, lines, max_length, path)
    train = build([i for i in order if i not in held])
    held_out = build(sorted(held))
    built = len(train)
    train = [e for e in train if any(label != ex.IGNORE for label in e.labels[1:])]
    if not train:
        raise InputError("no example has a token to train on (all truncated or masked)", file=path,
                         field="--max-length")
    report.dropped_no_loss_tokens = built - len(train)
    if report.dropped_no_loss_tokens:  # e.g. a prompt longer than max_length cuts off the whole response
        warn_once(f"{path.name}: {report.dropped_no_loss_tokens} of {built} training examples have no token to "
                  f"train on within {max_length} tokens (the part the loss is on is cut off) and are left out; "
                  f"raise --max-length or shorten those rows")
    return train, held_out, report


def _one_example_per_row(tokenizer, texts: list[str], lines: list[int], max_length: int, path: Path) -> None:
    """DP-SGD samples, clips and accounts per training example; a plain row longer than max_length is split
    into several, and was then protected only as a group of them (one 300-word row made 63 of 70 examples
    while privacy.json said epsilon 8). Refused, naming the first such row."""
    eos = len(ex._eos(tokenizer))
    lengths = [len(ids) + eos for ids in encode(tokenizer, texts)]  # as plain_examples counts them
    split = [i for i, n in enumerate(lengths) if n // max_length + (n % max_length >= 2) > 1]
    if split:
        rows = "1 row is" if len(split) == 1 else f"{len(split)} rows are"
        raise InputError(f"{rows} longer than {max_length} tokens and would be split into several training "
                         "examples, which DP-SGD protects one by one, not as the row: raise --max-length (up to the "
                         "model's context) or shorten the rows (a dataset's max_chars)", file=path,
                         line=lines[split[0]], field="--dp-epsilon")


def _scrub(items: list[tuple[str | None, Any]], fmt: str, seed: int) -> tuple[list[tuple[str | None, Any]], int]:
    scrub = pii_scrubber(seed)
    if fmt == "plain":
        texts, n = scrub([c for _, c in items])
        return [(u, t) for (u, _), t in zip(items, texts, strict=True)], n
    if fmt == "instruction":
        flat = [s for _, c in items for s in c]
        texts, n = scrub(flat)
        return [(u, (texts[2 * i], texts[2 * i + 1])) for i, (u, _) in enumerate(items)], n
    flat = [m["content"] for _, c in items for m in c]
    texts, n = scrub(flat)
    it = iter(texts)
    return [(u, [{"role": m["role"], "content": next(it)} for m in c]) for u, c in items], n


# ----------------------------------------------------------------------------------------- model
def target_modules_for(model, requested: list[str] | None) -> list[str] | None:
    """Requested modules, else the study's defaults per architecture, else PEFT's own default (None)."""
    if requested:
        names = {n.split(".")[-1] for n, _ in model.named_modules()}
        missing = [m for m in requested if m not in names]
        if missing:
            raise InputError(f"no module named {', '.join(missing)} in this model", field="--target-modules")
        return requested
    return DEFAULT_TARGETS.get(getattr(model.config, "model_type", ""))


def check_base(spec: str, kind: str | None = None) -> None:
    """Fine-tuning starts from a full model: an adapter is refused, by the commands before they write anything
    (`finetune` left an empty --out, `backdoor finetune` its downstream data). `kind`: what resolve_spec found;
    without it only a local adapter dir is recognised, cheaply (nothing is built, converted or fetched)."""
    p = Path(spec).expanduser()
    if kind == "adapter" or (kind is None and p.is_dir() and (p / "adapter_config.json").exists()):
        raise InputError("fine-tuning starts from a full model; merge the adapter first (leakaudit merge)",
                         field="--model")


def build_model(config: FinetuneConfig, out: Path):
    """Load the base in fp32 and wrap it for the chosen method."""
    from leakaudit.models import load_model, resolve_spec

    check_base(config.model, resolve_spec(config.model)[0])
    lm = load_model(config.model, device=config.device, dtype="fp32", for_training=True)
    model = lm.model
    if config.method == "full":
        return lm, model
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout,
                          target_modules=target_modules_for(model, config.target_modules),
                          use_dora=config.method == "dora",
                          init_lora_weights="pissa" if config.method == "pissa" else True)
    return lm, get_peft_model(model, peft_cfg)


def save_pissa_init(model, out: Path) -> None:
    """Keep the initial PiSSA adapter: saves then convert to a plain LoRA against the *original* base."""
    init_dir = out / "pissa_init"
    if is_main() and not (init_dir / "adapter_config.json").exists():
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(str(init_dir))
        model.peft_config["default"].init_lora_weights = "pissa"


# ----------------------------------------------------------------------------------------- run
def _what_changed(previous: dict[str, Any], config: FinetuneConfig) -> str:
    """The options that differ from an earlier run's finetune_config.json (it said only "different options")."""
    now = config.model_dump(mode="json", exclude={"out", "device", "fsdp"})
    changed = [f"{k}: {previous[k]!r} then, {v!r} now" for k, v in now.items() if k in previous and previous[k] != v]
    if (rule := heldout_rule(config)) is not None and previous.get("heldout") != rule:
        changed.insert(0, "the held-out split: rows one by one then (an earlier release), every copy of a held-out "
                          "text now")
    if changed:
        return "; ".join(changed[:3]) + (f"; {len(changed) - 3} more" if len(changed) > 3 else "")
    return "the same options, but the content of the data or model files changed"


def check_out(config: FinetuneConfig, out: Path) -> bool:
    """True when `out` already holds this finished run; refuse an out dir holding a different run."""
    if out.exists() and not out.is_dir():  # e.g. the data file itself: NotADirectoryError from pathlib
        raise InputError("is a file, not an output directory; use a new --out", file=out, field="--out")
    saved = out / "finetune_config.json"
    if saved.exists():
        previous = json.loads(saved.read_text())
        if previous.get("fingerprint") != config.fingerprint():
            raise InputError(f"this output dir holds a run with different options ({_what_changed(previous, config)});"
                             " use a new --out, or rerun with the options it was started with", file=out, field="--out")
        done = (out / DONE_MARKER).exists()
        before, now = previous.get("processes"), world()[1]
        if not done and before is not None and before != now:
            # batch_size is per process: resumed with another count, the run went on with another step batch
            # from a data position counted in the old one (81 steps instead of 42, epochs going backwards)
            raise InputError(f"this output dir holds an unfinished run trained by {before} process"
                             f"{'es' if before != 1 else ''}; resume it with {before} (it has {now} now) or use "
                             "a new --out", file=out, field="--out")
        return done
    if is_main() and out.exists() and any(out.iterdir()):
        raise InputError("output dir exists and is not a leakaudit fine-tuning run; use a new --out",
                         file=out, field="--out")
    return False


def finetune(config: FinetuneConfig, progress: bool = True, callbacks: list | None = None) -> Path:
    """Train as configured and return the output dir (loadable with models.load_model(str(dir)))."""
    out = Path(config.out)
    if check_out(config, out):
        if is_main():
            drop_resume_state(out)  # a kill between the done marker and this cleanup left them: finish it
        return out
    _check_engine(config)
    check_rendezvous()  # the Trainer joins a launch's group of its own accord
    torch.manual_seed(config.seed)
    lm, model = build_model(config, out)
    # bad data fails before anything is written
    train, held_out, report = load_examples(config, lm.tokenizer, fit_context(config, lm))
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        # `processes`: batch_size is per process (an experiment's step batch was shared among them)
        rule = heldout_rule(config)
        write_json(out / "finetune_config.json", {"fingerprint": config.fingerprint(), **config.model_dump(),
                                                   **({"heldout": rule} if rule else {}), "processes": world()[1]})
        write_json(out / "defenses.json", {**report.__dict__, "n_train_examples": len(train),
                                           "n_heldout_examples": len(held_out)})
    if config.method == "pissa":
        save_pissa_init(model, out)
    if config.dp_epsilon is not None:
        from leakaudit.train.dp import train_dp

        step = train_dp(config, lm, model, train, out, progress=progress,
                        rows_per_user=report.per_user_out)["steps"]
    else:
        with _environ_kept():
            step = _train_trainer(config, lm, model, train, held_out, out, progress, callbacks or [])
    if is_main():
        # `step`: the optimizer step of the weights saved as the final model (the best checkpoint's under
        # early stopping), so a per-checkpoint curve can place the final model on the training-step axis
        write_json(out / DONE_MARKER, {"fingerprint": config.fingerprint(), "step": step})
        drop_resume_state(out)  # after the marker: a kill in between must not resume without them
    return out


@contextmanager
def _environ_kept() -> Iterator[None]:
    """Leave os.environ as training found it. accelerate records its setup there and never clears it
    (ACCELERATE_USE_FSDP=true after an FSDP run): in a process that fine-tunes again (`leakaudit run`, a
    notebook) the next Trainer read it and sharded a run that asked for DDP."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


def _last_step_checkpoint(ckpt: Path | None) -> Path | None:
    """`ckpt` when the Trainer saved it at the run's last step (so it holds the final weights), else None."""
    if ckpt is None:
        return None
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return ckpt if state.get("global_step", 0) >= state.get("max_steps", float("inf")) else None


def _trainer_class(lean: bool):
    from transformers import Trainer

    class LeakauditTrainer(Trainer):
        """The Trainer with four fixes around checkpoints (private hooks; pyproject asks for transformers >= 5.3,
        the first with `_run_epoch`):
        - a run resumed from a checkpoint saved when training was to stop (its last step, or early stopping's
          decision) trains no more (the Trainer would take another step, past max_steps, or go on to the next
          evaluation);
        - a full model's checkpoint is loaded back (on resume, and as the best model under early stopping)
          through transformers' loader, which maps the saved names to the model's (`load_saved_weights`);
        - a PiSSA checkpoint's converted adapter in checkpoint-N/adapter/ is not loaded as a second adapter
          (the Trainer loads every adapter subfolder, and the next conversion then failed);
        - with `lean`, the last step's checkpoint leaves out the optimizer and scheduler states: only a resume
          reads them, a run killed after that checkpoint resumes into no training (above), and a finished run
          deletes them anyway. A full fine-tune of the default model writes 1.1 GB less (AdamW's two
          moments): ~8 s of a ~100 s demo stage on a disk that takes ~120 MB/s once its write cache is full
          (BENCHMARKS.md)."""

        def _run_epoch(self, *args, **kwargs):
            saved_control = self.state.stateful_callbacks.get("TrainerControl", {}).get("args", {})
            if self.state.global_step >= self.state.max_steps > 0 or saved_control.get("should_training_stop"):
                self.control.should_training_stop = True
                return None
            return super()._run_epoch(*args, **kwargs)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            model = model or self.model
            if getattr(getattr(model, "peft_config", {}).get("default"), "init_lora_weights", None) == "pissa":
                model.load_adapter(resume_from_checkpoint, "default", is_trainable=True)
            elif self._plain_weights(model, resume_from_checkpoint):
                load_saved_weights(model, resume_from_checkpoint)
            else:
                super()._load_from_checkpoint(resume_from_checkpoint, model)

        def _load_best_model(self) -> None:
            if self._plain_weights(self.model, self.state.best_model_checkpoint):
                load_saved_weights(self.model, self.state.best_model_checkpoint)
            else:
                super()._load_best_model()

        def _plain_weights(self, model, checkpoint: str) -> bool:
            """A whole model saved with save_pretrained (not an adapter, not FSDP shards)."""
            return (not hasattr(model, "peft_config") and not self.is_fsdp_enabled
                    and any((Path(checkpoint) / name).exists()
                            for name in ("model.safetensors", "model.safetensors.index.json")))

        def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
            if not lean or self.state.global_step < self.state.max_steps:
                super()._save_optimizer_and_scheduler(output_dir)

    return LeakauditTrainer


def fit_context(config: FinetuneConfig, lm) -> int:
    """Tokens per example: `--max-length`, clamped to the model's context (with one warning when the option was
    given; the default, 512, is clamped silently), because longer sequences index past learned position
    embeddings (OPT: IndexError) or leave the trained range (RoPE). The fingerprint keeps the option as given,
    so rerunning the same command still resumes."""
    if config.max_length <= lm.max_length:
        return config.max_length
    if "max_length" in config.model_fields_set:
        warn_once(f"--max-length {config.max_length} is longer than the context of {config.model} "
                  f"({lm.max_length} tokens); training on examples of at most {lm.max_length} tokens")
    return lm.max_length


def _check_engine(config: FinetuneConfig) -> None:
    """Refuse engine combinations that would fail late (after loading the model)."""
    from leakaudit.models import resolve_device

    if config.fsdp and config.dp_epsilon is not None:
        raise InputError("DP-SGD (Opacus) runs in one process; drop --fsdp", field="--fsdp")
    if config.dp_epsilon is not None and world()[1] > 1:
        # here, not only in train_dp: refused there, after the model loaded, the out dir kept a config saying
        # "trained by N processes", and the one-process rerun the error asks for was refused as a resume
        raise InputError(f"DP-SGD (Opacus) runs in one process, and this is one of {world()[1]} launched ones: "
                         "run this fine-tune without the launcher", field="--dp-epsilon")
    if config.fsdp and config.method == "pissa":
        raise InputError("PiSSA's adapter conversion needs the whole adapter in one process; use lora/dora "
                         "with --fsdp, or DDP for PiSSA", field="--fsdp")
    if config.fsdp and resolve_device(config.device).type != "cuda":
        raise InputError("FSDP shards over GPUs and accelerate runs it on accelerators only; on CPU scale out "
                         "with DDP instead (torchrun --nproc-per-node N -m leakaudit finetune ...)", field="--fsdp")


def fsdp_arguments(on: bool) -> dict[str, Any]:
    """TrainingArguments for FSDP2, every layer its own shard unit, parameters resharded after each forward.
    Why two spellings: transformers 5.3 takes the options as a string ("full_shard auto_wrap"; `fsdp=True`
    there is full_shard without wrapping the layers), later releases (the fsdp_config API) say the string is
    deprecated and going, and wrap the layers by default. Resharding is asked for by name: 5.3 left it off for
    FSDP2 unless told (a fine-tune held every layer's full weights from forward to backward), later ones on."""
    from transformers import TrainingArguments

    if not on:
        return {"fsdp": None, "fsdp_config": None}
    if hasattr(TrainingArguments, "_apply_legacy_fsdp_to_config"):  # the fsdp_config API
        return {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True}}
    return {"fsdp": "full_shard auto_wrap", "fsdp_config": {"version": 2, "reshard_after_forward": True}}


def _use_bf16(config: FinetuneConfig, device: torch.device) -> bool:
    """`--bf16/--no-bf16` when given, else the one policy shared with the load dtype (LEAKAUDIT_DTYPE)."""
    from leakaudit.models import default_autocast_bf16

    return config.bf16 if config.bf16 is not None else default_autocast_bf16(device)


class _PadAlignmentNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("The tokenizer has new PAD/BOS/EOS tokens")
                    and re.search(r"Updated tokens: \{'pad_token_id': \d+\}\.$", message))


def _quiet_token_alignment() -> None:
    """The Trainer notes on every fine-tune of a model whose config's pad token differs from the tokenizer's
    that it aligned the config: where only the pad differs, that pad is the one leakaudit's loader gave the
    tokenizer (models/load.py), and the note, a `[transformers]` line in every run's log, says nothing the user
    did. A BOS or EOS the user's tokenizer changed is still said; the alignment itself stays."""
    trainer_utils = logging.getLogger("transformers.trainer_utils")
    if not any(isinstance(f, _PadAlignmentNote) for f in trainer_utils.filters):
        trainer_utils.addFilter(_PadAlignmentNote())


def _train_trainer(config: FinetuneConfig, lm, model, train: list[ex.Example], held_out: list[ex.Example],
                   out: Path, progress: bool, extra_callbacks: list) -> int:
    """Train with the HF Trainer; returns the optimizer step of the weights saved as the final model."""
    from transformers import EarlyStoppingCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from leakaudit.train.callbacks import (
        JsonlLogCallback,
        LoadableCheckpointCallback,
        RichProgressCallback,
        say_resuming,
    )
    from leakaudit.train.packed_attention import packed_attention  # imports transformers' modeling: not for a
    # plan check, which reads FinetuneConfig only (a cached rerun skips ~2 s of imports)

    _quiet_token_alignment()

    pack = config.packing and config.format == "plain" and ex.packing_is_exact(model, lm.tokenizer)
    collator = ex.PackedCollator(lm.max_length) if pack else ex.PaddedCollator(lm.tokenizer.pad_token_id)
    evaluate = bool(held_out) and (config.early_stopping_patience is not None or config.eval_fraction > 0)
    strategy = "steps" if config.save_steps else "epoch"
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler,
        # fused AdamW updates each tensor in one kernel: 0.080 s against 0.467 s per step for the default model's
        # 135M weights on CPU (bench/optimizer.py); FSDP's sharded parameters keep the plain loop
        optim="adamw_torch" if config.fsdp else "adamw_torch_fused",
        max_grad_norm=config.max_grad_norm or 0.0,
        save_strategy=strategy,
        save_steps=config.save_steps or 500,
        eval_strategy=strategy if evaluate else "no",
        eval_steps=config.save_steps if evaluate else None,
        load_best_model_at_end=evaluate and config.early_stopping_patience is not None,
        metric_for_best_model="eval_loss" if evaluate else None,
        restore_callback_states_from_checkpoint=True,  # early stopping's patience counter survives a kill
        greater_is_better=False if evaluate else None,
        logging_steps=1,
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        bf16=_use_bf16(config, lm.device),
        use_cpu=lm.device.type == "cpu",
        ddp_backend="gloo" if lm.device.type == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        **fsdp_arguments(config.fsdp),
        train_sampling_strategy="random" if pack else "group_by_length",
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    wanted = "bf16" if args.bf16 else "no"
    if args.mixed_precision != wanted:  # accelerate's own setting, which the Trainer would apply over `bf16`
        warn_once(f"ACCELERATE_MIXED_PRECISION={args.mixed_precision} (accelerate launch --mixed_precision, or its "
                  f"config) is not applied: this fine-tune trains with bf16 {'on' if args.bf16 else 'off'}, as its "
                  "options say (--bf16/--no-bf16, `bf16:`), and records that")
        args.mixed_precision = wanted
    callbacks = [JsonlLogCallback(out / "train_log.jsonl"), LoadableCheckpointCallback(config, model, lm.tokenizer)]
    if progress and is_main():
        callbacks.append(RichProgressCallback())
    if config.early_stopping_patience is not None and evaluate:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    # The final weights can be the last checkpoint's own file when the Trainer saved a plain model there and
    # loads nothing back at the end (FSDP checkpoints hold shards; PiSSA's final adapter is converted).
    lean = config.method != "pissa" and not config.fsdp and not args.load_best_model_at_end
    trainer = _trainer_class(lean)(
        model=model, args=args, train_dataset=ex.ExampleDataset(train),
        eval_dataset=ex.ExampleDataset(held_out) if evaluate else None, data_collator=collator,
        processing_class=lm.tokenizer, callbacks=callbacks + list(extra_callbacks))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    resume = last_checkpoint(out, remove=is_main())  # every rank finds the same one; rank 0 clears the rest
    if resume is not None and progress and is_main():  # a rerun said "running" and trained on in silence
        say_resuming(resume)
    try:
        with attention_kernels(lm.device), packed_attention(model, lm.device) if pack else nullcontext():
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:  # a kill mid-training: the bar is put away before the `interrupted:` line
        for callback in callbacks:
            if isinstance(callback, RichProgressCallback):
                callback.close()
    # only rank 0 links the final weights; another rank looking now could catch its last save half-written
    final = (_last_step_checkpoint(last_checkpoint(out, remove=False))
             if lean and trainer.is_world_process_zero() else None)
    # Under FSDP every rank holds a shard: gather the full weights (a collective, so on every rank) first.
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if trainer.is_world_process_zero():
        if final is not None:
            link_loadable(final, out)  # not written a second time
        else:
            model = trainer.accelerator.unwrap_model(trainer.model)
            save_loadable(model, out, config, lm.tokenizer, state_dict=state_dict)
            if config.method == "full":
                model.config.save_pretrained(str(out))
        (out / "training_args.bin").unlink(missing_ok=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    state = trainer.state
    return state.best_global_step if args.load_best_model_at_end and state.best_global_step else state.global_step
