"""Evaluation kind `user-inference`: was a person's data used for fine-tuning, judged from m samples of theirs?

Why: membership of one text is a weak notion when a model is tuned on people's emails or messages; what a
user wants to know is whether *they* were in the training data. The statistic (mean over a user's samples of
log p_target − log p_reference) lives in leakaudit/attacks/user_inference.py; this file types the options,
reads the users of `members` (in training) and `nonmembers` (held out), writes `user_inference.json`,
`user_scores.jsonl` (one row per user) and `roc_users.png`, and draws the report section.

Who is vulnerable: each user row carries `ref_nll` (how unusual the user's writing is to the reference) and,
given the `training` file, `n_train` (the user's rows in it); the result holds their rank correlations with
the score over in-training users. Which mitigation helps: with `compare_to` naming one target (e.g. the
unmitigated model), every other target of the evaluation gets a paired Δ AUC against it (same users,
resampled together) and a verdict that only claims what the interval shows.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from leakaudit.errors import InputError
from leakaudit.kinds import compare
from leakaudit.kinds.base import (
    LOW_FPR,
    Headline,
    Kind,
    KindContext,
    Result,
    ScoredRowsOptions,
    StageView,
    ci_text,
    fmt,
    read_jsonl,
)
from leakaudit.kinds.registry import register
from leakaudit.options import Seed


def _m_values(value: Any) -> list[str]:
    from leakaudit.attacks.user_inference import parse_m_values

    try:
        return parse_m_values(value)
    except InputError as exc:
        raise ValueError(exc.message) from None


def _default_m_values() -> list[str]:
    from leakaudit.attacks.user_inference import DEFAULT_M_VALUES

    return list(DEFAULT_M_VALUES)


class UserInferenceOptions(ScoredRowsOptions):
    m_values: Annotated[list[str], BeforeValidator(_m_values)] = Field(
        default_factory=_default_m_values,
        description="numbers m of samples per user the attacker uses: a list or '1,2,all' (default 1,2,4,8,all)")
    n_bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the AUC confidence interval")
    seed: Seed | None = Field(None, description="bootstrap seed (default: the run's seed)")
    compare_to: str | None = Field(
        None, min_length=1,
        description="a target of this evaluation (e.g. the unmitigated model) every other target is compared "
                    "with: paired Δ user AUC with CI and a verdict in the report and summary.json")


#: TPR at this FPR is in the table; it needs 1/FPR held-out users to be resolved at all
TABLE_FPR = "0.01"


class UserInferenceResult(Result):
    """`user_inference.json`: auc, auc_ci, tpr_at_fpr, tpr_needs_nonmembers, advantage, n_users_in, n_users_out
    at the headline m (`samples_per_user`), the same per m (`per_m`), `vulnerability` ({n_train, ref_nll}:
    Spearman {rho, ci, n} of the score over in-training users, n_train null without `training`), warnings,
    target, reference, members, nonmembers, training, compare_to, n_bootstrap, seed, scores_file."""

    def headline(self) -> list[Headline]:
        m = self.data.get("samples_per_user")
        return [Headline("user AUC", self.data.get("auc"), self.data.get("auc_ci"), None if m is None else str(m))]

    @classmethod
    def comparisons(cls, stages: list[StageView]) -> list[dict[str, Any]]:
        """Per evaluation with `compare_to`: each other target's paired Δ user AUC at the headline m against
        it (kinds/compare.py), with this kind's names kept: auc_baseline, auc_variant, n_users(_in/_out)."""
        rows = compare.comparisons(stages, _series, style="effect")
        return [{**c, "auc_baseline": c["value_baseline"], "auc_variant": c["value_variant"], "n_users": c["n"],
                 "n_users_in": c.get("n_pos", 0), "n_users_out": c.get("n_neg", 0)} for c in rows]

    @classmethod
    def section(cls, stages: list[StageView]) -> dict[str, Any] | None:
        from leakaudit.metrics import tpr_text
        from leakaudit.report import plots

        if not stages:
            return None
        groups = compare.by_evaluation(stages)
        several = len(groups) > 1
        order = _m_order(list(dict.fromkeys(m for s in stages for m in (s.result.get("per_m") or {}))))
        figures, notes, table, by_m_rows = [], [], [], []
        for evaluation, group in groups.items():
            series, bands = {}, {}
            # with compare_to, only its target's band is shaded: seven overlapping bands were one brown mass
            shaded = compare.baseline(group)[0]
            for s in group:
                name = f"{evaluation} · {s.target}" if several else s.target
                per_m = s.result.get("per_m") or {}
                series[name] = [(order[m], r["auc"]) for m, r in per_m.items() if r.get("auc") is not None]
                if shaded is None or s is shaded:
                    bands[name] = [(order[m], *r["auc_ci"]) for m, r in per_m.items() if r.get("auc_ci")]
            if any(series.values()):
                whose = f"{shaded.target}'s" if shaded is not None else "each line's"
                figures.append({"uri": plots.lines_figure(
                    series, f"User AUC vs samples per user ({evaluation})", "samples per user m", "user AUC",
                    bands=bands, xticks=[(x, m) for m, x in order.items()], chance=0.5),
                    "caption": f"User AUC against the attacker's samples per user m, one line per target, "
                               f"{whose} 95% bootstrap CI shaded, 0.5 = chance ({evaluation})",
                    "alt": f"User AUC by samples per user m ({evaluation}): " + "; ".join(
                        f"{name} " + ", ".join(f"m = {m} {fmt(r['auc'])}" for m, r in
                                               sorted(((m, r) for m, r in (s.result.get("per_m") or {}).items()
                                                       if r.get("auc") is not None), key=lambda x: order[x[0]]))
                        for name, s in zip(series, group, strict=True)) + "; with CIs in the table below"})
            problem = compare.baseline(group)[1]
            if problem:
                notes.append(problem)
        for s in stages:
            res = s.result
            n_out = res.get("n_users_out")
            tpr = (res.get("tpr_at_fpr") or {}).get(TABLE_FPR)
            tpr_ci = (res.get("tpr_ci") or {}).get(TABLE_FPR)
            needs = (res.get("tpr_needs_nonmembers") or {}).get(TABLE_FPR, 100)
            if isinstance(n_out, int) and n_out < needs:  # results written before null meant "not resolved"
                tpr = None
            vul = res.get("vulnerability") or {}
            table.append([s.target, s.evaluation, res.get("samples_per_user", ""), fmt(res.get("auc")),
                          ci_text(res.get("auc_ci")), tpr_text(tpr, needs, "non-member users", ci=tpr_ci),
                          res.get("n_users_in", ""), n_out if n_out is not None else "",
                          rho_text(vul.get("n_train")), rho_text(vul.get("ref_nll"))])
            per_m = res.get("per_m") or {}
            by_m_rows.append([s.target, s.evaluation, *(_auc_text(per_m.get(m)) for m in order)])
        figures += _vulnerability_figures(stages, groups)
        tables = [
            {"caption": "User AUC at the headline m, and who is exposed",
             "header": ["variant", "evaluation", "m", "user AUC", "95% CI", "TPR@1%FPR [95% CI]", "users in", "users out",
                        "ρ(score, n_train) [CI], n", "ρ(score, ref NLL) [CI], n"], "rows": table},
            {"caption": "User AUC by the attacker samples per user m (95% CI)",
             "header": ["variant", "evaluation", *(f"AUC m={m}" for m in order)], "rows": by_m_rows}]
        comparisons = cls.comparisons(stages)
        if comparisons:
            tables.append({"caption": "Paired Δ user AUC against compare_to (the verdicts above)",
                           "header": ["variant", "vs", "evaluation", "m", "AUC vs", "AUC variant", "Δ AUC",
                                      "95% CI (paired)", "users paired (in/out)", "verdict"],
                           "rows": [[c["variant"], c["baseline"], c["evaluation"], c["m"], fmt(c["auc_baseline"]),
                                     fmt(c["auc_variant"]), fmt(c["delta"]), ci_text(c["ci"]),
                                     f"{c['n_users']} ({c['n_users_in']}/{c['n_users_out']})", c["verdict"]]
                                    for c in comparisons]})
        note = ("Score per user: mean over the user's samples of log p_target(x) − log p_ref(x) (each the whole "
                "sample's log-likelihood, in nats, so long samples weigh more; higher means \"in training\"); the table's AUC is at the headline m, and 0.5 is chance (an AUC "
                "below 0.5 whose interval holds 0.5 is chance too). ρ: Spearman rank correlation over in-training users of the score with "
                "the user's rows in the training file (n_train, before the fine-tune's own cap or dedup) and "
                "with their mean token NLL under the reference (an outlier measure), 95% bootstrap CI. "
                "Δ AUC = AUC(variant) − AUC(vs) on the same users, resampled together; these users detect a true "
                "|Δ| of 1.43 x its CI half-width 80% of the time. " + LOW_FPR.replace("members", "member users"))
        return {"id": "user-inference", "title": "User inference", "figures": figures,
                "note": " ".join([note, *notes]), "tables": tables}


# ----------------------------------------------------------------------------------------- report helpers
def _m_order(ms: list[str]) -> dict[str, int]:
    """x position of each m: numbers ascending, then 'all'."""
    nums = sorted((m for m in ms if m.isdigit()), key=int)
    return {m: i for i, m in enumerate(nums + [m for m in ms if not m.isdigit()])}


def _auc_text(m: dict[str, Any] | None) -> str:
    if not m:
        return "–"
    ci = m.get("auc_ci")
    return f"{fmt(m.get('auc'))} {ci_text(ci)}" if ci else fmt(m.get("auc"))


def rho_text(v: dict[str, Any] | None) -> str:
    """ρ with its CI and n, or why there is none (metrics.spearman_with_ci): a ρ of no value read "– –, n = 12"
    (the base model of `reference: base`, whose users all score 0), and a ρ without an interval because a few
    users give one side all its spread read "every resample alike", which they are not."""
    if not v:
        return "–"
    n = v.get("n", 0)
    if v.get("rho") is None:
        return f"undefined ({'fewer than 3 users' if n < 3 else 'one side has no spread'}), n = {n}"
    note = str(v.get("note") or "")
    ci = ("[none: a few users give one side all its spread]" if "no spread" in note
          else "[none: every resample alike]" if note else ci_text(v.get("ci")))
    return f"{fmt(v.get('rho'))} {ci}, n = {n}"


def _score_at(row: dict[str, Any], m: str) -> float | None:
    return (row.get("scores") or {}).get(m) if "scores" in row else row.get("score")


def _series(s: StageView, base: StageView) -> list[compare.Series]:
    """A stage's user scores at the base's headline m, users keyed by `user`, labelled in/out."""
    m = str(base.result.get("samples_per_user") or "all")
    rows = compare.unique(read_jsonl(s.dir / s.result.get("scores_file", "user_scores.jsonl")), lambda r: r["user"])
    own = base.result.get("reference") is not None and base.result.get("reference") == base.result.get("target")
    return [compare.Series("user AUC", {u: _score_at(r, m) for u, r in rows.items()},
                           labels={u: r.get("label") for u, r in rows.items()}, items="users",
                           extra={"m": m, **({"note": OWN_REFERENCE} if own else {})})]


#: said when the baseline is the reference model itself (`reference: base`, `compare_to: base`): every user's
#: score (the target's log-likelihood ratio to the reference) is 0, the baseline's user AUC 0.5 by construction
OWN_REFERENCE = ("the baseline is its own reference, so every user scores 0 and its user AUC is 0.5 by "
                 "construction: this is the user AUC against chance")


def _vulnerability_figures(stages: list[StageView], groups: dict[str, list[StageView]]) -> list[dict[str, Any]]:
    """Score against n_train and against ref NLL over in-training users, for one target only (the first
    evaluation's `compare_to` target, else the first stage whose in-training users' scores differ: a target
    that is its own reference scores every user 0, a flat line): two figures at most, the page stays readable."""
    from leakaudit.report import plots

    def in_training(stage: StageView) -> list[dict[str, Any]]:
        return [r for r in read_jsonl(stage.dir / stage.result.get("scores_file", "user_scores.jsonl"))
                if r.get("label") == 1 and r.get("score") is not None]

    baselines = [b for b in (compare.baseline(g)[0] for g in groups.values()) if b is not None]
    pick, rows = stages[0], []
    for stage in [*baselines, *stages]:
        rows = in_training(stage)
        if len({r["score"] for r in rows}) > 1:
            pick = stage
            break
    else:
        rows = []
    vul = pick.result.get("vulnerability") or {}
    figures = []
    for key, xlabel, what in (("n_train", "user's samples in the training data (n_train)", "training samples"),
                              ("ref_nll", "user's mean token NLL under the reference", "outlier measure")):
        pts = [(r[key], r["score"]) for r in rows if r.get(key) is not None]
        if len(pts) < 2:
            continue
        rho = vul.get(key) or {}
        figures.append({"uri": plots.scatter_figure(
            [p[0] for p in pts], [p[1] for p in pts], f"{pick.target}: ρ = {rho_text(rho)}", xlabel,
            "user score"),
            "caption": f"Who is vulnerable ({what}): per-user score of in-training users, {pick.evaluation} · "
                       f"{pick.target}",
            # the ρ the figure's title gives, which the default alt ("described in the caption") left out
            "alt": f"Scatter of {len(pts)} in-training users of {pick.evaluation} · {pick.target}: user score "
                   f"against {xlabel}; Spearman ρ = {rho_text(rho)}"})
    return figures


@register
class UserInference(Kind):
    name = "user-inference"
    version = 2
    changed = "a conversation (format chat) is scored at all its assistant replies (it was its last one)"
    section = "evaluate"
    Options = UserInferenceOptions
    Result = UserInferenceResult
    #: `training`: the target's fine-tuning data, read with its user field, for each user's n_train
    roles = {"members": True, "nonmembers": True, "reference": True, "training": False}
    summary = "user inference: users of `members` (in training) vs of `nonmembers`, from m samples each"
    data_parallel = True

    def run(self, ctx: KindContext, options: UserInferenceOptions) -> UserInferenceResult:
        from leakaudit.attacks.user_inference import (
            TooShortSampleError,
            UserClashError,
            group_users,
            run_user_inference,
        )
        from leakaudit.data.io import write_json, write_jsonl
        from leakaudit.distributed import is_main
        from leakaudit.report.plots import plot_roc

        fields = options.record_fields()
        ins = ctx.records("members", user_field="user", **fields)  # the engine's datasets name the user `user`
        outs = ctx.records("nonmembers", user_field="user", **fields)
        try:  # before any model is loaded
            group_users(ins, outs)
        except UserClashError as exc:
            field = ctx.data_fields.get("nonmembers", {}).get("user_field", "user")
            raise InputError(exc.message, file=ctx.data.get("nonmembers"), line=exc.record.line, field=field) from None
        has_training = "training" in ctx.data or "training" in ctx.loaded
        train_counts = Counter(training_users(ctx)) if has_training else None
        seed = ctx.seed if options.seed is None else options.seed
        try:
            report = run_user_inference(ctx.model("target"), ctx.model("reference"), ins, outs, options.m_values,
                                        n_bootstrap=options.n_bootstrap, seed=seed,
                                        batch_size=options.batch_size, max_length=options.max_length,
                                        stride=options.stride, cache=options.cache, progress=ctx.progress,
                                        messages_field=fields.get("messages_field"))
        except TooShortSampleError as exc:
            role = "members" if exc.label == 1 else "nonmembers"
            raise InputError(exc.message, file=ctx.data.get(role), line=exc.record.line,
                             field=fields.get("messages_field")
                             or ctx.data_fields.get(role, {}).get("text_field", "text")) from None
        rows = report.rows()
        if train_counts is not None:
            for r in rows:
                r["n_train"] = train_counts.get(r["user"], 0)
        data = {**report.to_json(), "target": ctx.models.get("target"), "reference": ctx.models.get("reference"),
                **{role: str(ctx.data[role]) if role in ctx.data else None
                   for role in ("members", "nonmembers", "training")},
                "vulnerability": vulnerability(rows, options.n_bootstrap, seed),
                "compare_to": options.compare_to, "n_bootstrap": options.n_bootstrap, "seed": seed,
                "dtype": str(ctx.model("target").dtype).replace("torch.", ""),  # scores move with it (bf16 on CPUs)
                "scores_file": "user_scores.jsonl"}
        if is_main():  # under a launcher every process has the result; one writes it
            write_jsonl(ctx.out / "user_scores.jsonl", rows)
            plot_roc({f"m={m}": r for m, r in report.per_m.items()}, ctx.out / "roc_users.png",
                     title=f"user inference: {ctx.shown(ctx.models.get('target'))}")
            write_json(ctx.out / "user_inference.json", data)
            for w in data["warnings"]:
                ctx.log(f"warning: {w}")
        return UserInferenceResult(data)


def training_users(ctx: KindContext) -> list[str]:
    """The user of each row of the `training` role (n_train counts them): only the user field is read. The
    rows are the fine-tune's data, never scored: an instruction fine-tune's rows have no text field, and a chat
    fine-tune's may hold a conversation with no reply (which `finetune --format chat` accepts); read as texts
    or as conversations to score, both were refused."""
    from pathlib import Path

    from leakaudit.data.io import field_value, read_rows, user_value
    from leakaudit.warn import say_lookalike_users

    if "training" in ctx.loaded:
        return [r.user for r in ctx.loaded["training"]]
    path = Path(ctx.data["training"])
    field = ctx.data_fields.get("training", {}).get("user_field", "user")
    users = [(user_value(field_value(row, field, path, line), path, line, field), line) for line, row in read_rows(path)]
    say_lookalike_users(users, path, field)
    return [u for u, _ in users]


def vulnerability(rows: list[dict[str, Any]], n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Spearman ρ (bootstrap CI, n) over in-training users of the headline score with n_train (null when
    the training data was not given) and with ref_nll: are the users who give themselves away the ones with
    more training data, or the unusual ones?"""
    from leakaudit.metrics import spearman_with_ci

    members = [r for r in rows if r["label"] == 1 and r.get("score") is not None]
    out: dict[str, Any] = {}
    for key in ("n_train", "ref_nll"):
        pts = [(r["score"], r[key]) for r in members if r.get(key) is not None]
        if key == "n_train" and not any(key in r for r in rows):
            out[key] = None
            continue
        out[key] = spearman_with_ci([p[0] for p in pts], [p[1] for p in pts], n_bootstrap=n_bootstrap, seed=seed)
    return out
