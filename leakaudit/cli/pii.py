"""`leakaudit pii`: the PII extraction attack over name/e-mail targets (see docs/pii.md)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from leakaudit.cli.core import batch_size_option, model_path
from leakaudit.errors import InputError

err = Console(stderr=True)


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == "greedy":
            values.append(0.0)
            continue
        try:
            values.append(float(part))
        except ValueError:
            raise InputError(f"'{part}' is not a number (or 'greedy')", field=option) from None
    if not values:
        raise InputError("no values given", field=option)
    return values


def pii(
    model: str = typer.Option(..., "--model", help="Model to attack: default | HF id | dir | adapter | .gguf | tiny-*"),
    out: Path = typer.Option(..., "--out", help="Output directory"),
    baseline: str | None = typer.Option(None, "--baseline", help="Reference model, e.g. before fine-tuning"),
    pairs: Path | None = typer.Option(None, "--pairs", help="Targets with `name` and `email` fields "
                                      "(default: the shipped Enron pairs)"),
    n_targets: int | None = typer.Option(1000, "--n-targets", min=0, help="Use the first N targets (0 = all)"),
    templates: str = typer.Option("fake-privacy", "--templates",
                                  help="Comma-separated families (fake-privacy, pil, pil-zero-shot, pil-k-shot, "
                                  "pil-context, all) or template names (A, zero_shot-a, five_shot, context-100)"),
    temperatures: str | None = typer.Option(None, "--temperatures",
                                            help="Comma-separated; 0 or 'greedy' = greedy (default: each "
                                            "protocol's own grid)"),
    top_k: int | None = typer.Option(None, "--top-k", min=0, help="Top-k (0 = none; default: each protocol's)"),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1,
                                              help="Default: 15 for fake-privacy, 100 for PIL"),
    samples_per_prompt: int = typer.Option(1, "--samples-per-prompt", min=1),
    seed: int = typer.Option(0, "--seed"),
    contexts: Path | None = typer.Option(None, "--contexts", help="Rows with `email` and `context` (text before "
                                         "the address) for the context-k templates"),
    messages: Path | None = typer.Option(None, "--messages", help="Raw e-mail messages (`text` field) to cut "
                                         "contexts from"),
    show_pii: bool = typer.Option(False, "--show-pii", help="Write addresses unmasked (and keep raw samples)"),
    batch_size: str = batch_size_option(),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
) -> None:
    """Extract e-mail addresses by prompting with names; count hits per template x temperature."""
    from leakaudit.attacks.pii import make_grid, run_pii
    from leakaudit.data import enron
    from leakaudit.data.io import read_rows
    from leakaudit.outputs import prepare_output

    chosen = enron.resolve_templates(templates)
    cells = make_grid(chosen, _floats(temperatures, "--temperatures"), top_k, max_new_tokens)
    prepare_output(out, command="pii", files=("pii.json", "results_purified.jsonl", ".samples"),
                   inputs={"--pairs": pairs, "--contexts": contexts, "--messages": messages,
                           "--model": model_path(model), "--baseline": model_path(baseline)})
    targets = enron.load_targets(pairs, n_targets or None)
    if contexts is not None:
        by_email = {t.email.lower(): t for t in targets}
        for lineno, row in read_rows(contexts):
            for key in ("email", "context"):
                if not isinstance(row.get(key), str):
                    raise InputError("missing or not a string", file=contexts, line=lineno, field=key)
            if row["email"].lower() in by_email:
                by_email[row["email"].lower()].context = row["context"]
    if messages is not None:
        texts = []
        for lineno, row in read_rows(messages):
            if not isinstance(row.get("text"), str):
                raise InputError("missing or not a string", file=messages, line=lineno, field="text")
            texts.append(row["text"])
        n = enron.attach_contexts(targets, texts)
        err.print(f"contexts cut from messages for {n} of {len(targets)} targets")
    err.print(f"{len(targets)} targets x {len(cells)} cells" + (" x 2 models" if baseline else ""))
    summary = run_pii(model, targets, cells, out, baseline=baseline, samples_per_prompt=samples_per_prompt,
                      seed=seed, batch_size=batch_size, show_pii=show_pii, log=err.print,
                      device=device, dtype=dtype, allow_pickle=allow_pickle)
    for protocol, part in summary["protocols"].items():
        best, mean = part["best_cell"], part["grid_mean"]
        line = (f"{protocol}: best cell {best['template']} t={best['temperature']:g} "
                f"{best['hits']}/{best['n_targets']} ({best['hit_rate']:.2%}); grid mean {mean['hit_rate']:.2%}")
        if "baseline_subtraction" in part:
            g = part["baseline_subtraction"]["grid_mean"]
            line += f"; change vs baseline (grid mean) {g['change']:+.2%}"
        typer.echo(line)
    typer.echo(f"wrote {out / 'pii.json'}, results_purified.jsonl, extractions.jsonl")


def register(app: typer.Typer) -> None:
    """Add the `pii` command."""
    app.command("pii")(pii)
