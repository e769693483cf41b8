"""`leakaudit generate continuation|self-instruct|replace-pii` (thin front ends of the generation kinds in
leakaudit/kinds/) and `leakaudit audit-data` (see docs/generate.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from leakaudit.cli.core import batch_size_option, build_options, model_path, print_table, say, say_result
from leakaudit.options import MAX_SEED

CONTINUATION_KEYS = ("id", "source_id", "sample_index", "generated")  # rows each command writes
TASK_KEYS = ("instruction", "instances", "round")
FLAT_KEYS = ("instruction", "input", "output", "source_task")
generate_app = typer.Typer(help="Make synthetic data: continuations, self-instruct tasks, PII-replaced copies.",
                           no_args_is_help=True)


def _names(names: Path | None) -> list[str]:
    from leakaudit.data.pii_find import load_name_list, shipped_names
    from leakaudit.warn import warn_if_no_names

    return warn_if_no_names(load_name_list(names), names) if names is not None else shipped_names()


def _run(name: str, options, out: Path, *, seed: int, data: Path | None = None, model: str | None = None,
         data_fields: dict | None = None, outputs: dict | None = None, **load_options):
    """Run a generation kind the way an experiment stage does, writing the files the user named."""
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.base import KindContext, ModelCache

    ctx = KindContext(out=out.parent, seed=seed, data={"data": data} if data is not None else {},
                      models={"model": model} if model is not None else {},
                      data_fields={"data": data_fields or {}}, outputs=outputs or {"data.jsonl": out},
                      cache=ModelCache(keep=1, **load_options), log=say)
    return get_kind(name).run(ctx, options)


@generate_app.command("continuation")
def continuation(
    model: str = typer.Option(..., "--model", help="Generator: default | HF id | dir | adapter | .gguf | tiny-* | random:*"),
    data: Path = typer.Option(..., "--data", help="Source texts (.jsonl/.json/.csv/.parquet/HF dir)"),
    out: Path = typer.Option(..., "--out", help="Output JSONL data file"),
    text_field: str | None = typer.Option(None, "--text-field", help="Default: text; with --prompt-field and no "
                                          "--text-field, rows need only the prompt field"),
    id_field: str | None = typer.Option(None, "--id-field", help="Default: <file stem>:<line>"),
    prompt_tokens: int | None = typer.Option(None, "--prompt-tokens", help="Prompt = the first N tokens of each "
                                             "text (default 50; not with --prompt-field)"),
    prompt_field: str | None = typer.Option(None, "--prompt-field", help="Take prompts from this field instead"),
    limit: int | None = typer.Option(None, "--limit", help="Use only the first N source records"),
    max_new_tokens: int = typer.Option(1000, "--max-new-tokens"),
    top_k: int | None = typer.Option(None, "--top-k", help="0 = no top-k (default 100; not with --greedy)"),
    top_p: float | None = typer.Option(None, "--top-p"),
    temperature: float | None = typer.Option(None, "--temperature", help="Default 1.0; not with --greedy"),
    greedy: bool = typer.Option(False, "--greedy"),
    num_samples: int = typer.Option(1, "--num-samples", help="Continuations per prompt"),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED),
    batch_size: str = batch_size_option(),
    backend: str = typer.Option("hf", "--backend", help="hf (reference) | vllm (GPU, when installed) | auto (vllm where it can run, else hf)"),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
) -> None:
    """Continue prompts cut from source texts (study defaults: top-k 100, up to 1000 new tokens)."""
    from leakaudit.kinds import get_kind
    from leakaudit.outputs import prepare_output

    options = build_options(get_kind("continuation"), prompt_tokens=prompt_tokens, prompt_field=prompt_field,
                            limit=limit, max_new_tokens=max_new_tokens, top_k=top_k, top_p=top_p,
                            temperature=temperature, greedy=greedy, num_samples=num_samples,
                            batch_size=batch_size, backend=backend, roles={"data", "model"})
    prepare_output(out, command="generate continuation", inputs={"--data": data, "--model": model_path(model)},
                   kind="file", suffixes=(".jsonl",), keys=CONTINUATION_KEYS)
    if text_field is None:  # a prompts file ({"prompt": ...}) was refused for the `text` it does not need
        text_field = prompt_field if prompt_field is not None else "text"
    res = _run("continuation", options, out, seed=seed, data=data, model=model,
               data_fields={"text_field": text_field, "id_field": id_field},
               device=device, dtype=dtype, allow_pickle=allow_pickle)
    say(f"wrote {res.data['rows']} continuations ({res.n_new_tokens} new tokens) of {res.n_prompts} "
        f"prompts to {out}")


@generate_app.command("self-instruct")
def self_instruct_cmd(
    model: str = typer.Option(..., "--model", help="Generator model"),
    out: Path = typer.Option(..., "--out", help="Output JSONL of tasks {instruction, instances, provenance}"),
    # --n-tasks: torchrun's parser stops at the first `--n` of a command line (ambiguous with its --nnodes,
    # --nproc-per-node, ...), so `torchrun ... -m leakaudit generate self-instruct --n 8` never started
    n: int = typer.Option(..., "--n", "--n-tasks", help="How many new tasks to generate (--n-tasks: the same, "
                          "for torchrun, which refuses --n as ambiguous with its own options)"),
    seed_tasks: Path | None = typer.Option(None, "--seed-tasks", help="Default: the shipped 175 seed tasks"),
    flat: Path | None = typer.Option(None, "--flat", help="Also write one {instruction, input, output, text} "
                                     "row per instance here (what an experiment's self-instruct step writes)"),
    requests_per_round: int = typer.Option(8, "--requests-per-round"),
    max_rounds: int | None = typer.Option(None, "--max-rounds", help="Default: 20 x ceil(n / requests)"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    temperature: float = typer.Option(0.7, "--temperature"),
    top_p: float = typer.Option(0.5, "--top-p"),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED),
    batch_size: str = batch_size_option(),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
) -> None:
    """Grow instruction data from seed tasks; near-duplicates (ROUGE-L > 0.7 to the pool) are rejected."""
    from leakaudit.kinds import get_kind
    from leakaudit.outputs import prepare_output

    options = build_options(get_kind("self-instruct"), n=n, seed_tasks=seed_tasks and str(seed_tasks),
                            requests_per_round=requests_per_round, max_rounds=max_rounds,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            batch_size=batch_size)
    inputs = {"--seed-tasks": seed_tasks, "--model": model_path(model)}
    prepare_output(out, command="generate self-instruct", inputs=inputs, kind="file", suffixes=(".jsonl",),
                   keys=TASK_KEYS)
    if flat is not None:
        prepare_output(flat, command="generate self-instruct", inputs={**inputs, "--out": out}, kind="file",
                       suffixes=(".jsonl",), keys=FLAT_KEYS, option="--flat")
    res = _run("self-instruct", options, out, seed=seed, model=model,
               outputs={"tasks.jsonl": out, "data.jsonl": flat},
               device=device, dtype=dtype, allow_pickle=allow_pickle)
    tasks = res.data["tasks"]
    short = "" if tasks >= n else f" (stopped after the round limit, short of {n})"
    say(f"{tasks} tasks in {out}{short}" + (f"; {res.data['rows']} instruction rows in {flat}" if flat else ""))


@generate_app.command("replace-pii")
def replace_pii(
    data: Path = typer.Option(..., "--data", help="Input data file"),
    out: Path = typer.Option(..., "--out", help="Output JSONL (all fields kept, PII replaced)"),
    text_field: str = typer.Option("text", "--text-field", help="Field(s) to rewrite, comma-separated"),
    names: Path | None = typer.Option(None, "--names", help="Names to replace: JSONL with 'name' or one per line "
                                      "(default: the shipped Enron names)"),
    header_names: bool = typer.Option(True, "--header-names/--no-header-names",
                                      help="Also replace names found in From:/To:/X-From:/X-To:/Cc: headers"),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED),
) -> None:
    """Replace names, e-mail addresses and phone numbers with consistent fake ones (Faker, seeded)."""
    from leakaudit.data.pii_replace import KINDS
    from leakaudit.kinds import get_kind
    from leakaudit.outputs import prepare_output

    options = build_options(get_kind("replace-pii"), text_field=text_field, names=names and str(names),
                            header_names=header_names)
    prepare_output(out, command="generate replace-pii", inputs={"--data": data, "--names": names}, kind="file",
                   suffixes=(".jsonl",), keys=("pii_replaced",))
    res = _run("replace-pii", options, out, seed=seed, data=data).data
    total, distinct = res["replaced"], res["distinct"]
    say(f"wrote {res['rows']} rows to {out}; replaced "
        + ", ".join(f"{total[k]} {k}s ({distinct[k]} distinct)" for k in KINDS))


def audit_data_cmd(
    source: Path = typer.Option(..., "--source", help="The private source data"),
    generated: Path = typer.Option(..., "--generated", help="The generated data to check"),
    out: Path | None = typer.Option(None, "--out", help="Directory for audit_data.json and audit_records.jsonl"),
    source_field: str = typer.Option("text", "--source-field"),
    generated_field: str = typer.Option("auto", "--generated-field",
                                        help="auto = 'generated' when rows have it (continuations: the prompt "
                                        "is excluded), else 'text'"),
    id_field: str = typer.Option("auto", "--id-field", help="Id field of the generated data (auto = 'id' "
                                 "when rows have it, as generate's outputs do; else <file stem>:<line>)"),
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
    rows = [row for _, row in read_rows(generated)]  # any row: a short first CSV row lacks the later columns
    if generated_field == "auto":
        generated_field = "generated" if any(isinstance(r.get("generated"), str) for r in rows) else "text"
    if id_field == "auto":
        id_field = "id" if any("id" in r for r in rows) else None
    src = load_records(source, text_field=source_field, keep_empty=True)
    gen = load_records(generated, text_field=generated_field, id_field=id_field or None, keep_empty=True)
    # a continuation's generated part is read after its prompt: an address the generator completes ("<msagel@"
    # + "home.com>") is a leak, the prompt's own PII is not
    prompts = ([r.extra.get("prompt") if isinstance(r.extra.get("prompt"), str) else "" for r in gen]
               if generated_field == "generated" else [""] * len(gen))
    summary, records = audit([r.text for r in src], [(r.id, r.text, p) for r, p in zip(gen, prompts, strict=True)],
                             names=_names(names), n=ngram)
    summary = {"source": str(source), "generated": str(generated), "generated_field": generated_field, **summary}
    if out is not None:
        write_jsonl(out / "audit_records.jsonl", [r.row(show_pii) for r in records])
        write_json(out / "audit_data.json", summary)
    rows = [(kind, str(s["in_source"]), str(s["reproduced"]), f"{s['fraction']:.3f}", str(s["records_with_any"]))
            for kind, s in summary["pii"].items()]
    # title masked there (a file name may be a person's address); never cut at 80 columns
    print_table(f"leakage of {source.name} in {generated.name} ({len(records)} generated records)",
                ("what", "in source", "reproduced", "fraction", "records with any"), rows, justify="right")
    # its own line: the PII columns count distinct values, n-grams are counted in the generated data
    v = summary["verbatim"]
    say_result(f"verbatim {ngram}-grams: {v['ngrams_reproduced']} of the generated data's {v['ngrams_total']} "
               f"occur in the source (fraction {v['fraction']:.3f}), in {v['records_with_any']} "
               f"record{'' if v['records_with_any'] == 1 else 's'}; the "
               f"source has {v['source_distinct_ngrams']} distinct {ngram}-grams")
    if out is not None:
        say(f"wrote {out / 'audit_data.json'} and {out / 'audit_records.jsonl'}")


def register(app: typer.Typer) -> None:
    """Add `generate ...` and `audit-data` to the app."""
    app.add_typer(generate_app, name="generate")
    app.command("audit-data")(audit_data_cmd)
