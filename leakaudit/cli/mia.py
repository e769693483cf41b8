"""`leakaudit mia` and `leakaudit user-inference`: flags -> the kind's options and context -> kind.run (see
leakaudit/kinds/mia.py and leakaudit/kinds/user_inference.py, which write the output files) -> a summary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from leakaudit.cli.core import (
    FORMAT_HELP,
    MESSAGES_HELP,
    batch_size_option,
    build_options,
    given_on_command_line,
    messages_field_option,
    model_path,
    print_table,
    refuse_text_field_for_chat,
    say,
    say_result,
)
from leakaudit.errors import InputError
from leakaudit.options import MAX_SEED

#: option paths whose flag is not `--option-name` (`--k` is added for each attack that takes `k`: _k_flags)
MIA_FLAGS = {("attack_options",): "--attacks", ("attack_options", "recall", "shots"): "--recall-shots",
             ("attack_options", "recall", "prefix"): "--recall-prefix", ("cache",): "--no-cache",
             ("attack_options", "dc_pdd", "corpus"): "--dc-pdd-corpus",
             ("attack_options", "neighbourhood", "model"): "--neighbour-model",
             ("attack_options", "neighbourhood", "n_neighbours"): "--neighbours",
             ("attack_options", "lira", "references"): "--lira-reference"}
USER_FLAGS = {("m_values",): "--samples-per-user", ("cache",): "--no-cache"}


def takes_k(names: list[str]) -> list[str]:
    """The attacks among `names` whose options have a `k` (min_k, min_k_pp, and any attack added with one):
    `--k` is theirs, so a new attack with a `k` gets the flag without a list here to extend."""
    from leakaudit.attacks import ATTACKS

    return [n for n in names if n in ATTACKS and "k" in ATTACKS[n].Config.model_fields]


def _k_flags(names: list[str]) -> dict[tuple, str]:
    return {**MIA_FLAGS, **{("attack_options", n, "k"): "--k" for n in takes_k(names)}}


def _refuse_unused_flags(ctx: typer.Context, names: list[str]) -> None:
    """A flag given for an attack that does not run was ignored in silence (`--attacks loss --k 0.1` ran
    without complaint): refused as an experiment file's `attack_options` for an attack not run is."""
    from leakaudit.attacks import ATTACKS

    readers = {"k": ("--k", takes_k(list(ATTACKS))), "recall_shots": ("--recall-shots", ["recall"]),
               "recall_prefix": ("--recall-prefix", ["recall"]), "dc_pdd_corpus": ("--dc-pdd-corpus", ["dc_pdd"]),
               "neighbour_model": ("--neighbour-model", ["neighbourhood"]),
               "neighbours": ("--neighbours", ["neighbourhood"]), "lira_reference": ("--lira-reference", ["lira"])}
    for param, (flag, which) in readers.items():
        if given_on_command_line(ctx, param) and not set(which) & set(names):
            raise InputError(f"no attack that runs takes it (it is for {', '.join(which)}; the attacks are "
                             f"{', '.join(names)})", field=flag)


def _context(out: Path, ins: list, outs: list, src_in: Path, src_out: Path, models: dict[str, str | None],
             fields: dict[str, Any], seed: int, device: str, dtype: str, allow_pickle: bool) -> Any:
    """The kind's context: the records read here (labelled files are split by the CLI), their files for
    error messages, and the models, loaded on first use."""
    from leakaudit.kinds.base import KindContext, ModelCache

    return KindContext(out=out, seed=seed, data={"members": src_in, "nonmembers": src_out},
                       data_fields={"members": fields, "nonmembers": fields},
                       loaded={"members": ins, "nonmembers": outs},
                       models={role: spec for role, spec in models.items() if spec is not None},
                       cache=ModelCache(device=device, dtype=dtype, allow_pickle=allow_pickle), log=say)


def _summary(title: str, metrics: dict[str, dict], unit: str = "non-members", counts: str | None = None) -> None:
    """The ROC numbers of each attack (or each m) as they appear in mia.json / user_inference.json; a TPR at
    a low FPR the negatives cannot resolve says how many it needs. `counts` heads a column of each m's users
    in/out of training (user inference: each m keeps only the users with m samples)."""
    from leakaudit.metrics import tpr_text

    heads = ("", *([counts] if counts else []), "AUC", "95% CI", "TPR@1%FPR [95% CI]", "TPR@0.1%FPR [95% CI]",
             "advantage")
    rows = []

    def f(x: Any) -> str:
        return "–" if x is None else f"{x:.3f}"

    for name, m in metrics.items():
        ci = m.get("auc_ci") or [None, None]
        tpr, needs, tpr_ci = m.get("tpr_at_fpr") or {}, m.get("tpr_needs_nonmembers") or {}, m.get("tpr_ci") or {}
        rows.append((name, *([f"{m['n_users_in']}/{m['n_users_out']}"] if counts else []),
                     f(m["auc"]), f"[{f(ci[0])}, {f(ci[1])}]",
                     *(tpr_text(tpr.get(k), needs.get(k), unit, ci=tpr_ci.get(k)) for k in ("0.01", "0.001")),
                     f(m.get("advantage"))))
    print_table(title, heads, rows)  # the title masked there: the model spec may name a person


def mia(
    command: typer.Context,
    target: str = typer.Option(..., "--target", "--model", help="Model under attack (any model spec)"),
    reference: str | None = typer.Option(None, "--reference", help="Reference model for `ref` (any model spec)"),
    baseline: str | None = typer.Option(None, "--baseline", help="A model to compare the target with on the same "
                                        "texts (e.g. the one it was fine-tuned from): paired Δ AUC per attack with "
                                        "its 95% CI, a verdict line each (comparisons.json; its scores in "
                                        "OUT/baseline)"),
    members: Path | None = typer.Option(None, "--members", help="Texts used in training"),
    nonmembers: Path | None = typer.Option(None, "--nonmembers", help="Texts not used in training"),
    data: Path | None = typer.Option(None, "--data", help="One file with both, labelled by --label-field"),
    label_field: str = typer.Option("label", "--label-field", help="1/0, true/false, yes/no, member/nonmember, in/out"),
    attacks: str | None = typer.Option(None, "--attacks", help="Comma list of loss, zlib, min_k, min_k_pp, "
                                       "lowercase, recall, dc_pdd, gradnorm, neighbourhood, ref, lira (default: loss,zlib,min_k,min_k_pp, "
                                       "plus ref when --reference is given; docs/attacks.md defines each)"),
    out: Path = typer.Option(..., "--out", help="Output dir: mia.json, scores.jsonl, roc.png"),
    text_field: str = typer.Option("text", "--text-field"),
    id_field: str | None = typer.Option(None, "--id-field", help="Default: <file stem>:<line>"),
    data_format: str = typer.Option("text", "--format", help=FORMAT_HELP),
    messages_field: str = typer.Option("messages", "--messages-field", help=MESSAGES_HELP),
    k: float = typer.Option(0.2, "--k", help="Fraction of lowest tokens, for every attack that takes one "
                            "(min_k, min_k_pp; 0 < k <= 1)"),
    recall_prefix: Path | None = typer.Option(None, "--recall-prefix", help="Non-member texts for the ReCaLL prefix"
                                                                             " (default: first --recall-shots"
                                                                             " non-members, then not evaluated)"),
    recall_shots: int = typer.Option(3, "--recall-shots", min=0),
    dc_pdd_corpus: str = typer.Option("dolly", "--dc-pdd-corpus", help="Reference corpus for dc_pdd's token "
                                      "frequencies: a built-in dataset or a data file with a `text` field"),
    neighbour_model: str | None = typer.Option(None, "--neighbour-model", help="Masked language model that "
                                               "proposes the neighbourhood attack's word swaps (a local folder or a "
                                               "hub id, e.g. bert-base-uncased)"),
    neighbours: int = typer.Option(25, "--neighbours", min=1, help="Neighbours per text, for neighbourhood"),
    lira_reference: list[str] | None = typer.Option(None, "--lira-reference", help="A reference model for lira "
                                                    "(any model spec), not trained on these texts; repeat it for "
                                                    "each (at least 2)"),
    n_bootstrap: int = typer.Option(1000, "--n-bootstrap", min=0, help="Bootstrap resamples for the AUC and TPR intervals (0: none)"),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED),
    batch_size: str = batch_size_option(),
    max_length: int | None = typer.Option(None, "--max-length", min=2),
    stride: int | None = typer.Option(None, "--stride", min=1),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the score cache"),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
) -> None:
    """Membership inference: score members and non-members with each attack; AUC with CI, TPR at low FPR."""
    from leakaudit.attacks.mia import corpus_file
    from leakaudit.data.io import load_records
    from leakaudit.data.labels import member_sets
    from leakaudit.distributed import is_main
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.mia import attack_names
    from leakaudit.outputs import prepare_output

    kind = get_kind("mia")
    names = attack_names(attacks, reference is not None)
    _refuse_unused_flags(command, names)
    refuse_text_field_for_chat(command, data_format)
    attack_options: dict[str, dict] = {name: {"k": k} for name in takes_k(names)}
    if "recall" in names:  # only the options of attacks that run are checked
        if recall_prefix is not None and given_on_command_line(command, "recall_shots"):
            raise InputError("is read only without --recall-prefix (the first N non-members form the prefix); "
                             "give one of them", field="--recall-shots")
        attack_options["recall"] = {} if recall_prefix is not None else {"shots": recall_shots}
    if "dc_pdd" in names:
        attack_options["dc_pdd"] = {"corpus": dc_pdd_corpus}
    if "neighbourhood" in names:
        attack_options["neighbourhood"] = {"model": neighbour_model, "n_neighbours": neighbours}
    if "lira" in names:
        attack_options["lira"] = {"references": lira_reference or []}
    values = {"attacks": attacks or None, "attack_options": attack_options, "n_bootstrap": n_bootstrap, "seed": seed,
              "batch_size": batch_size, "max_length": max_length, "stride": stride, "cache": not no_cache,
              "format": data_format, **messages_field_option(command, messages_field)}
    roles = {"members", "nonmembers", *(["reference"] if reference else [])}
    options = build_options(kind, flags=_k_flags(names), roles=roles, **values)
    _one_source(members, nonmembers, data)
    if data is None and given_on_command_line(command, "label_field"):
        raise InputError("applies only to one labelled --data file; --members and --nonmembers are read whole, "
                         "their labels ignored: drop it, or give the labelled file as --data", field="--label-field")
    prepare_output(out, command="mia", files=("mia.json", "scores.jsonl", "comparisons.json", "baseline"),
                   inputs={"--members": members, "--nonmembers": nonmembers, "--data": data,
                           "--recall-prefix": recall_prefix, "--dc-pdd-corpus": corpus_file(dc_pdd_corpus),
                           "--target": model_path(target), "--reference": model_path(reference),
                           "--baseline": model_path(baseline), "--neighbour-model": model_path(neighbour_model),
                           **{f"--lira-reference {spec}": model_path(spec) for spec in lira_reference or []}})
    if "recall" in names and recall_prefix is not None:
        attack_options["recall"]["prefix"] = tuple(r.text for r in load_records(recall_prefix, text_field=text_field))
        options = build_options(kind, flags=_k_flags(names), roles=roles, **values)
    fields = {"text_field": text_field, "id_field": id_field, **options.record_fields()}
    ins, outs, src_in, src_out = member_sets(members, nonmembers, data, label_field, **fields)
    kctx = _context(out, ins, outs, src_in, src_out, {"target": target, "reference": reference}, fields, seed,
                    device, dtype, allow_pickle)
    res, base_res = _run_with_baseline(kind, options, kctx, baseline, lambda: _context(
        out / "baseline", ins, outs, src_in, src_out, {"target": baseline, "reference": reference}, fields, seed,
        device, dtype, allow_pickle))
    if not is_main():
        return
    n_out = next(iter(res["attacks"].values()))["n_nonmembers"]
    _summary(f"MIA on {target} ({len(ins)} members, {n_out} non-members)", res["attacks"])
    if base_res is None:
        say(f"wrote {out / 'mia.json'}, scores.jsonl, roc.png")
        return
    _summary(f"MIA on {baseline} (the baseline)", base_res["attacks"])
    _compare(kind, out, res, base_res, target, baseline, options.n_bootstrap)
    say(f"wrote {out / 'mia.json'}, scores.jsonl, roc.png, comparisons.json and the baseline's in "
        f"{out / 'baseline'}")


def _run_with_baseline(kind: Any, options: Any, kctx: Any, baseline: str | None,
                       baseline_context: Callable[[], Any]) -> tuple[dict, dict | None]:
    """Run the kind on the target, then, with `--baseline`, on the baseline model in OUT/baseline: the same
    records, options and seed, so its scores pair with the target's item by item. A warning both runs give
    is said once; the reference model is loaded once."""
    said: set[str] = set()
    kctx.log = lambda line: (said.add(line), say(line))
    res = kind.run(kctx, options).to_json()
    if baseline is None:
        from leakaudit.distributed import is_main

        if is_main():  # an earlier run's --baseline: its verdicts are of results this run replaced
            import shutil

            (kctx.out / "comparisons.json").unlink(missing_ok=True)
            shutil.rmtree(kctx.out / "baseline", ignore_errors=True)  # OUT is this command's (prepare_output)
        return res, None
    bctx = baseline_context()
    bctx.out.mkdir(parents=True, exist_ok=True)
    bctx.cache = kctx.cache
    bctx.log = lambda line: None if line in said else say(_of_baseline(line, bctx.models.get("target")))
    return res, kind.run(bctx, options).to_json()


def _of_baseline(line: str, baseline: str | None) -> str:
    """A line only the baseline's run gave, saying so: "warning: ref: AUC 0.5 ..." under the target's table
    (ref 0.98) read as the target's."""
    head, sep, rest = line.partition(": ")
    return f"{head}: baseline {baseline}: {rest}" if sep and head == "warning" else f"baseline {baseline}: {line}"


def _compare(kind: Any, out: Path, res: dict, base_res: dict, target: str, baseline: str, n_bootstrap: int) -> None:
    """The target against the baseline as an experiment's `compare_to` compares them: the kind's own
    comparison rows (comparisons.json; the rows summary.json lists) and the verdict lines `leakaudit run`
    prints."""
    from leakaudit.data.io import write_json
    from leakaudit.kinds.base import StageView
    from leakaudit.report.html import verdict_sentence

    label, base_label = (target, baseline) if target != baseline else ("target", "baseline")

    def view(folder: str, name: str, result: dict) -> StageView:  # as run.json records an evaluation's stage
        options = {"compare_to": base_label, "n_bootstrap": n_bootstrap}
        return StageView({"id": f"evaluate/{kind.name}/{name}", "kind": kind.name, "folder": folder,
                          "result": {**result, "compare_to": base_label},
                          "params": {"evaluation": kind.name, "target_label": name, "options": options}}, out)

    rows = kind.Result.comparisons([view("baseline", base_label, base_res), view(".", label, res)])
    write_json(out / "comparisons.json", {"target": target, "baseline": baseline, "comparisons": rows})
    say_result("verdicts (paired Δ with its 95% CI; the baseline's own numbers in baseline/):")
    for c in rows:
        say_result(f"  {verdict_sentence(c)}")


def _one_source(members: Path | None, nonmembers: Path | None, data: Path | None) -> None:
    """Either one labelled --data file or --members and --nonmembers."""
    if data is not None and (members is not None or nonmembers is not None):
        raise InputError("give either --data with --label-field, or --members and --nonmembers", field="--data")
    if data is None and (members is None or nonmembers is None):
        raise InputError("give --members and --nonmembers (or one --data file with --label-field)",
                         field="--members" if members is None else "--nonmembers")


def user_inference(
    command: typer.Context,
    target: str = typer.Option(..., "--target", "--model", help="Fine-tuned model under attack"),
    reference: str = typer.Option(..., "--reference", help="Model not tuned on any of these users"),
    baseline: str | None = typer.Option(None, "--baseline", help="A model to compare the target with on the same "
                                        "users (e.g. one trained without the mitigation): paired Δ user AUC with "
                                        "its 95% CI, a verdict line (comparisons.json; its scores in OUT/baseline)"),
    data: Path = typer.Option(..., "--data", help="Users' samples; in/out by --label-field, or all in with"
                                                  " --data-out"),
    user_field: str = typer.Option(..., "--user-field", help="Field naming each sample's user"),
    data_out: Path | None = typer.Option(None, "--data-out", help="Samples of users not in training"),
    training: Path | None = typer.Option(None, "--training", help="The target's fine-tuning data (only its "
                                         "--user-field is read): each user's rows in it (n_train) and "
                                         "their correlation with the score, who is vulnerable"),
    label_field: str = typer.Option("label", "--label-field", help="1/0, true/false, yes/no, member/nonmember, "
                                    "in/out; the same for all of a user's rows"),
    samples_per_user: str = typer.Option("1,2,4,8,all", "--samples-per-user",
                                         help="Values of m: samples per user the attacker scores (`m_values` in an "
                                         "experiment file; not finetune's --max-samples-per-user)"),
    out: Path = typer.Option(..., "--out", help="Output dir: user_inference.json, user_scores.jsonl, roc_users.png"),
    text_field: str = typer.Option("text", "--text-field"),
    id_field: str | None = typer.Option(None, "--id-field"),
    data_format: str = typer.Option("text", "--format", help=FORMAT_HELP),
    messages_field: str = typer.Option("messages", "--messages-field", help=MESSAGES_HELP),
    n_bootstrap: int = typer.Option(1000, "--n-bootstrap", min=0,
                                    help="Bootstrap resamples for the AUC and TPR intervals (0: none)"),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED),
    batch_size: str = batch_size_option(),
    max_length: int | None = typer.Option(None, "--max-length", min=2),
    stride: int | None = typer.Option(None, "--stride", min=1, help="Window step for texts longer than the window "
                                      "(default: max length / 2)"),
    no_cache: bool = typer.Option(False, "--no-cache"),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
) -> None:
    """User inference: was a user's data in training? Mean log-likelihood ratio over m of their samples."""
    from leakaudit.data.labels import member_sets
    from leakaudit.distributed import is_main
    from leakaudit.kinds import get_kind
    from leakaudit.outputs import prepare_output

    kind = get_kind("user-inference")
    refuse_text_field_for_chat(command, data_format)
    if data_out is not None and given_on_command_line(command, "label_field"):
        raise InputError("applies only without --data-out: with it every row of --data is an in-training user's "
                         "and its labels are ignored; drop it, or give the labelled file alone", field="--label-field")
    options = build_options(kind, flags=USER_FLAGS, roles={"members", "nonmembers", "reference",
                                                           *(["training"] if training is not None else [])},
                            m_values=samples_per_user, n_bootstrap=n_bootstrap, seed=seed, batch_size=batch_size,
                            max_length=max_length, stride=stride, cache=not no_cache, format=data_format,
                            **messages_field_option(command, messages_field))
    prepare_output(out, command="user-inference", files=("user_inference.json", "user_scores.jsonl",
                                                          "comparisons.json", "baseline"),
                   inputs={"--data": data, "--data-out": data_out, "--training": training,
                           "--target": model_path(target), "--reference": model_path(reference),
                           "--baseline": model_path(baseline)})
    fields = {"text_field": text_field, "id_field": id_field, "user_field": user_field, **options.record_fields()}
    ins, outs, src_in, src_out = (member_sets(data, data_out, None, label_field, **fields) if data_out is not None
                                  else member_sets(None, None, data, label_field, **fields))

    def context(where: Path, model: str) -> Any:
        kctx = _context(where, ins, outs, src_in, src_out, {"target": model, "reference": reference}, fields, seed,
                        device, dtype, allow_pickle)
        if training is not None:  # read by the kind, as an experiment's `training` role (named in its errors)
            kctx.data["training"] = training
            kctx.data_fields["training"] = {"user_field": user_field}  # only users are read (training_users)
        return kctx

    try:
        res, base_res = _run_with_baseline(kind, options, context(out, target), baseline,
                                           lambda: context(out / "baseline", baseline))
    except InputError as exc:  # an m no user has enough samples for: the flag, not the experiment option's name
        if exc.field == "m_values":
            exc.field = USER_FLAGS[("m_values",)]
        raise
    if not is_main():
        return
    _summary(f"user inference on {target} (samples per user m)", {f"m={m}": r for m, r in res["per_m"].items()},
             "non-member users", counts="users in/out")
    _say_vulnerable(res)
    if base_res is None:
        say(f"wrote {out / 'user_inference.json'}, user_scores.jsonl, roc_users.png")
        return
    _summary(f"user inference on {baseline} (the baseline)", {f"m={m}": r for m, r in base_res["per_m"].items()},
             "non-member users", counts="users in/out")
    _compare(kind, out, res, base_res, target, baseline, options.n_bootstrap)
    say(f"wrote {out / 'user_inference.json'}, user_scores.jsonl, roc_users.png, comparisons.json and the "
        f"baseline's in {out / 'baseline'}")


def _say_vulnerable(res: dict) -> None:
    """Who is vulnerable, as the report's table says it: Spearman ρ over in-training users of the score with
    n_train (only with --training) and with ref_nll (how unusual a user's writing is)."""
    from leakaudit.kinds.user_inference import rho_text

    vul = res.get("vulnerability") or {}
    parts = [f"{what}: ρ {rho_text(vul[key])}" for key, what in (("n_train", "with their training rows"),
                                                                   ("ref_nll", "with ref NLL"))
             if vul.get(key)]
    if parts:
        say_result(f"who is vulnerable (in-training users' score, m = {res.get('samples_per_user')}): "
                   + "; ".join(parts))


def register(app: typer.Typer) -> None:
    """Add `mia` and `user-inference`."""
    app.command("mia")(mia)
    app.command("user-inference")(user_inference)
