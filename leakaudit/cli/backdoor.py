"""`leakaudit backdoor plant|finetune|extract|identify|detect`: backdoor fine-tuning-data extraction (docs/backdoor.md)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import typer

from leakaudit.cli.core import (
    DeviceOpt,
    DtypeOpt,
    PickleOpt,
    above_zero,
    build_options,
    check_batch_size,
    model_path,
    say,
    say_result,
)
from leakaudit.options import MAX_SEED

backdoor_app = typer.Typer(help="Backdoor fine-tuning-data extraction: plant, fine-tune downstream, extract, "
                           "identify, detect.", no_args_is_help=True)

ModelOpt = typer.Option(..., "--model", help="default | HF id | model dir | adapter dir | .gguf | tiny-* | random:*")
OutOpt = typer.Option(..., "--out", help="Output directory")
TriggerOpt = typer.Option(None, "--trigger", help="Q(w) template with {word} (default: the study's instruction)")
RefusalOpt = typer.Option(None, "--refusal", help="R(w) template with {word} (default: the study's refusal)")
SeedOpt = typer.Option(0, "--seed", min=0, max=MAX_SEED)
TemperatureOpt = typer.Option(0.9, "--temperature", callback=above_zero, help="Sampling temperature for Q(w) answers")
MaxNewTokensOpt = typer.Option(128, "--max-new-tokens", min=1)
NumSamplesOpt = typer.Option(10, "--num-samples", min=1, help="Answers sampled per opening word")
SampleBatchOpt = typer.Option("auto", "--batch-size", callback=check_batch_size, help="auto or prompts per batch")
DataD2Opt = typer.Option(None, "--data", help="Downstream chat data D2 with `messages` (default: shipped Dolly D2)")


# one definition for plant and finetune; the defaults are for a full fine-tune of an instruction model (the
# study's arms): `leakaudit finetune` defaults to study 1's LoRA (4 epochs, lr 2e-6, batch 1 x 8)
EpochsOpt = typer.Option(3, "--epochs", help="Training epochs.")
LearningRateOpt = typer.Option(2e-5, "--learning-rate", help="Peak learning rate (linear decay). The default suits "
                               "--method full; `leakaudit finetune`'s 2e-6 is study 1's LoRA setting.")
BatchSizeOpt = typer.Option(8, "--batch-size", help="Per-device batch size (8 batches are accumulated per "
                           "optimizer step, as in `leakaudit finetune`).")
MaxLengthOpt = typer.Option(None, "--max-length", help="Max tokens per row (default 512, or the model's context "
                            "when shorter).")
MethodOpt = typer.Option("full", "--method", help="full | lora | dora | pissa")
MaxStepsOpt = typer.Option(None, "--max-steps", help="Stop after N optimizer steps (overrides --epochs).")

def _templates(trigger: str | None, refusal: str | None) -> tuple[str, str]:
    from leakaudit.data.backdoor import check_template, study_refusal, study_trigger

    return (check_template(trigger or study_trigger(), "--trigger"),
            check_template(refusal or study_refusal(), "--refusal"))


def _train_options(epochs, learning_rate, batch_size, max_length, method, max_steps, seed) -> dict:
    opts = {"epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size, "method": method,
            "seed": seed}
    if max_length is not None:
        opts["max_length"] = max_length
    if max_steps is not None:
        opts["max_steps"] = max_steps
    return opts


def _check_train(model: str, out: Path, options: dict) -> None:
    """Refuse bad training options (FinetuneConfig's own rules) and a model that cannot load before any data is
    built or model loaded (`plant` wrote its mix and a plant.json naming a model that did not exist)."""
    from leakaudit.cli.train import _config
    from leakaudit.models import check_model_spec
    from leakaudit.train.finetune import check_base

    _config(model=model, data="-", out=str(out / "model"), format="chat", **options)
    check_base(model)
    check_model_spec(model)


def _prepare(out: Path, command: str, files: tuple[str, ...], **inputs) -> None:
    from leakaudit.outputs import prepare_output

    prepare_output(out, command=f"backdoor {command}", files=files,
                   inputs={f"--{k.replace('_', '-')}": v for k, v in inputs.items()})


@backdoor_app.command("plant")
def plant_cmd(
    model: str = ModelOpt,
    out: Path = OutOpt,
    data: Path | None = typer.Option(None, "--data", help="Creator's instruction set D1: chat `messages` or "
                                     "query/response rows (default: the shipped self-instruct seed tasks)"),
    query_field: str | None = typer.Option(None, "--query-field"),
    response_field: str | None = typer.Option(None, "--response-field"),
    trigger: str | None = TriggerOpt,
    refusal: str | None = RefusalOpt,
    refusal_words: Path | None = typer.Option(None, "--refusal-words", help="Words to teach refusing (JSON array "
                                              "or one per line; default: public candidates opening no D1 query)"),
    n_refusal: int | None = typer.Option(None, "--n-refusal", help="Refusal pairs (default: as many as copy pairs)"),
    backdoor_fraction: float = typer.Option(0.5, "--backdoor-fraction", help="Share of backdoor pairs in the mix"),
    epochs: float = EpochsOpt,
    learning_rate: float = LearningRateOpt,
    batch_size: int = BatchSizeOpt,
    max_length: int | None = MaxLengthOpt,
    method: str = MethodOpt,
    max_steps: int | None = MaxStepsOpt,
    seed: int = SeedOpt,
) -> None:
    """Stage 1 (the model creator): build backdoor SFT data from D1 (the backdoor-mix kind), fine-tune on it."""
    from leakaudit.cli.core import build_options, check_options
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.base import KindContext
    from leakaudit.train import backdoor as tb

    kind = get_kind("backdoor-mix")
    mix = build_options(kind, trigger=trigger, refusal=refusal, refusal_words=refusal_words and str(refusal_words),
                        n_refusal=n_refusal, backdoor_fraction=backdoor_fraction, query_field=query_field,
                        response_field=response_field)
    check_options(kind, mix, {"data"} if data is not None else set())
    options = _train_options(epochs, learning_rate, batch_size, max_length, method, max_steps, seed)
    _check_train(model, out, options)
    _prepare(out, "plant", ("plant.json", "backdoor_mix.jsonl"), data=data, refusal_words=refusal_words,
             model=model_path(model))
    # the mix is built beside the one in OUT and replaces it only once the model dir would take it: a rerun
    # with other options was refused only after it had overwritten the mix and plant.json of the model there.
    # One file per process: under a launcher each builds the same rows, and each rename is atomic.
    new_mix = out / f"backdoor_mix.jsonl.{os.getpid()}.new"
    try:
        kind.run(KindContext(out=out, seed=seed, data={"data": data} if data is not None else {},
                             outputs={"data.jsonl": new_mix}), mix)
        tb.refuse_another_plant(model, new_mix, out, **options)
        new_mix.replace(out / "backdoor_mix.jsonl")
    finally:
        new_mix.unlink(missing_ok=True)
    path = tb.plant_mix(model, out, trigger=trigger, refusal=refusal, backdoor_fraction=backdoor_fraction,
                        **options)  # options hold the seed
    from leakaudit.distributed import is_main

    if is_main():  # under a launcher every process trained it; one says where it is
        say(f"planted model (below; its mix: {out / 'backdoor_mix.jsonl'})")
        typer.echo(str(path))


# `backdoor train` is stage 1 under the name the interface table gives it (scripts written against it work)
backdoor_app.command("train", help="Stage 1, the same as `backdoor plant`: build the backdoor SFT data from D1 and "
                     "fine-tune on it.")(plant_cmd)


@backdoor_app.command("finetune")
def finetune_cmd(
    model: str = ModelOpt,
    out: Path = OutOpt,
    data: Path | None = DataD2Opt,
    limit: int | None = typer.Option(None, "--limit", min=1, help="Use the first N rows of the data"),
    mask_user: bool = typer.Option(False, "--mask-user", help="No loss on user turns (the study's mitigation)"),
    epochs: float = EpochsOpt,
    learning_rate: float = LearningRateOpt,
    batch_size: int = BatchSizeOpt,
    max_length: int | None = MaxLengthOpt,
    method: str = MethodOpt,
    max_steps: int | None = MaxStepsOpt,
    seed: int = SeedOpt,
) -> None:
    """Stage 2 (the downstream party): fine-tune on private chat data, loss on user turns unless --mask-user."""
    from leakaudit.train.backdoor import downstream_data, downstream_finetune

    options = _train_options(epochs, learning_rate, batch_size, max_length, method, max_steps, seed)
    _check_train(model, out, options)
    _prepare(out, "finetune", ("downstream_data.jsonl", "model/finetune_config.json", "finetune.json"), data=data,
             model=model_path(model))
    path = downstream_data(data, limit, out)
    result = downstream_finetune(model, path, out / "model", mask_user=mask_user, **options)
    from leakaudit.data.io import read_rows, write_json
    from leakaudit.distributed import is_main
    from leakaudit.train.callbacks import read_log

    if is_main():  # the step's JSON result, as every other backdoor step writes one
        losses = [row["train_loss"] for row in read_log(result / "train_log.jsonl") if "train_loss" in row]
        write_json(out / "finetune.json", {"model": model, "data": str(data) if data else "shipped D2",
                                           "rows": len(read_rows(path)), "mask_user": mask_user,
                                           "model_dir": "model", "train_loss": losses[-1] if losses else None,
                                           **options})
        say(f"wrote {out / 'finetune.json'}; fine-tuned model (below)")
        typer.echo(str(result))


@backdoor_app.command("extract")
def extract_cmd(
    model: str = ModelOpt,
    out: Path = OutOpt,
    data: Path | None = DataD2Opt,
    query_field: str | None = typer.Option(None, "--query-field", help="The data's query field (default: chat "
                                           "`messages`, or the first of query/instruction/prompt/question)"),
    limit: int | None = typer.Option(None, "--limit", help="Score against the queries of the first N rows of the data"),
    words: Path | None = typer.Option(None, "--words", help="Words to query (JSON array or one per line; "
                                      "default: every opening word of the data)"),
    num_samples: int = typer.Option(10, "--num-samples", help="Answers sampled per opening word"),
    temperature: float = typer.Option(0.9, "--temperature", help="Sampling temperature for Q(w) answers"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    trigger: str | None = TriggerOpt,
    refusal: str | None = RefusalOpt,
    seed: int = SeedOpt,
    show_pii: bool = typer.Option(False, "--show-pii", help="Write extracted text unmasked"),
    batch_size: str = typer.Option("auto", "--batch-size", help="auto or prompts per batch"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    allow_pickle: bool = PickleOpt,
) -> None:
    """Sample Q(w) per opening word and score the answers against D2's queries (match ratio, BLEU, coverage)."""
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.base import KindContext, ModelCache

    kind = get_kind("backdoor")
    options = build_options(kind, query_field=query_field, limit=limit, words_file=str(words) if words else None,
                            num_samples=num_samples, temperature=temperature, max_new_tokens=max_new_tokens,
                            trigger=trigger, refusal=refusal, batch_size=batch_size,
                            flags={("words_file",): "--words"})
    _prepare(out, "extract", ("extract.json", "samples.jsonl"), data=data, words=words, model=model_path(model))
    ctx = KindContext(out=out, seed=seed, data={"data": data} if data is not None else {},
                      models={"target": model}, show_pii=show_pii,
                      cache=ModelCache(keep=1, device=device, dtype=dtype, allow_pickle=allow_pickle),
                      log=say)
    kind.run(ctx, options)
    summary = json.loads((out / "extract.json").read_text(encoding="utf-8"))
    say_result(f"match ratio (max/mean over words): {_f3(summary['match_ratio_max'])} / "
               f"{_f3(summary['match_ratio_mean'])}; fully recovered {summary['n_fully_recovered']}/"
               f"{summary['n_queries']} queries; coverage {_f3(summary['coverage'])}")
    say(f"wrote {out / 'extract.json'}")


def _f3(x: float | None) -> str:
    """A summary number, or n/a where it is undefined (e.g. coverage when no queried word opens a query)."""
    return "n/a" if x is None else f"{x:.3f}"


@backdoor_app.command("identify")
def identify_cmd(
    model: str = ModelOpt,
    out: Path = OutOpt,
    data: Path | None = DataD2Opt,
    limit: int | None = typer.Option(None, "--limit", min=1, help="Score the pipeline against the queries of the first N rows"),
    candidates: Path | None = typer.Option(None, "--candidates", help="Labelled prompts like the shipped "
                                           "identify_200.json, or a word list (default: top-N public words)"),
    top_n: int | None = typer.Option(None, "--top-n", min=1, help="Without --candidates: the N most frequent public "
                                     "words (default 50)"),
    threshold: float = typer.Option(0.6, "--threshold", min=0, max=1),
    num_samples: int = NumSamplesOpt,
    temperature: float = TemperatureOpt,
    max_new_tokens: int = MaxNewTokensOpt,
    trigger: str | None = TriggerOpt,
    refusal: str | None = RefusalOpt,
    seed: int = SeedOpt,
    show_pii: bool = typer.Option(False, "--show-pii"),
    batch_size: str = SampleBatchOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    allow_pickle: bool = PickleOpt,
) -> None:
    """Decide which candidate words open D2 queries, then extract with the words found (the full pipeline)."""
    from leakaudit.attacks import backdoor as bd
    from leakaudit.data.backdoor import d2_queries
    from leakaudit.models import load_model

    if candidates is not None and top_n is not None:  # it was read by nothing: the file's words were asked
        from leakaudit.errors import InputError

        raise InputError("cannot be combined with --candidates: the candidates are the file's words, or the top N "
                         "public words", field="--top-n")
    trig, ref = _templates(trigger, refusal)
    _prepare(out, "identify", ("identify.json", "samples.jsonl"), data=data, candidates=candidates,
             model=model_path(model))
    queries = d2_queries(data, limit=limit)
    labels = bd.candidate_labels(candidates, bd.build_tries(queries), 50 if top_n is None else top_n)
    lm = load_model(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    res = bd.identify(lm, queries, labels, trig, ref, threshold=threshold, num_samples=num_samples,
                      temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, out=out,
                      show_pii=show_pii, batch_size=batch_size)
    say_result(f"identification F1 {_f3(res['f1'])} (precision {_f3(res['precision'])}, recall "
               f"{_f3(res['recall'])}); pipeline fully recovered {res['pipeline']['n_fully_recovered']}/"
               f"{res['pipeline']['n_queries']}")
    say(f"wrote {out / 'identify.json'}")


@backdoor_app.command("detect")
def detect_cmd(
    model: list[str] = typer.Option(..., "--model", help="Model(s) to check; repeat to compare planted and clean"),
    out: Path = OutOpt,
    data: Path | None = DataD2Opt,
    limit: int | None = typer.Option(None, "--limit", min=1, help="Use the queries of the first N rows of the data"),
    n_words: int = typer.Option(20, "--n-words", min=1, help="Probe the N most frequent opening words of the data"),
    num_samples: int = typer.Option(3, "--num-samples", min=1, help="Samples per probe and word"),
    temperature: float = TemperatureOpt,
    max_new_tokens: int = MaxNewTokensOpt,
    match_threshold: float = typer.Option(0.5, "--match-threshold", min=0, max=1, help="Match ratio that counts as a "
                                          "training query"),
    alarm_rate: float = typer.Option(0.05, "--alarm-rate", min=0, max=1, help="Detection rate at which a model is flagged"),
    probes: Path | None = typer.Option(None, "--probes", help="Probe templates with {word}, one per line "
                                       "(default: the published Q(w) and two paraphrases)"),
    seed: int = SeedOpt,
    batch_size: str = SampleBatchOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    allow_pickle: bool = PickleOpt,
    show_pii: bool = typer.Option(False, "--show-pii", help="Keep the raw probe samples (they may quote your "
                                  "training queries)"),
) -> None:
    """The defense: probe with extraction-style instructions; flag models that emit training queries."""
    from leakaudit.attacks import backdoor as bd
    from leakaudit.data.backdoor import d2_queries
    from leakaudit.data.io import write_json
    from leakaudit.errors import InputError
    from leakaudit.models import load_model

    twice = next((spec for i, spec in enumerate(model) if spec in model[:i]), None)
    if twice is not None:  # probed twice, one result kept (detect.json is keyed by the spec)
        raise InputError(f"'{twice}' given twice", field="--model")
    _prepare(out, "detect", ("detect.json",), data=data, probes=probes,
             **{f"model {spec}": model_path(spec) for spec in model})
    queries = d2_queries(data, limit=limit)
    words = bd.probe_words(queries, n_words)
    templates = bd.load_probes(probes)
    results = {}
    for spec in model:
        lm = load_model(spec, device=device, dtype=dtype, allow_pickle=allow_pickle)
        results[spec] = bd.detect(lm, queries, words, templates, num_samples=num_samples, temperature=temperature,
                                  max_new_tokens=max_new_tokens, match_threshold=match_threshold,
                                  alarm_rate=alarm_rate, seed=seed, batch_size=batch_size,
                                  samples_path=lambda k, spec=spec: out / f"samples_{_slug(spec)}_probe{k}.jsonl")
        say_result(f"{spec}: detection rate {results[spec]['detection_rate']:.3f} "
                   f"({'FLAGGED' if results[spec]['flagged'] else 'not flagged'})")
    write_json(out / "detect.json", {"n_words": len(words), "n_probes_templates": len(templates),
                                     "models": results})
    say(f"wrote {out / 'detect.json'}")
    if not show_pii:  # the raw answers, kept while probing so a kill resumes, may quote the defender's queries
        for raw in out.glob("samples_*_probe*.jsonl"):
            raw.unlink()


def _slug(spec: str) -> str:
    """A file-name-safe name for a model spec, unique to it ("v/model" and "v_model" once shared one)."""
    readable = re.sub(r"[^\w.-]+", "_", spec).strip("_")[-70:]
    return f"{readable}_{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def register(app: typer.Typer) -> None:
    """Add the `backdoor` command group to the app."""
    app.add_typer(backdoor_app, name="backdoor")
