"""Evaluation kind `user-inference`: was a person's data used for fine-tuning, judged from m samples of theirs?

Why: membership of one text is a weak notion when a model is tuned on people's emails or messages; what a
user wants to know is whether *they* were in the training data. The statistic (mean over a user's samples of
log p_target − log p_reference) lives in leakaudit/attacks/user_inference.py; this file types the options,
reads the users of `members` (in training) and `nonmembers` (held out), writes `user_inference.json`,
`user_scores.jsonl` (one row per user) and `roc_users.png`, and draws the report section.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from leakaudit.errors import InputError
from leakaudit.kinds.base import Headline, Kind, KindContext, KindOptions, Result, StageView, fmt, read_jsonl
from leakaudit.kinds.registry import register
from leakaudit.options import BatchSize


def _m_values(value: Any) -> list[str]:
    from leakaudit.attacks.user_inference import parse_m_values

    try:
        return parse_m_values(value)
    except InputError as exc:
        raise ValueError(exc.message) from None


def _default_m_values() -> list[str]:
    from leakaudit.attacks.user_inference import DEFAULT_M_VALUES

    return list(DEFAULT_M_VALUES)


class UserInferenceOptions(KindOptions):
    m_values: Annotated[list[str], BeforeValidator(_m_values)] = Field(
        default_factory=_default_m_values,
        description="numbers m of samples per user the attacker uses: a list or '1,2,all' (default 1,2,4,8,all)")
    n_bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the AUC confidence interval")
    seed: int | None = Field(None, description="bootstrap seed (default: the run's seed)")
    batch_size: BatchSize = "auto"
    max_length: int | None = Field(None, ge=2, description="window in tokens (default: the model's context)")
    cache: bool = Field(True, description="read and write the score cache")


class UserInferenceResult(Result):
    """`user_inference.json`: auc, auc_ci, tpr_at_fpr, advantage, n_users_in, n_users_out at the headline m
    (`samples_per_user`), the same per m (`per_m`), warnings, target, reference, members, nonmembers,
    scores_file."""

    def headline(self) -> list[Headline]:
        return [Headline("user AUC", self.data.get("auc"), self.data.get("auc_ci"))]

    @classmethod
    def section(cls, stages: list[StageView]) -> dict[str, Any] | None:
        from leakaudit.metrics import roc_metrics
        from leakaudit.report import plots

        if not stages:
            return None
        figures, table = [], []
        for s in stages:
            res = s.result
            rows = read_jsonl(s.dir / res.get("scores_file", "user_scores.jsonl"))
            pairs = [(r["score"], int(r["label"])) for r in rows if r.get("score") is not None and "label" in r]
            if pairs and len({y for _, y in pairs}) == 2:
                curve = roc_metrics([p[0] for p in pairs], [p[1] for p in pairs], n_bootstrap=0)
                figures.append({"uri": plots.roc_figure({"user score": curve}, f"User inference: {s.target}"),
                                "caption": f"User inference ROC, {s.target}"})
            ci = res.get("auc_ci") or [None, None]
            tpr = res.get("tpr_at_fpr") or {}
            table.append([s.target, s.evaluation, fmt(res.get("auc")), f"{fmt(ci[0])} – {fmt(ci[1])}",
                          fmt(tpr.get("0.01")), res.get("n_users_in", ""), res.get("n_users_out", "")])
        return {"id": "user-inference", "title": "User inference", "figures": figures,
                "note": "Score per user: mean over the user's samples of log p_target(x) − log p_ref(x).",
                "tables": [{"header": ["variant", "evaluation", "AUC", "95% CI", "TPR@1%FPR", "users in",
                                       "users out"], "rows": table}]}


@register
class UserInference(Kind):
    name = "user-inference"
    section = "evaluate"
    Options = UserInferenceOptions
    Result = UserInferenceResult
    roles = {"members": True, "nonmembers": True, "reference": True}
    summary = "user inference: users of `members` (in training) vs of `nonmembers`, from m samples each"

    def run(self, ctx: KindContext, options: UserInferenceOptions) -> UserInferenceResult:
        from leakaudit.attacks.user_inference import UserClashError, group_users, run_user_inference
        from leakaudit.data.io import write_json, write_jsonl
        from leakaudit.distributed import is_main
        from leakaudit.metrics import plot_roc

        ins = ctx.records("members", user_field="user")  # the engine's datasets name the user `user`
        outs = ctx.records("nonmembers", user_field="user")
        try:  # before any model is loaded
            group_users(ins, outs)
        except UserClashError as exc:
            field = ctx.data_fields.get("nonmembers", {}).get("user_field", "user")
            raise InputError(exc.message, file=ctx.data.get("nonmembers"), line=exc.record.line, field=field) from None
        report = run_user_inference(ctx.model("target"), ctx.model("reference"), ins, outs, options.m_values,
                                    n_bootstrap=options.n_bootstrap,
                                    seed=ctx.seed if options.seed is None else options.seed,
                                    batch_size=options.batch_size, max_length=options.max_length,
                                    cache=options.cache, progress=ctx.progress)
        data = {**report.to_json(), "target": ctx.models.get("target"), "reference": ctx.models.get("reference"),
                **{role: str(ctx.data[role]) if role in ctx.data else None for role in ("members", "nonmembers")},
                "scores_file": "user_scores.jsonl"}
        if is_main():  # under a launcher every process has the result; one writes it
            write_jsonl(ctx.out / "user_scores.jsonl", report.rows())
            plot_roc({f"m={m}": r for m, r in report.per_m.items()}, ctx.out / "roc_users.png",
                     title=f"user inference: {ctx.models.get('target')}")
            write_json(ctx.out / "user_inference.json", data)
            for w in data["warnings"]:
                ctx.log(f"warning: {w}")
        return UserInferenceResult(data)
