"""`leakaudit pii`: the PII extraction attack over name/e-mail targets (see docs/pii.md); the job is the
evaluation kind leakaudit/kinds/pii.py. `leakaudit pii-logprob`: its teacher-forced measure
(leakaudit/kinds/pii_logprob.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from leakaudit.cli.core import batch_size_option, build_options, model_path, say
from leakaudit.options import MAX_SEED


def pii(
    model: str = typer.Option(..., "--model", help="Model to attack: default | HF id | dir | adapter | .gguf | tiny-* | random:*"),
    out: Path = typer.Option(..., "--out", help="Output directory"),
    baseline: str | None = typer.Option(None, "--baseline", help="Model to subtract, e.g. before fine-tuning: "
                                        "the change in hit rate on the same targets"),
    pairs: Path | None = typer.Option(None, "--pairs", help="Targets: rows with `name` and `email`, or with "
                                      "`pairs` lists (default: the shipped Enron pairs)"),
    n_targets: int | None = typer.Option(1000, "--n-targets", min=0, help="Use the first N targets (0 = all)"),
    templates: str = typer.Option("fake-privacy", "--templates",
                                  help="Comma-separated families (fake-privacy, pil, pil-zero-shot, pil-k-shot, "
                                  "pil-context, all) or template names (A, zero_shot-a, five_shot, context-100)"),
    temperatures: str | None = typer.Option(None, "--temperatures",
                                            help="Comma-separated; 0 or 'greedy' = greedy (default: each "
                                            "protocol's own grid)"),
    top_k: int | None = typer.Option(None, "--top-k", help="Top-k (0 = none; default: each protocol's)"),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens",
                                              help="Default: 15 for fake-privacy, 100 for PIL"),
    samples_per_prompt: int = typer.Option(1, "--samples-per-prompt"),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED),
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
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.base import KindContext, ModelCache
    from leakaudit.outputs import prepare_output

    kind = get_kind("pii")
    options = build_options(kind, templates=templates, temperatures=temperatures, top_k=top_k,
                            max_new_tokens=max_new_tokens, n_targets=n_targets or None,
                            pairs=str(pairs) if pairs else None, contexts=str(contexts) if contexts else None,
                            messages=str(messages) if messages else None, samples_per_prompt=samples_per_prompt,
                            batch_size=batch_size, roles={"baseline"} if baseline else set())
    prepare_output(out, command="pii", files=("pii.json", "results_purified.jsonl", ".samples"),
                   inputs={"--pairs": pairs, "--contexts": contexts, "--messages": messages,
                           "--model": model_path(model), "--baseline": model_path(baseline)})
    ctx = KindContext(out=out, seed=seed, models={"target": model, "baseline": baseline}, show_pii=show_pii,
                      cache=ModelCache(device=device, dtype=dtype, allow_pickle=allow_pickle), log=say)
    kind.run(ctx, options)
    summary = json.loads((out / "pii.json").read_text(encoding="utf-8"))
    for protocol, part in summary["protocols"].items():
        best, mean = part["best_cell"], part["grid_mean"]
        line = (f"{protocol}: best cell {best['template']} t={best['temperature']:g} "
                f"{best['hits']}/{best['n_targets']} ({best['hit_rate']:.2%}); grid mean {mean['hit_rate']:.2%}")
        if "baseline_subtraction" in part:
            g = part["baseline_subtraction"]["grid_mean"]
            line += f"; change vs baseline (grid mean) {g['change']:+.2%}"
            if g.get("change_ci"):  # its paired interval over targets, as pii-logprob prints its change's
                line += f" [{g['change_ci'][0]:+.2%}, {g['change_ci'][1]:+.2%}]"
        typer.echo(line)
    say(f"wrote {out / 'pii.json'}, results_purified.jsonl, extractions.jsonl")


def pii_logprob(
    model: str = typer.Option(..., "--model", help="Model to measure: default | HF id | dir | adapter | .gguf | tiny-* | random:*"),
    out: Path = typer.Option(..., "--out", help="Output directory"),
    baseline: str | None = typer.Option(None, "--baseline", help="Model to subtract, e.g. before fine-tuning: "
                                        "the change in log p and rank on the same targets"),
    pairs: Path | None = typer.Option(None, "--pairs", help="Targets: rows with `name` and `email`, or with "
                                      "`pairs` lists (default: the shipped Enron pairs)"),
    n_targets: int | None = typer.Option(None, "--n-targets", min=0, help="Use the first N targets (default and "
                                         "0: all; `pii` defaults to 1000)"),
    n_candidates: int | None = typer.Option(None, "--n-candidates", help="Addresses ranked per target (20)"),
    templates: str | None = typer.Option(None, "--templates", help="Families or template names (fake-privacy)"),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED),
    show_pii: bool = typer.Option(False, "--show-pii", help="Write addresses unmasked"),
    batch_size: str = batch_size_option(),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the score cache"),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
) -> None:
    """Teacher-forced log p(true address | extraction prompt) and its rank among candidate addresses."""
    from leakaudit.distributed import is_main
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.base import KindContext, ModelCache
    from leakaudit.outputs import prepare_output

    kind = get_kind("pii-logprob")
    options = build_options(kind, templates=templates, pairs=str(pairs) if pairs else None, n_targets=n_targets or None,
                            n_candidates=n_candidates, batch_size=batch_size, cache=False if no_cache else None,
                            flags={("cache",): "--no-cache"})
    prepare_output(out, command="pii-logprob", files=("pii_logprob.json", "logprobs.jsonl"),
                   inputs={"--pairs": pairs, "--model": model_path(model), "--baseline": model_path(baseline)})
    ctx = KindContext(out=out, seed=seed, models={"target": model, "baseline": baseline}, show_pii=show_pii,
                      cache=ModelCache(device=device, dtype=dtype, allow_pickle=allow_pickle),
                      log=say if is_main() else lambda m: None)
    res = kind.run(ctx, options)
    if not is_main():  # under a launcher every process has the result; rank 0 prints it
        return
    for h in res.headline():
        ci = f" [{h.ci[0]:.3f}, {h.ci[1]:.3f}]" if h.ci else ""
        typer.echo(f"{h.metric}: {h.value:.3f}{ci}")
    say(f"wrote {out / 'pii_logprob.json'}, logprobs.jsonl")


def register(app: typer.Typer) -> None:
    """Add the `pii` and `pii-logprob` commands."""
    app.command("pii")(pii)
    app.command("pii-logprob")(pii_logprob)
