"""Evaluation kind `perplexity`: how well the target fits some texts, and after each epoch's checkpoint.

Why: perplexity is the utility side of every privacy number here (a defense that stops leakage by wrecking
the model is no defense). Definitions live in leakaudit/perplexity.py (corpus and mean per-text perplexity).
With `format: chat` the rows are a chat fine-tune's conversations, measured over their assistant replies in
context: the tokens the fine-tune trains on, so its held-out perplexity is exp of its eval loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from leakaudit.kinds.base import (
    Headline,
    Kind,
    KindContext,
    Result,
    ScoredRowsOptions,
    StageView,
    figure_names,
    fmt,
)
from leakaudit.kinds.registry import register


class PerplexityOptions(ScoredRowsOptions):
    checkpoints: bool = Field(default=True, description="also measure each epoch's checkpoint of a fine-tuned "
                              "target (one more pass over `data` per epoch)")


class PerplexityResult(Result):
    """`perplexity.json`: the final model's numbers plus one row per checkpoint (`checkpoints`, with `final`
    last) when the target is a fine-tuning run with per-epoch checkpoints; a row's `step` is the optimizer step
    its weights are from (null for a final model whose run did not record it). `format` (text or chat) says
    what was measured: texts, or conversations at their assistant replies (`n_texts` counts them)."""

    def headline(self) -> list[Headline]:
        return [Headline("perplexity", self.data.get("perplexity"))]

    @classmethod
    def section(cls, stages: list[StageView]) -> dict[str, Any] | None:
        from leakaudit.report import plots

        if not stages:
            return None
        series: dict[str, list[tuple[float, float]]] = {}
        table = []
        label = figure_names(stages)
        finals = {label(s): s.result["perplexity"] for s in stages if isinstance(s.result.get("perplexity"), (int, float))}
        for s in stages:
            res = s.result
            for c in res.get("checkpoints") or []:
                if isinstance(c.get("step"), int):  # a run from before the final step was recorded: no x
                    series.setdefault(label(s), []).append((float(c["step"]), float(c["perplexity"])))
                table.append([s.target, s.evaluation, c.get("name"), fmt(c.get("step")), fmt(c["perplexity"]),
                              res.get("n_texts", "–"), res.get("n_tokens", "–")])
            if not res.get("checkpoints"):
                table.append([s.target, s.evaluation, "final", fmt(None), fmt(res.get("perplexity")),
                              res.get("n_texts", "–"), res.get("n_tokens", "–")])
        figures = []
        if any(len(v) > 1 for v in series.values()):
            levels = {f"{name} (no checkpoints)": value for name, value in finals.items() if name not in series}
            figures.append({"uri": plots.lines_figure(series, "Perplexity per checkpoint", "training step",
                                                      "perplexity", log_y=True, levels=levels),
                            "caption": "Perplexity on the evaluation data at each checkpoint and the final model"
                                       + ("; a dotted line for a model without checkpoints (a base model)"
                                          if levels else "")})
        else:
            if finals:
                figures.append({"uri": plots.bars_figure(finals, "Perplexity", "perplexity"),
                                "caption": "Perplexity on the evaluation data"})
        chats = [f"{s.target} ({s.evaluation})" for s in stages if s.result.get("format") == "chat"]
        return {"id": "perplexity", "title": "Perplexity", "figures": figures,
                "note": "exp(mean token NLL) over all evaluation tokens; lower is a better fit. No interval: compare "
                        "targets on the same texts by their difference, which a few percent of noise in training "
                        "can move (docs/studies.md gives seed-to-seed spreads)."
                        + (f" Conversations (format chat: {', '.join(chats)}): over their assistant replies' tokens, "
                           "each reply after the turns before it, the tokens a chat fine-tune trains on; `texts` "
                           "counts conversations." if chats else ""),
                "tables": [{"header": ["variant", "evaluation", "checkpoint", "step", "perplexity", "texts", "tokens"],
                            "rows": table}]}


def row_name(model: str | None) -> str:
    """A perplexity row's name: `checkpoint-N` for a checkpoint folder (or its adapter/), else `final`. A run
    dir without a final model (a run killed mid-training) is measured at its last checkpoint, which was
    labelled `final` as if the run had finished."""
    from leakaudit.train.artifacts import checkpoint_number

    path = Path(model or "")
    path = path.parent if path.name == "adapter" else path
    return path.name if checkpoint_number(path) is not None else "final"


@register
class Perplexity(Kind):
    name = "perplexity"
    section = "evaluate"
    Options = PerplexityOptions
    Result = PerplexityResult
    roles = {"data": True}
    summary = "perplexity of the target on `data` (and of each epoch's checkpoint of a fine-tuned target)"
    data_parallel = True

    def run(self, ctx: KindContext, options: PerplexityOptions) -> PerplexityResult:
        from leakaudit.attacks.base import TooShortError
        from leakaudit.data.io import write_json
        from leakaudit.distributed import is_main
        from leakaudit.errors import InputError
        from leakaudit.perplexity import perplexity
        from leakaudit.train.artifacts import training_step

        chat = options.format == "chat"
        records = ctx.records("data", **options.record_fields())
        rows = ({"chats": [r.extra[options.messages_field] for r in records]} if chat
                else {"texts": [r.text for r in records]})
        kwargs = {"batch_size": options.batch_size, "max_length": options.max_length, "stride": options.stride,
                  "progress": ctx.progress, "cache": options.cache, **rows}
        try:
            final = perplexity(ctx.model("target"), **kwargs)
            checkpoints = []
            for path in ctx.checkpoints if options.checkpoints else []:
                one = perplexity(ctx.cache.get(path), **kwargs)
                checkpoints.append({"name": row_name(path), "step": training_step(path), "perplexity": one.ppl,
                                    "mean_text_perplexity": one.mean_text_ppl})
        except TooShortError as exc:  # the template refused a conversation, a model gave NaN: its file and line
            field = options.messages_field if chat else ctx.data_fields.get("data", {}).get("text_field", "text")
            raise InputError(f"{'conversation' if chat else 'text'} {exc.why}", file=ctx.data.get("data"),
                             line=records[exc.index].line, field=field) from None
        if checkpoints:
            step = training_step(ctx.models["target"]) if ctx.models.get("target") else None
            checkpoints.append({"name": row_name(ctx.models.get("target")), "step": step, "perplexity": final.ppl,
                                "mean_text_perplexity": final.mean_text_ppl})
        data = {"model": final.model, "perplexity": final.ppl, "mean_text_perplexity": final.mean_text_ppl,
                "nll_per_token": final.nll_per_token, "n_texts": final.n_texts, "n_tokens": final.n_tokens,
                "format": options.format, "checkpoints": checkpoints}
        if is_main():  # under a launcher every process has the result; one writes it
            write_json(ctx.out / "perplexity.json", data)
        return PerplexityResult(data)
