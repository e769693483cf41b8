"""CLI: `finetune`, `merge`, `perplexity`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from pydantic import ValidationError

from leakaudit.cli.core import (
    FORMAT_HELP,
    MESSAGES_HELP,
    DeviceOpt,
    DtypeOpt,
    PickleOpt,
    batch_size_option,
    build_options,
    given_on_command_line,
    messages_field_option,
    model_path,
    refuse_text_field_for_chat,
    say,
)
from leakaudit.errors import InputError
from leakaudit.options import MAX_SEED


def _config(**options):
    from leakaudit.config import pydantic_message
    from leakaudit.train.finetune import FinetuneConfig

    try:
        return FinetuneConfig(**options)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "option"
        raise InputError(pydantic_message(err), field=name) from None


#: finetune's flags that only some settings read: (flags' parameters, whether the config reads them, which setting)
_USED_WHEN = (
    (("lora_r", "lora_alpha", "lora_dropout", "target_modules"), lambda c: c.method != "full",
     "--method lora, dora or pissa"),
    (("dp_delta", "dp_max_grad_norm"), lambda c: c.dp_epsilon is not None, "--dp-epsilon (DP-SGD)"),
    (("text_field", "packing"), lambda c: c.format == "plain", "--format plain"),
    (("prompt_field", "response_field"), lambda c: c.format == "instruction", "--format instruction"),
    (("messages_field", "loss_on"), lambda c: c.format == "chat", "--format chat"),
)


def _refuse_unused_flags(ctx: typer.Context, config) -> None:
    """A flag the run would not read (`--method full --lora-r 16`, `--dp-delta` without `--dp-epsilon`,
    `--loss-on all` on plain text) was ignored in silence: the user believed it applied. Only flags given on the
    command line: an experiment's grid over `method` shares its options among variants on purpose."""
    for params, used, setting in _USED_WHEN:
        for param in params:
            if given_on_command_line(ctx, param) and not used(config):
                flag = "--" + param.replace("_", "-") + ("/--no-packing" if param == "packing" else "")
                raise InputError(f"applies only with {setting}; this run would ignore it", field=flag)


def _say_trained(path: Path, seconds: float) -> None:
    """What the run did, on stderr, above the model's path: the bar that showed the loss is gone when it ends
    (a rerun of a finished run trains nothing: it says so)."""
    from leakaudit.train.callbacks import read_log

    rows = read_log(path / "train_log.jsonl") if (path / "train_log.jsonl").is_file() else []
    losses = [r["loss"] for r in rows if "loss" in r]
    done = json.loads((path / "finetune_done.json").read_text()) if (path / "finetune_done.json").is_file() else {}
    eps = next((r["epsilon"] for r in reversed(rows) if "epsilon" in r), None)
    say(f"fine-tuned: model of step {done.get('step', '?')}" + (f", last logged loss {losses[-1]:.4f}" if losses else "")
        + (f", ε {eps:.2f} spent" if eps is not None else "") + f", {seconds:.0f}s (model dir below)")


def register(app: typer.Typer) -> None:
    """Add the training commands."""

    @app.command()
    def finetune(
        ctx: typer.Context,
        model: str = typer.Option(..., help="Base model spec (default, tiny-gpt-neox, HF id, dir, .gguf, random:NAME)."),
        data: str = typer.Option(..., help="Training data file (.jsonl/.json/.csv/.parquet/.arrow/HF dir)."),
        out: str = typer.Option(..., help="Output dir (rerun the same command to resume)."),
        method: str = typer.Option("lora", help="full | lora | dora | pissa"),
        format: str = typer.Option("plain", help="plain | instruction | chat"),
        epochs: float = typer.Option(4, help="Training epochs."),
        learning_rate: float = typer.Option(2e-6, help="Peak learning rate (linear decay, after --warmup-steps of warmup)."),
        batch_size: int = typer.Option(1, help="Per-device batch size."),
        gradient_accumulation: int = typer.Option(8, help="Batches per optimizer step."),
        weight_decay: float = typer.Option(0.0),
        warmup_steps: int = typer.Option(0),
        lora_r: int = typer.Option(8, help="LoRA rank."),
        lora_alpha: float = typer.Option(16, help="LoRA alpha."),
        lora_dropout: float = typer.Option(0.05, help="LoRA dropout."),
        target_modules: str = typer.Option(None, help="Comma list; default per architecture."),
        max_length: int = typer.Option(None, help="Max tokens per example (default 512, or the model's context "
                                       "when shorter; plain text is chunked)."),
        packing: bool = typer.Option(True, help="Pack plain-text batches into one row (no padding)."),
        text_field: str = typer.Option("text"),
        prompt_field: str = typer.Option("prompt"),
        response_field: str = typer.Option("response"),
        messages_field: str = typer.Option("messages"),
        loss_on: str = typer.Option("assistant", help="chat: assistant | all"),
        user_field: str = typer.Option(None, help="Field naming each row's user (for per-user defenses)."),
        max_samples_per_user: int = typer.Option(None, help="Defense: keep the first N samples of each user."),
        dedup_within_user: bool = typer.Option(False, help="Defense: drop repeated texts within a user."),
        max_grad_norm: float = typer.Option(None, help="Batch gradient clipping norm (0 = off; default 1.0, "
                                            "without DP-SGD, which clips each example instead)."),
        early_stopping_patience: int = typer.Option(None, help="Defense: stop after N evals without gain."),
        eval_fraction: float = typer.Option(0.0, help="Held-out fraction, evaluated each epoch (with "
                                            "--early-stopping-patience, 0 holds out 0.1)."),
        scrub_pii: bool = typer.Option(False, help="Defense: replace e-mails, phones and names before training."),
        dp_epsilon: float = typer.Option(None, help="Defense: DP-SGD to this epsilon (Opacus)."),
        dp_delta: float = typer.Option(None, help="DP delta (default min(1e-5, 1/n))."),
        dp_max_grad_norm: float = typer.Option(1.0, help="DP per-example clipping norm."),
        seed: int = typer.Option(0, min=0, max=MAX_SEED),
        max_steps: int = typer.Option(None, help="Stop after this many optimizer steps."),
        save_steps: int = typer.Option(None, help="Checkpoint every N steps instead of every epoch."),
        bf16: bool = typer.Option(None, help="bf16 autocast (default: LEAKAUDIT_DTYPE if set, else only where the hardware is fast)."),
        device: str = typer.Option(None, help="cpu, cuda, ... (default auto)."),
        fsdp: bool = typer.Option(False, help="Shard the model over the GPUs (FSDP2) when launched with "
                                  "torchrun/accelerate; GPUs only."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Fine-tune a model (full, LoRA, DoRA, PiSSA); writes a loadable dir, train_log.jsonl, checkpoints."""
        from leakaudit.outputs import prepare_output
        from leakaudit.train.finetune import finetune as run

        options = {k: v for k, v in locals().items() if k not in ("ctx", "run", "progress", "prepare_output")}
        if max_grad_norm is None:  # not given: the config's default (1.0; DP-SGD refuses one given beside it)
            del options["max_grad_norm"]
        if max_length is None:  # not given: the config's default, clamped to the model's context without a warning
            del options["max_length"]
        config = _config(**options)
        _refuse_unused_flags(ctx, config)
        from leakaudit.train.finetune import check_base

        check_base(config.model)
        # the run dir is owned by finetune's own check (finetune_config.json); no marker, which it would refuse
        prepare_output(out, command="finetune", files=("finetune_config.json",), marker=False,
                       inputs={"--data": data, "--model": model_path(model)})
        started = time.perf_counter()
        path = run(config, progress=progress)
        from leakaudit.distributed import is_main

        if is_main():  # under a launcher every process trained it; rank 0 says where it is
            _say_trained(Path(path), time.perf_counter() - started)
            typer.echo(str(path))

    @app.command()
    def merge(
        adapter: str = typer.Option(..., help="Adapter dir (LoRA/DoRA/PiSSA) from finetune."),
        out: str = typer.Option(..., help="Where to write the merged full model."),
    ) -> None:
        """Merge an adapter into its base model and save a full model dir."""
        from leakaudit.experiment.plan import local_adapter_base
        from leakaudit.outputs import prepare_output
        from leakaudit.train.merge import merge_adapter

        # the adapter's local base is an input too: a base that is an earlier merge's output was replaced by
        # this merge (deleted, then rewritten as base + adapter), and the adapter then loaded onto itself; a
        # rerun replaces what an earlier merge wrote
        base = local_adapter_base(Path(adapter).expanduser())
        prepare_output(out, command="merge", marker=False, files=("leakaudit_merge.json",),
                       inputs={"--adapter": Path(adapter).expanduser(), "base_model_name_or_path": base})
        typer.echo(str(merge_adapter(adapter, out)))

    @app.command()
    def perplexity(
        command: typer.Context,
        model: str = typer.Option(..., help="Model spec, or a finetune run dir with --all-checkpoints."),
        data: str = typer.Option(..., help="Texts (or, with --format chat, conversations) to measure."),
        out: str = typer.Option(..., help="Output dir for perplexity.json."),
        text_field: str = typer.Option("text"),
        data_format: str = typer.Option("text", "--format", help=FORMAT_HELP + " (their perplexity: over "
                                        "the replies' tokens, the chat fine-tune's eval loss)"),
        messages_field: str = typer.Option("messages", "--messages-field", help=MESSAGES_HELP),
        all_checkpoints: bool = typer.Option(False, help="Every checkpoint of a run dir plus its final model (an "
                                              "experiment's `checkpoints`, on by default there)."),
        batch_size: str = batch_size_option(),
        max_length: int = typer.Option(None, min=2, help="Window in tokens (default the model's context)."),
        stride: int = typer.Option(None, min=1, help="Window step for texts longer than the window (default: max "
                                   "length / 2)."),
        dtype: str = DtypeOpt,
        device: str = DeviceOpt,
        allow_pickle: bool = PickleOpt,
        no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the score cache"),
    ) -> None:
        """Perplexity (corpus and mean per text) of a model or of every checkpoint; writes perplexity.json."""
        from leakaudit.distributed import is_main
        from leakaudit.kinds import get_kind
        from leakaudit.kinds.base import KindContext, ModelCache
        from leakaudit.kinds.perplexity import row_name
        from leakaudit.outputs import prepare_output
        from leakaudit.perplexity import model_dirs

        kind = get_kind("perplexity")
        refuse_text_field_for_chat(command, data_format)
        options = build_options(kind, batch_size=batch_size, max_length=max_length, stride=stride,
                                cache=False if no_cache else None, format=data_format,
                                **messages_field_option(command, messages_field), flags={("cache",): "--no-cache"})
        prepare_output(out, command="perplexity", files=("perplexity.json",),
                       inputs={"--data": data, "--model": model_path(model)})
        target, checkpoints = model, []
        if all_checkpoints:
            if not Path(model).expanduser().is_dir():  # a name (tiny-gpt-neox, a hub id) or a .gguf file
                raise InputError("--all-checkpoints takes a fine-tuning run dir (its checkpoint-N folders and final "
                                 "model), and this is not a directory", file=model, field="--model")
            dirs = model_dirs(model)
            if not dirs:
                raise InputError("no model or checkpoint found in this dir", file=model, field="--model")
            target, checkpoints = str(dirs[-1]), [str(d) for d in dirs[:-1]]
        fields = {"text_field": text_field, **options.record_fields()}
        ctx = KindContext(out=Path(out), data={"data": Path(data)}, data_fields={"data": fields},
                          models={"target": target}, model_flags={"target": "--model"}, checkpoints=checkpoints,
                          cache=ModelCache(keep=1, device=device, dtype=dtype, allow_pickle=allow_pickle))
        res = kind.run(ctx, options).to_json()
        if not is_main():  # under a launcher every process has the result; rank 0 prints it
            return
        for c in res["checkpoints"] or [{"name": row_name(target), **res}]:
            typer.echo(f"{c['name']}\tppl={c['perplexity']:.4f}\tmean_text_ppl={c['mean_text_perplexity']:.4f}")
        say(f"wrote {Path(out) / 'perplexity.json'}")
