"""The `leakaudit` command. Thin: each topic module registers its commands; bad input exits 2 in one line."""

from __future__ import annotations

import importlib
import sys
import warnings

import typer

from leakaudit.errors import InputError

app = typer.Typer(
    name="leakaudit",
    help="Measure what a fine-tuned language model leaks about the data it was tuned on.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# One module per topic; each defines register(app). Kept as names so a topic in progress cannot break the rest.
TOPICS = ["core", "mia", "train", "generate", "pii", "backdoor", "run"]

for _topic in TOPICS:
    _module = importlib.import_module(f"leakaudit.cli.{_topic}")
    _module.register(app)


def main() -> None:
    """Console entry point: usage errors exit 2 (click), InputError prints `error: ...` and exits 2."""
    # peft (<= 0.21) reads transformers' deprecated `is_gradient_checkpointing` on every adapter: noise to users.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        app()
    except InputError as exc:
        print(f"error: {exc.format()}", file=sys.stderr)
        sys.exit(2)
