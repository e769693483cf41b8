"""Core commands: `score` (the batched, cached scoring engine) and `model-info`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from leakaudit.errors import InputError

err = Console(stderr=True)

ModelOpt = typer.Option(..., "--model", help="default | HF id | model dir | adapter dir | .gguf | tiny-gpt-neox | tiny-opt")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1 ...")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (bf16 where the hardware is fast at it, else fp32), fp32, bf16")
PickleOpt = typer.Option(False, "--allow-pickle", help="Allow loading pickle weights (*.bin); only for trusted files")


def score(
    model: str = ModelOpt,
    data: Path = typer.Option(..., "--data", help="Texts: .jsonl/.json/.csv/.arrow/.parquet or HF dataset dir"),
    out: Path = typer.Option(..., "--out", help="Output JSONL, one row per text"),
    text_field: str = typer.Option("text", "--text-field"),
    id_field: str | None = typer.Option(None, "--id-field", help="Default: <file stem>:<line>"),
    batch_size: str = typer.Option("auto", "--batch-size", help="auto (token budget) or sequences per batch"),
    max_length: int | None = typer.Option(None, "--max-length", help="Window in tokens (default: model context)"),
    stride: int | None = typer.Option(None, "--stride", help="Window step for long texts (default: max-length/2)"),
    token_logprobs: bool = typer.Option(False, "--token-logprobs", help="Also write per-token log p"),
    moments: bool = typer.Option(False, "--moments", help="Also write per-token mean/var of log p (Min-K%++)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the score cache"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    allow_pickle: bool = PickleOpt,
) -> None:
    """Score texts with one batched, cached teacher-forced pass: per-text log-likelihood statistics."""
    from leakaudit.data.io import load_records, write_jsonl
    from leakaudit.models import load_model
    from leakaudit.scoring import score_texts

    if out.suffix != ".jsonl":
        raise InputError("output must be a .jsonl file", file=out, field="--out")
    records = load_records(data, text_field=text_field, id_field=id_field)
    lm = load_model(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    scorer = score_texts
    try:  # data-parallel under accelerate/torchrun when the distributed helper is present
        from leakaudit.distributed import score_texts_distributed as scorer  # type: ignore[no-redef]
    except ImportError:
        pass
    results = scorer(lm, [r.text for r in records], moments=moments, batch_size=batch_size,
                     max_length=max_length, stride=stride, cache=not no_cache)
    if not _is_main_process():
        return
    rows = []
    for rec, res in zip(records, results, strict=True):
        row = {"id": rec.id, "n_tokens": res.n_tokens, "sum_logp": res.sum_logp, "mean_logp": res.mean_logp}
        if token_logprobs:
            row["token_logprobs"] = [round(float(x), 6) for x in res.logp]
        if moments:
            row["mu"] = [round(float(x), 6) for x in res.mu]
            row["var"] = [round(float(x), 6) for x in res.var]
        rows.append(row)
    write_jsonl(out, rows)
    n_tok = sum(r["n_tokens"] for r in rows)
    err.print(f"scored {len(rows)} texts ({n_tok} tokens) with {model} ({lm.dtype}, {lm.device}) -> {out}", markup=False, highlight=False)


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


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def register(app: typer.Typer) -> None:
    """Add the core commands."""
    app.command("score")(score)
    app.command("model-info")(model_info)
