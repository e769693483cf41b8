"""`leakaudit mia` and `leakaudit user-inference`: thin wrappers that load data and models, run the attacks
from leakaudit.attacks and write the files docs/attacks.md lists (only the main process, under a launcher)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from leakaudit.cli.core import batch_size_option, check_window, model_path
from leakaudit.errors import InputError

err = Console(stderr=True)

REFERENCE_FREE_DEFAULT = "loss,zlib,min_k,min_k_pp"
TRUE_LABELS = {"1", "true", "yes", "member", "in"}
FALSE_LABELS = {"0", "false", "no", "nonmember", "non-member", "out"}


def parse_label(value: Any, path: Path, line: int, field: str) -> int:
    """A membership label from a data row: 1/0, true/false, member/nonmember, in/out."""
    text = str(value).strip().lower()
    if isinstance(value, bool) or text in TRUE_LABELS | FALSE_LABELS:
        return 1 if (value is True or text in TRUE_LABELS) else 0
    raise InputError(f"label '{value}' is not one of 1/0, true/false, member/nonmember, in/out", file=path,
                     line=line, field=field)


def _labelled(path: Path, text_field: str, id_field: str | None, label_field: str, user_field: str | None = None):
    """Split one labelled file into (members, non-members) records."""
    from leakaudit.data.io import load_records

    records = load_records(path, text_field=text_field, id_field=id_field, user_field=user_field)
    ins, outs = [], []
    for r in records:
        if label_field not in r.extra:
            raise InputError("missing", file=path, line=r.line, field=label_field)
        (ins if parse_label(r.extra[label_field], path, r.line, label_field) else outs).append(r)
    return ins, outs


def _load_sets(members: Path | None, nonmembers: Path | None, data: Path | None, label_field: str, text_field: str,
               id_field: str | None, user_field: str | None = None):
    from leakaudit.data.io import load_records

    if data is not None:
        if members is not None or nonmembers is not None:
            raise InputError("give either --data with --label-field, or --members and --nonmembers", field="--data")
        ins, outs = _labelled(data, text_field, id_field, label_field, user_field)
        src_in = src_out = data
    else:
        if members is None or nonmembers is None:
            raise InputError("give --members and --nonmembers (or one --data file with --label-field)",
                             field="--members" if members is None else "--nonmembers")
        ins = load_records(members, text_field=text_field, id_field=id_field, user_field=user_field)
        outs = load_records(nonmembers, text_field=text_field, id_field=id_field, user_field=user_field)
        src_in, src_out = members, nonmembers
        clash = {r.id for r in ins} & {r.id for r in outs}
        if clash and id_field:
            raise InputError(f"id '{sorted(clash)[0]}' is used in both files", file=nonmembers, field=id_field)
    if not ins:
        raise InputError("no members", file=src_in, field=label_field if data else None)
    if not outs:
        raise InputError("no non-members", file=src_out, field=label_field if data else None)
    return ins, outs, src_in, src_out


def _summary(title: str, metrics: dict) -> None:
    table = Table(title=title)
    for col in ("", "AUC", "95% CI", "TPR@1%FPR", "TPR@0.1%FPR", "advantage"):
        table.add_column(col)
    for name, m in metrics.items():
        table.add_row(name, f"{m.auc:.3f}", f"[{m.auc_ci[0]:.3f}, {m.auc_ci[1]:.3f}]", f"{m.tpr_at_fpr[0.01]:.3f}",
                      f"{m.tpr_at_fpr[0.001]:.3f}", f"{m.advantage:.3f}")
    err.print(table)


def mia(
    target: str = typer.Option(..., "--target", help="Model under attack (any model spec)"),
    reference: str | None = typer.Option(None, "--reference", help="Reference model for `ref` (any model spec)"),
    members: Path | None = typer.Option(None, "--members", help="Texts used in training"),
    nonmembers: Path | None = typer.Option(None, "--nonmembers", help="Texts not used in training"),
    data: Path | None = typer.Option(None, "--data", help="One file with both, labelled by --label-field"),
    label_field: str = typer.Option("label", "--label-field", help="1/0, true/false, member/nonmember"),
    attacks: str | None = typer.Option(None, "--attacks", help="Comma list (default: loss,zlib,min_k,min_k_pp"
                                                               " plus ref when --reference is given)"),
    out: Path = typer.Option(..., "--out", help="Output dir: mia.json, scores.jsonl, roc.png"),
    text_field: str = typer.Option("text", "--text-field"),
    id_field: str | None = typer.Option(None, "--id-field", help="Default: <file stem>:<line>"),
    k: float = typer.Option(0.2, "--k", help="Fraction of lowest tokens for min_k and min_k_pp (0 < k <= 1)"),
    recall_prefix: Path | None = typer.Option(None, "--recall-prefix", help="Non-member texts for the ReCaLL prefix"
                                                                             " (default: first --recall-shots"
                                                                             " non-members, then not evaluated)"),
    recall_shots: int = typer.Option(3, "--recall-shots"),
    n_bootstrap: int = typer.Option(1000, "--n-bootstrap", min=0, help="Bootstrap resamples for the AUC CI"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: str = batch_size_option(),
    max_length: int | None = typer.Option(None, "--max-length", min=2),
    stride: int | None = typer.Option(None, "--stride", min=1),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the score cache"),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
) -> None:
    """Membership inference: score members and non-members with each attack; AUC with CI, TPR at low FPR."""
    from leakaudit.attacks.mia import TooShortError, run_mia
    from leakaudit.data.io import load_records, write_json, write_jsonl
    from leakaudit.distributed import is_main
    from leakaudit.metrics import plot_roc
    from leakaudit.models import load_model
    from leakaudit.outputs import prepare_output

    names = [a.strip() for a in (attacks or REFERENCE_FREE_DEFAULT + (",ref" if reference else "")).split(",")
             if a.strip()]
    options: dict[str, dict] = {}
    for name in ("min_k", "min_k_pp"):
        if name in names:
            if not 0 < k <= 1:
                raise InputError(f"{k} is not in (0, 1]", field="--k")
            options[name] = {"k": k}
    if "recall" in names and recall_shots < 1:  # only the options of attacks that run are checked
        raise InputError("must be at least 1", field="--recall-shots")
    check_window(max_length, stride)
    prepare_output(out, command="mia", files=("mia.json", "scores.jsonl"),
                   inputs={"--members": members, "--nonmembers": nonmembers, "--data": data,
                           "--recall-prefix": recall_prefix, "--target": model_path(target),
                           "--reference": model_path(reference)})
    if "recall" in names:
        options["recall"] = {"shots": recall_shots}
        if recall_prefix is not None:
            options["recall"]["prefix"] = tuple(r.text for r in load_records(recall_prefix, text_field=text_field))
    ins, outs, src_in, src_out = _load_sets(members, nonmembers, data, label_field, text_field, id_field)
    from leakaudit.attacks import get_attack

    for name in names:  # fail on a bad attack name before loading any model
        get_attack(name, **options.get(name, {}))
    lm = load_model(target, device=device, dtype=dtype, allow_pickle=allow_pickle)
    ref = load_model(reference, device=device, dtype=dtype, allow_pickle=allow_pickle) if reference else None
    try:
        report = run_mia(lm, [r.text for r in ins], [r.text for r in outs], names, reference=ref,
                         attack_options=options, n_bootstrap=n_bootstrap, seed=seed, batch_size=batch_size,
                         max_length=max_length, stride=stride, cache=not no_cache)
    except TooShortError as exc:
        held = recall_shots if "recall" in names and recall_prefix is None else 0
        i = exc.index
        rec, src = (ins[i], src_in) if i < len(ins) else (outs[i - len(ins) + held], src_out)
        raise InputError("text has fewer than 2 tokens; no token can be scored", file=src, line=rec.line,
                         field=text_field) from None
    if not is_main():
        return
    js = report.to_json()
    js.update({"target": target, "reference": reference, "members": str(src_in), "nonmembers": str(src_out)})
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "scores.jsonl", report.rows([r.id for r in ins], [r.id for r in outs]))
    plot_roc(report.metrics, out / "roc.png", title=f"membership inference: {target}")
    write_json(out / "mia.json", js)
    for w in js["warnings"]:
        err.print(f"warning: {w}", markup=False, highlight=False)
    _summary(f"MIA on {target} ({len(ins)} members, {len(report.nonmember_index)} non-members)", report.metrics)
    err.print(f"wrote {out / 'mia.json'}, scores.jsonl, roc.png", markup=False, highlight=False)


def user_inference(
    target: str = typer.Option(..., "--target", help="Fine-tuned model under attack"),
    reference: str = typer.Option(..., "--reference", help="Model not tuned on any of these users"),
    data: Path = typer.Option(..., "--data", help="Users' samples; in/out by --label-field, or all in with"
                                                  " --data-out"),
    user_field: str = typer.Option(..., "--user-field", help="Field naming each sample's user"),
    data_out: Path | None = typer.Option(None, "--data-out", help="Samples of users not in training"),
    label_field: str = typer.Option("label", "--label-field", help="1/0 etc.; same for all of a user's rows"),
    samples_per_user: str = typer.Option("1,2,4,8,all", "--samples-per-user",
                                         help="Values of m: samples per user the attacker uses"),
    out: Path = typer.Option(..., "--out", help="Output dir: user_inference.json, user_scores.jsonl, roc_users.png"),
    text_field: str = typer.Option("text", "--text-field"),
    id_field: str | None = typer.Option(None, "--id-field"),
    n_bootstrap: int = typer.Option(1000, "--n-bootstrap", min=0),
    seed: int = typer.Option(0, "--seed"),
    batch_size: str = batch_size_option(),
    max_length: int | None = typer.Option(None, "--max-length", min=2),
    no_cache: bool = typer.Option(False, "--no-cache"),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
) -> None:
    """User inference: was a user's data in training? Mean log-likelihood ratio over m of their samples."""
    from leakaudit.attacks.user_inference import parse_m_values, run_user_inference
    from leakaudit.data.io import load_records, write_json, write_jsonl
    from leakaudit.distributed import is_main
    from leakaudit.metrics import plot_roc
    from leakaudit.models import load_model
    from leakaudit.outputs import prepare_output

    parse_m_values(samples_per_user)
    prepare_output(out, command="user-inference", files=("user_inference.json", "user_scores.jsonl"),
                   inputs={"--data": data, "--data-out": data_out, "--target": model_path(target),
                           "--reference": model_path(reference)})
    if data_out is not None:
        ins = load_records(data, text_field=text_field, id_field=id_field, user_field=user_field)
        outs = load_records(data_out, text_field=text_field, id_field=id_field, user_field=user_field)
        in_users = {r.user for r in ins}
        for r in outs:
            if r.user in in_users:
                raise InputError(f"user '{r.user}' is also in {data}", file=data_out, line=r.line, field=user_field)
    else:
        ins, outs = _labelled(data, text_field, id_field, label_field, user_field)
        first: dict[str, int] = {}
        for line, user, label in sorted([(r.line, r.user, 1) for r in ins] + [(r.line, r.user, 0) for r in outs]):
            if first.setdefault(user, label) != label:
                raise InputError(f"user '{user}' has rows labelled both in and out", file=data, line=line,
                                 field=label_field)
    lm = load_model(target, device=device, dtype=dtype, allow_pickle=allow_pickle)
    ref = load_model(reference, device=device, dtype=dtype, allow_pickle=allow_pickle)
    report = run_user_inference(lm, ref, ins, outs, samples_per_user, n_bootstrap=n_bootstrap, seed=seed,
                                batch_size=batch_size, max_length=max_length, cache=not no_cache)
    if not is_main():
        return
    js = report.to_json()
    js.update({"target": target, "reference": reference, "data": str(data)})
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "user_scores.jsonl", report.rows())
    plot_roc({f"m={m}": r for m, r in report.per_m.items()}, out / "roc_users.png",
             title=f"user inference: {target}")
    write_json(out / "user_inference.json", js)
    for w in js["warnings"]:
        err.print(f"warning: {w}", markup=False, highlight=False)
    _summary(f"user inference on {target} (samples per user m)", {f"m={m}": r for m, r in report.per_m.items()})
    err.print(f"wrote {out / 'user_inference.json'}, user_scores.jsonl, roc_users.png", markup=False,
              highlight=False)


def register(app: typer.Typer) -> None:
    """Add `mia` and `user-inference`."""
    app.command("mia")(mia)
    app.command("user-inference")(user_inference)
