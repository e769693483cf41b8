"""`leakaudit generate continuation|self-instruct|replace-pii` and `leakaudit audit-data` (see docs/generate.md)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from leakaudit.cli.core import above_zero, batch_size_option, in_unit_interval, model_path
from leakaudit.errors import InputError

err = Console(stderr=True)
CONTINUATION_KEYS = ("id", "source_id", "sample_index", "generated")  # rows each command writes
TASK_KEYS = ("instruction", "instances", "round")
FLAT_KEYS = ("instruction", "input", "output", "source_task")
generate_app = typer.Typer(help="Make synthetic data: continuations, self-instruct tasks, PII-replaced copies.",
                           no_args_is_help=True)


def _names(names: Path | None) -> list[str]:
    from leakaudit.data.pii_find import load_name_list, shipped_names

    return load_name_list(names) if names is not None else shipped_names()


def _fields(text: str, option: str) -> list[str]:
    fields = [f.strip() for f in text.split(",") if f.strip()]
    if not fields:
        raise InputError("no field given", field=option)
    return fields


@generate_app.command("continuation")
def continuation(
    model: str = typer.Option(..., "--model", help="Generator: default | HF id | dir | adapter | .gguf | tiny-*"),
    data: Path = typer.Option(..., "--data", help="Source texts (.jsonl/.json/.csv/.parquet/HF dir)"),
    out: Path = typer.Option(..., "--out", help="Output JSONL data file"),
    text_field: str = typer.Option("text", "--text-field"),
    id_field: str | None = typer.Option(None, "--id-field", help="Default: <file stem>:<line>"),
    prompt_tokens: int = typer.Option(50, "--prompt-tokens", min=1, help="Prompt = the first N tokens of each text"),
    prompt_field: str | None = typer.Option(None, "--prompt-field", help="Take prompts from this field instead"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Use only the first N source records"),
    max_new_tokens: int = typer.Option(1000, "--max-new-tokens", min=1),
    top_k: int | None = typer.Option(100, "--top-k", min=0, help="0 = no top-k"),
    top_p: float | None = typer.Option(None, "--top-p", callback=in_unit_interval),
    temperature: float | None = typer.Option(None, "--temperature", callback=above_zero,
                                             help="Default 1.0; not with --greedy"),
    greedy: bool = typer.Option(False, "--greedy"),
    num_samples: int = typer.Option(1, "--num-samples", min=1, help="Continuations per prompt"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: str = batch_size_option(),
    backend: str = typer.Option("hf", "--backend", help="hf (reference) | vllm (GPU, when installed)"),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
) -> None:
    """Continue prompts cut from source texts (study defaults: top-k 100, up to 1000 new tokens)."""
    from leakaudit.data.io import load_records
    from leakaudit.data.synth import generate_continuations
    from leakaudit.models import load_model
    from leakaudit.outputs import prepare_output
    from leakaudit.sampling import SamplingConfig

    if greedy and temperature is not None:
        raise InputError("cannot be combined with --greedy (greedy decoding has no temperature)",
                         field="--temperature")
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0 if temperature is None else temperature,
                            top_k=top_k or None, top_p=top_p, num_samples=num_samples, greedy=greedy, seed=seed)
    config.validate()
    prepare_output(out, command="generate continuation", inputs={"--data": data, "--model": model_path(model)},
                   kind="file", suffixes=(".jsonl",), keys=CONTINUATION_KEYS)
    records = load_records(data, text_field=text_field, id_field=id_field)[:limit]
    lm = load_model(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    rows = generate_continuations(lm, records, out, config, prompt_tokens=prompt_tokens, prompt_field=prompt_field,
                                  batch_size=batch_size, backend=backend, source=data)
    n_tokens = sum(r["n_new_tokens"] for r in rows)
    err.print(f"wrote {len(rows)} continuations ({n_tokens} new tokens) of {len(records)} prompts to {out}")


@generate_app.command("self-instruct")
def self_instruct_cmd(
    model: str = typer.Option(..., "--model", help="Generator model"),
    out: Path = typer.Option(..., "--out", help="Output JSONL of tasks {instruction, instances, provenance}"),
    n: int = typer.Option(..., "--n", min=1, help="How many new tasks to generate"),
    seed_tasks: Path | None = typer.Option(None, "--seed-tasks", help="Default: the shipped 175 seed tasks"),
    flat: Path | None = typer.Option(None, "--flat", help="Also write {instruction, input, output} rows here"),
    requests_per_round: int = typer.Option(8, "--requests-per-round", min=1),
    max_rounds: int | None = typer.Option(None, "--max-rounds", min=1, help="Default: 20 x ceil(n / requests)"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.7, "--temperature", callback=above_zero),
    top_p: float = typer.Option(0.5, "--top-p", callback=in_unit_interval),
    seed: int = typer.Option(0, "--seed"),
    batch_size: str = batch_size_option(),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
) -> None:
    """Grow instruction data from seed tasks; near-duplicates (ROUGE-L > 0.7 to the pool) are rejected."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from leakaudit import resources
    from leakaudit.data.synth import load_seed_tasks, self_instruct, write_instruction_data
    from leakaudit.models import load_model
    from leakaudit.outputs import prepare_output

    inputs = {"--seed-tasks": seed_tasks, "--model": model_path(model)}
    prepare_output(out, command="generate self-instruct", inputs=inputs, kind="file", suffixes=(".jsonl",),
                   keys=TASK_KEYS)
    if flat is not None:
        prepare_output(flat, command="generate self-instruct", inputs={**inputs, "--out": out}, kind="file",
                       suffixes=(".jsonl",), keys=FLAT_KEYS, option="--flat")
    seeds = load_seed_tasks(seed_tasks or resources.path("self-instruct-seed", "seed_tasks.jsonl"))
    lm = load_model(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    with Progress(TextColumn("self-instruct"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[r]}"),
                  console=err, transient=True) as bar:
        task = bar.add_task("tasks", total=n, r="")
        rows = self_instruct(lm, seeds, out, n, requests_per_round=requests_per_round, max_rounds=max_rounds,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                             batch_size=batch_size,
                             on_round=lambda r, k, total: bar.update(task, completed=total, r=f"round {r}"))
    if flat is not None:
        write_instruction_data(rows, flat)
    short = "" if len(rows) >= n else f" (stopped after the round limit, short of {n})"
    err.print(f"{len(rows)} tasks in {out}{short}")


@generate_app.command("replace-pii")
def replace_pii(
    data: Path = typer.Option(..., "--data", help="Input data file"),
    out: Path = typer.Option(..., "--out", help="Output JSONL (all fields kept, PII replaced)"),
    text_field: str = typer.Option("text", "--text-field", help="Field(s) to rewrite, comma-separated"),
    names: Path | None = typer.Option(None, "--names", help="Names to replace: JSONL with 'name' or one per line "
                                      "(default: the shipped Enron names)"),
    header_names: bool = typer.Option(True, "--header-names/--no-header-names",
                                      help="Also replace names found in From:/To:/X-From:/X-To:/Cc: headers"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Replace names, e-mail addresses and phone numbers with consistent fake ones (Faker, seeded)."""
    from leakaudit.data.io import read_rows, write_jsonl
    from leakaudit.data.pii_find import names_from_headers
    from leakaudit.data.pii_replace import KINDS, PiiReplacer
    from leakaudit.outputs import prepare_output

    prepare_output(out, command="generate replace-pii", inputs={"--data": data, "--names": names}, kind="file",
                   suffixes=(".jsonl",), keys=("pii_replaced",))
    fields = _fields(text_field, "--text-field")
    rows = read_rows(data)
    for lineno, row in rows:
        for f in fields:
            if not isinstance(row.get(f), str):
                raise InputError("missing or not a string", file=data, line=lineno, field=f)
    replacer = PiiReplacer(_names(names), seed=seed)
    if header_names:
        replacer.add_names(n for _, row in rows for f in fields for n in names_from_headers(row[f]))
    out_rows = []
    for _, row in rows:
        new = dict(row)
        counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        for f in fields:
            new[f], c = replacer.replace(row[f])
            for k, v in c.items():
                counts[k] += v
        new["pii_replaced"] = counts
        out_rows.append(new)
    write_jsonl(out, out_rows)
    total = {k: replacer.counts.get(k, 0) for k in KINDS}
    distinct = replacer.n_distinct
    err.print(f"wrote {len(out_rows)} rows to {out}; replaced "
              + ", ".join(f"{total[k]} {k}s ({distinct[k]} distinct)" for k in KINDS))


def audit_data_cmd(
    source: Path = typer.Option(..., "--source", help="The private source data"),
    generated: Path = typer.Option(..., "--generated", help="The generated data to check"),
    out: Path | None = typer.Option(None, "--out", help="Directory for audit_data.json and audit_records.jsonl"),
    source_field: str = typer.Option("text", "--source-field"),
    generated_field: str = typer.Option("auto", "--generated-field",
                                        help="auto = 'generated' when rows have it (continuations: the prompt "
                                        "is excluded), else 'text'"),
    id_field: str | None = typer.Option(None, "--id-field", help="Id field of the generated data"),
    names: Path | None = typer.Option(None, "--names", help="Name list (default: the shipped Enron names); "
                                      "names in the source's e-mail headers are always added"),
    ngram: int = typer.Option(8, "--ngram", min=1, help="Verbatim span length in words"),
    show_pii: bool = typer.Option(False, "--show-pii", help="Write the reproduced values unmasked"),
) -> None:
    """How much of the source's PII and verbatim text the generated data reproduces (before fine-tuning)."""
    from leakaudit.audit_data import audit
    from leakaudit.data.io import load_records, read_rows, write_json, write_jsonl
    from leakaudit.outputs import prepare_output

    if out is not None:
        prepare_output(out, command="audit-data", files=("audit_data.json", "audit_records.jsonl"),
                       inputs={"--source": source, "--generated": generated, "--names": names})
    if generated_field == "auto":
        first = read_rows(generated)[0][1]
        generated_field = "generated" if isinstance(first.get("generated"), str) else "text"
    src = load_records(source, text_field=source_field, keep_empty=True)
    gen = load_records(generated, text_field=generated_field, id_field=id_field, keep_empty=True)
    summary, records = audit([r.text for r in src], [(r.id, r.text) for r in gen], names=_names(names), n=ngram)
    summary = {"source": str(source), "generated": str(generated), "generated_field": generated_field, **summary}
    if out is not None:
        write_jsonl(out / "audit_records.jsonl", [r.row(show_pii) for r in records])
        write_json(out / "audit_data.json", summary)
    table = Table(title=f"leakage of {source.name} in {generated.name} ({len(records)} generated records)")
    for col in ("what", "in source", "reproduced", "fraction", "records with any"):
        table.add_column(col, justify="left" if col == "what" else "right")
    for kind, s in summary["pii"].items():
        table.add_row(kind, str(s["in_source"]), str(s["reproduced"]), f"{s['fraction']:.3f}",
                      str(s["records_with_any"]))
    v = summary["verbatim"]
    table.add_row(f"{ngram}-grams", str(v["source_distinct_ngrams"]), str(v["ngrams_reproduced"]),
                  f"{v['fraction']:.3f}", str(v["records_with_any"]))
    Console().print(table)
    if out is not None:
        err.print(f"wrote {out / 'audit_data.json'} and {out / 'audit_records.jsonl'}")


def register(app: typer.Typer) -> None:
    """Add `generate ...` and `audit-data` to the app."""
    app.add_typer(generate_app, name="generate")
    app.command("audit-data")(audit_data_cmd)
