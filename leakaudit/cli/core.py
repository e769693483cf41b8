"""Core commands: `score` (the batched, cached scoring engine) and `model-info`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from leakaudit.errors import InputError
from leakaudit.progress import say  # noqa: F401  (the commands' stderr line: one function with the library's log)

# Streams, one rule for every command: stdout carries its result (metrics, tables, verdicts, the path of a model
# it made), for a reader or a pipe; stderr carries progress, warnings and which files it wrote.
results = Console(soft_wrap=True)  # a command's result table (stdout)


def say_result(line: str) -> None:
    """One line of a command's result, on stdout, as written (no markup read, no wrapping), PII masked as log
    lines are (a model spec or path may name a person). The path of a model a command made is not a line of
    this kind: it goes out unmasked (typer.echo), as scripts read it."""
    from leakaudit.data.pii_mask import mask_message

    typer.echo(mask_message(line))


def given_on_command_line(ctx: typer.Context, param: str) -> bool:
    """Whether the user typed the flag of `param` (not its default): a flag the run would not read is refused
    only then. Compared by name: typer may carry its own copy of click's ParameterSource."""
    return getattr(ctx.get_parameter_source(param), "name", None) == "COMMANDLINE"


def refuse_text_field_for_chat(ctx: typer.Context, data_format: str) -> None:
    """`--text-field` with `--format chat` was ignored in silence (a conversation's text is its replies, read
    from --messages-field): refused, as every flag the run would not read is."""
    if data_format == "chat" and given_on_command_line(ctx, "text_field"):
        raise InputError("applies only with --format text; a conversation is read from --messages-field",
                         field="--text-field")


def print_table(title: str, heads: tuple[str, ...], rows: list[tuple[str, ...]], justify: str = "left") -> None:
    """A result table on stdout (mia, user-inference, audit-data), its cells `justify`-aligned but the first: as
    wide as its cells where it fits or where no terminal sets the width (a log: rich drew it at 80 columns, a
    cell over five lines and `non-memb…`); on a terminal too narrow for it, one plain line per row (at 40
    columns every number was cut to `0.5…` and min_k and min_k_pp both read `mi…`). Into a pipe or a file the
    title is a line of its own: rich wraps a title to the table's width, and one naming a long model path or
    file came out over several lines. The title is PII masked (it names a model spec or a file); the cells are
    the caller's to mask."""
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    from leakaudit.data.pii_mask import mask_message

    title = mask_message(title)
    # as Text, not strings: rich read a string as markup and emoji codes (`ft[lr=0.1]` lost its `[lr=0.1]`,
    # `:fire:` in a path became an emoji) on a terminal
    table = Table(title=Text(title))
    for i, head in enumerate(heads):
        table.add_column(Text(head), justify="left" if i == 0 else justify)
    for row in rows:
        table.add_row(*(Text(str(cell)) for cell in row))
    width = Measurement.get(results, results.options.update_width(10_000), table).maximum
    if not results.is_terminal:  # rich caps a print's width at the console's: a console as wide as the table
        print(title, file=results.file)
        table.title = None
        Console(file=results.file, width=width, color_system=None).print(table)
    elif width <= results.width:
        results.print(table)
    else:
        results.print(title, markup=False, highlight=False)
        for row in rows:
            cells = ", ".join(f"{head} {cell}" for head, cell in zip(heads[1:], row[1:], strict=True))
            results.print(f"{row[0]}: {cells}", markup=False, highlight=False)

ModelOpt = typer.Option(..., "--model", help="default | HF id | model dir | adapter dir | .gguf | tiny-gpt-neox | tiny-opt | random:NAME")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1 ...")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (bf16 where the hardware is fast at it, else fp32), fp32, bf16")
PickleOpt = typer.Option(False, "--allow-pickle", help="Allow loading pickle weights (*.bin); only for trusted files")
SCORE_KEYS = ("id", "n_tokens", "sum_logp", "mean_logp")  # what a `score` output row holds
#: `--format` and `--messages-field` of every command that reads a chat fine-tune's conversations (score, mia,
#: user-inference, perplexity)
FORMAT_HELP = ("text, or chat: rows of conversations (--messages-field), each scored at its assistant replies in "
               "their context, as `finetune --format chat` trained on them")
MESSAGES_HELP = "The conversations' field (--format chat)"


def messages_field_option(ctx: typer.Context, value: str) -> dict[str, str]:
    """--messages-field as an option only where it was typed: given for text rows, it is refused (also as
    `--messages-field messages`, its default, which was read by nothing in silence)."""
    return {"messages_field": value} if given_on_command_line(ctx, "messages_field") else {}


def build_options(kind: Any, *, flags: dict[tuple, str] | None = None, roles: set[str] | None = None,
                  **values: Any) -> Any:
    """A kind's options from CLI flags (None = not given, the kind's default applies); a bad value is one
    `error:` line naming the flag, from the same validators an experiment file goes through. `kind` may be an
    options class alone (a command of no kind that shares some kinds' options: `score`). With `roles`
    (the data and model roles the command was given) the kind's `check` runs too. `flags` names the flag of
    an option path that is not simply `--option-name` (the longest matching prefix wins)."""
    from pydantic import BaseModel, ValidationError

    from leakaudit.config import pydantic_message
    from leakaudit.errors import OptionError

    def flag(loc: tuple) -> str:
        for n in range(len(loc), 0, -1):
            if tuple(loc[:n]) in (flags or {}):
                return flags[tuple(loc[:n])]
        return "--" + str(loc[0]).replace("_", "-") if loc else "option"

    given = {k: v for k, v in values.items() if v is not None}
    try:
        options = (kind if isinstance(kind, type) and issubclass(kind, BaseModel) else kind.Options)(**given)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InputError(pydantic_message(err), field=flag(tuple(err["loc"]))) from None
    if roles is not None:
        try:
            kind.check(options, roles)
        except OptionError as exc:
            raise InputError(exc.message, field=flag(exc.loc)) from None
    return options


def check_options(kind: Any, options: Any, roles: set[str]) -> None:
    """A kind's checks that need more than its options (`Kind.check`), the flag named as build_options does."""
    from leakaudit.errors import OptionError

    try:
        kind.check(options, roles)
    except OptionError as exc:
        raise InputError(exc.message, field="--" + str(exc.loc[0]).replace("_", "-")) from None


def check_batch_size(value: str) -> str:
    """`auto` or a positive number of sequences (options.parse_batch_size), refused at parse time (before any
    model loads)."""
    from leakaudit.options import parse_batch_size

    try:
        return value if value is None else str(parse_batch_size(value))
    except ValueError:
        raise typer.BadParameter(f"'{value}' is not 'auto' or a positive integer") from None


def batch_size_option(help: str = "auto (token budget) or sequences per batch") -> Any:
    return typer.Option("auto", "--batch-size", help=help, callback=check_batch_size)


def above_zero(value: float | None) -> float | None:
    """Callback for options that must be > 0 (typer's `min=` cannot say 'strictly')."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"{value} is not > 0")
    return value


def check_window(max_length: int | None, stride: int | None) -> None:
    """The rule the kinds' options hold (options.stride_inside_the_window): a window step as long as the window
    has no context to score a window's tokens with, a longer one skips tokens. (Passed on, a stride equal to a
    window that is the model's whole context was halved by the scoring pass with a warning.)"""
    if max_length is not None and stride is not None and stride >= max_length:
        raise InputError(f"stride must be between 1 and max length - 1 ({max_length - 1})", field="--stride")


def model_path(spec: str | None) -> str | None:
    """The local path a model spec names (an input the output may not overwrite), `~/m` read as the model
    loader reads it; None for any other spec."""
    path = Path(spec).expanduser() if spec is not None else None
    return str(path) if path is not None and path.exists() else None


def score(
    command: typer.Context,
    model: str = ModelOpt,
    data: Path = typer.Option(..., "--data", help="Texts: .jsonl/.json/.csv/.arrow/.parquet or HF dataset dir"),
    out: Path = typer.Option(..., "--out", help="Output JSONL, one row per text (per conversation)"),
    text_field: str = typer.Option("text", "--text-field"),
    id_field: str | None = typer.Option(None, "--id-field", help="Default: <file stem>:<line>"),
    data_format: str = typer.Option("text", "--format", help=FORMAT_HELP + " (a row's tokens: its replies', in "
                                    "order)"),
    messages_field: str = typer.Option("messages", "--messages-field", help=MESSAGES_HELP),
    batch_size: str = batch_size_option(),
    max_length: int | None = typer.Option(None, "--max-length", min=2, help="Window in tokens (default: model context)"),
    stride: int | None = typer.Option(None, "--stride", min=1, help="Window step for long texts (default: max-length/2)"),
    token_logprobs: bool = typer.Option(False, "--token-logprobs", help="Also write per-token log p"),
    moments: bool = typer.Option(False, "--moments", help="Also write per-token mean/var of log p (Min-K%++)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the score cache"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    allow_pickle: bool = PickleOpt,
) -> None:
    """Score texts with one batched, cached teacher-forced pass: per-text log-likelihood statistics (with
    --format chat, per conversation: over its assistant replies' tokens, each in its context)."""
    from leakaudit.attacks.base import UnrenderableChatError, scoring_pass
    from leakaudit.data.io import load_records, write_jsonl
    from leakaudit.distributed import is_main
    from leakaudit.kinds.base import ScoredRowsOptions
    from leakaudit.models import load_model
    from leakaudit.outputs import prepare_output

    check_window(max_length, stride)
    refuse_text_field_for_chat(command, data_format)
    # the rows' format checked by the rule mia's and perplexity's go through (--messages-field for text refused)
    rows_options = build_options(ScoredRowsOptions, format=data_format,
                                 **messages_field_option(command, messages_field))
    chat = rows_options.format == "chat"
    prepare_output(out, command="score", inputs={"--data": data, "--model": model_path(model)}, kind="file",
                   suffixes=(".jsonl",), keys=SCORE_KEYS)
    records = load_records(data, text_field=text_field, id_field=id_field, **rows_options.record_fields())
    lm = load_model(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    options = {"moments": moments, "batch_size": batch_size, "max_length": max_length, "stride": stride,
               "cache": not no_cache}
    try:
        results = (scoring_pass(lm, chats=[r.extra[rows_options.messages_field] for r in records], **options)
                   if chat else scoring_pass(lm, [r.text for r in records], **options))
    except UnrenderableChatError as exc:  # the model's chat template refused one: its line
        raise InputError(f"conversation {exc.why}", file=data, line=records[exc.index].line,
                         field=rows_options.messages_field) from None
    if not is_main():
        return
    rows = []
    empty = [rec for rec, res in zip(records, results, strict=True) if res.n_tokens == 0]
    if empty:  # no token to score: no mean (null, not NaN, which is not JSON)
        say(f"warning: {len(empty)} of {len(records)} texts have no scored token (fewer than 2 tokens and no "
            f"BOS), so their mean_logp is null; the first: {data}:{empty[0].line}")  # masked: the path may name one
    for rec, res in zip(records, results, strict=True):
        row = {"id": rec.id, "n_tokens": res.n_tokens, "sum_logp": res.sum_logp,
               "mean_logp": res.mean_logp if res.n_tokens else None}
        if token_logprobs:
            row["token_logprobs"] = [round(float(x), 6) for x in res.logp]
        if moments:
            row["mu"] = [round(float(x), 6) for x in res.mu]
            row["var"] = [round(float(x), 6) for x in res.var]
        rows.append(row)
    write_jsonl(out, rows)
    n_tok = sum(r["n_tokens"] for r in rows)
    dtype = str(lm.dtype).removeprefix("torch.")  # as model-info and run.json name it
    say(f"scored {len(rows)} {'conversations' if chat else 'texts'} ({n_tok} tokens) with {model} ({dtype}, "
        f"{lm.device}) -> {out}")


def model_info(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    allow_pickle: bool = PickleOpt,
) -> None:
    """Resolve and load a model spec; print its architecture, size, dtype, context and fingerprint."""
    from leakaudit.models import load_model

    lm = load_model(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    info = {
        "spec": model,
        "architecture": type(lm.model).__name__,
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "dtype": str(lm.dtype).replace("torch.", ""),
        "device": str(lm.device),
        "context": lm.max_length,
        "vocab": len(lm.tokenizer),
        "fingerprint": lm.fingerprint,
    }
    typer.echo(json.dumps(info, indent=2))


def register(app: typer.Typer) -> None:
    """Add the core commands."""
    app.command("score")(score)
    app.command("model-info")(model_info)
