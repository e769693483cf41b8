"""Evaluation kind `mia`: membership inference, how well each attack tells the target's training texts
(`members`) from texts it did not see (`nonmembers`).

Why: the AUC, and above all the true-positive rate at a low false-positive rate, is the standard measure of
what a model leaks about its training set. The attacks and their definitions live in leakaudit/attacks/mia.py;
this file says which options a run takes, checks them, writes `scores.jsonl` (one row per sample), `mia.json`
(per attack: AUC with CI, TPR at 1% and 0.1% FPR) and `roc.png`, and draws the report section.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field

from leakaudit.errors import InputError, OptionError
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
    warning_lines,
)
from leakaudit.kinds.registry import register
from leakaudit.options import Seed


def _known_attack(name: str) -> str:
    from leakaudit.attacks.base import ATTACKS, unknown_attack_message  # the package import fills ATTACKS

    if name not in ATTACKS:
        raise ValueError(unknown_attack_message(name))
    return name


def _split(value: Any) -> Any:
    """'loss, zlib' (a CLI flag, or a string in an experiment file) -> ['loss', 'zlib']."""
    return [a.strip() for a in value.split(",") if a.strip()] if isinstance(value, str) else value


class MiaOptions(ScoredRowsOptions):
    # min_length on the list, not the union: on it, `attacks: null` raised TypeError (no length to check)
    attacks: Annotated[Annotated[list[Annotated[str, AfterValidator(_known_attack)]], Field(min_length=1)] | None,
                       BeforeValidator(_split)] = Field(
        None, description="attacks to run (default: the reference-free attacks, plus `ref` with a reference)")
    attack_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-attack options, e.g. {min_k: {k: 0.1}, recall: {shots: 4}}")
    n_bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the AUC confidence interval")
    seed: Seed | None = Field(None, description="bootstrap seed (default: the run's seed)")
    compare_to: str | None = Field(
        None, min_length=1,
        description="a target of this evaluation (e.g. the model before a fine-tune) every other target is "
                    "compared with: paired Δ AUC per attack (same texts, resampled together) with CI and a "
                    "verdict in the report and summary.json")


def attack_names(attacks: list[str] | str | None, has_reference: bool) -> list[str]:
    """The attacks a run performs: those given, else the reference-free ones (plus `ref` with a reference)."""
    from leakaudit.attacks.mia import REFERENCE_FREE

    given = _split(attacks)
    return list(given) if given else [*REFERENCE_FREE, *(["ref"] if has_reference else [])]


def attack_warnings(run: list[str], by_attack: dict[str, list[str]]) -> list[str]:
    """The lines to print: the run's warnings, then each attack's — one that every attack shares (a low FPR
    too few non-members resolve) once, another (an AUC every resample repeats) with its attack's name."""
    shared = set.intersection(*map(set, by_attack.values())) if by_attack else set()
    return list(dict.fromkeys([*run, *(w if w in shared else f"{name}: {w}"
                                       for name, ws in by_attack.items() for w in ws)]))


class MiaResult(Result):
    """`mia.json`: {attacks: {name: {auc, auc_ci, tpr_at_fpr: {"0.01", "0.001"}, tpr_ci, advantage, n_members,
    n_nonmembers, warnings}}, warnings, recall_prefix_nonmembers, target, reference, members, nonmembers,
    scores_file}."""

    def headline(self) -> list[Headline]:
        out = []
        for attack, m in (self.data.get("attacks") or {}).items():
            out.append(Headline(f"{attack} AUC", m.get("auc"), m.get("auc_ci")))
            out.append(Headline(f"{attack} TPR@1%FPR", (m.get("tpr_at_fpr") or {}).get("0.01"),
                                (m.get("tpr_ci") or {}).get("0.01")))
        return out

    @classmethod
    def comparisons(cls, stages: list[StageView]) -> list[dict[str, Any]]:
        """Per evaluation with `compare_to`, per attack: each other target's paired Δ AUC against it, texts
        paired by (label, id) in scores.jsonl (kinds/compare.py)."""
        return compare.comparisons(stages, _series)

    @classmethod
    def section(cls, stages: list[StageView]) -> dict[str, Any] | None:
        from leakaudit.metrics import roc_metrics, tpr_text
        from leakaudit.report import plots

        if not stages:
            return None
        figures, table = [], []
        warned: dict[str, list[str]] = {}  # a stage's warning (an overlap of members and non-members, too few
        for s in stages:                   # non-members for a low FPR) -> the stages that gave it
            res = s.result
            label = f"{s.evaluation} · {s.target}"
            rows = read_jsonl(s.dir / res.get("scores_file", "scores.jsonl"))
            curves = {}
            for attack in res.get("attacks", {}):
                pairs = [(r[attack], int(r["label"])) for r in rows
                         if isinstance(r.get(attack), (int, float)) and math.isfinite(r[attack])]
                if pairs and len({y for _, y in pairs}) == 2:
                    curves[attack] = roc_metrics([p[0] for p in pairs], [p[1] for p in pairs], n_bootstrap=0)
            if curves:  # its alt says what the curves show: "plot, described in the caption" gave no number
                aucs = ", ".join(f"{a} {fmt(m.auc)}" for a, m in curves.items())
                figures.append({"uri": plots.roc_figure(curves, f"ROC: {label}"),
                                "caption": f"Membership inference ROC, {label} (log-scale FPR)",
                                "alt": f"ROC curves of {label}, one per attack, AUC {aucs}; the table below gives "
                                       "each AUC's CI and the TPR at 1% and 0.1% FPR"})
            for w in attack_warnings(res.get("warnings") or [],
                                     {a: m.get("warnings") or [] for a, m in (res.get("attacks") or {}).items()}):
                warned.setdefault(w, []).append(label)
            for attack, m in res.get("attacks", {}).items():
                tpr, needs = m.get("tpr_at_fpr") or {}, m.get("tpr_needs_nonmembers") or {}
                tpr_ci = m.get("tpr_ci") or {}
                table.append([s.target, s.evaluation, attack, fmt(m.get("auc")), ci_text(m.get("auc_ci")),
                              *(tpr_text(tpr.get(k), needs.get(k), ci=tpr_ci.get(k)) for k in ("0.01", "0.001")),
                              m.get("n_members", ""),
                              m.get("n_nonmembers", "")])
        return {"id": "mia", "title": "Membership inference",
                "note": " ".join(["Every attack's score is higher for texts it takes for members (each is "
                                  "defined, with its paper, in docs/attacks.md); an AUC of 0.5 is chance (one below 0.5 whose interval holds 0.5 is chance too). ROC curves "
                                  "on a log-scale false-positive axis, from one non-member's share up; the "
                                  "low-FPR region is what matters for privacy. " + LOW_FPR, *compare.notes(stages)]),
                "warnings": warning_lines(warned, len(stages)),
                "figures": figures,
                "tables": [{"header": ["variant", "evaluation", "attack", "AUC", "95% CI", "TPR@1%FPR [95% CI]",
                                       "TPR@0.1%FPR [95% CI]", "members", "non-members"], "rows": table},
                           glossary([a for s in stages for a in s.result.get("attacks") or {}],
                                    attack_options(stages))]}


def _options_text(options: Any) -> str:
    """An attack's options as mia.json records them, written as given ('k = 0.1, corpus = dolly'); 'none'
    for an attack that takes none; '–' where mia.json predates the record."""
    import json

    if not isinstance(options, dict):
        return "–"
    return ", ".join(f"{k} = {v if isinstance(v, str) else json.dumps(v)}" for k, v in options.items()) or "none"


def attack_options(stages: list[StageView]) -> dict[str, str]:
    """Each attack's options as it ran (mia.json's `options`), so a reader can rerun it: one text where every
    stage ran it alike, else each text with the stages (evaluation · target) that ran it so."""
    ran: dict[str, dict[str, list[str]]] = {}
    for s in stages:
        for attack, m in (s.result.get("attacks") or {}).items():
            text = _options_text(m.get("options") if isinstance(m, dict) else None)
            ran.setdefault(attack, {}).setdefault(text, []).append(f"{s.evaluation} · {s.target}")
    return {attack: next(iter(texts)) if len(texts) == 1 else
            "; ".join(f"{text} ({', '.join(where)})" for text, where in texts.items())
            for attack, texts in ran.items()}


def glossary(names: list[str], options: dict[str, str] | None = None) -> dict[str, Any]:
    """The attacks a section shows, each in one plain line with its paper, so the page reads without
    docs/attacks.md at hand (unknown names, e.g. from a newer version's run, are listed as such), and with
    `options` the options each ran with (attack_options: the page said "k = 20% by default" of a min_k run
    with k = 0.1, and never named the neighbourhood's masked LM or dc_pdd's corpus)."""
    from leakaudit.attacks import ATTACKS

    rows = []
    for name in dict.fromkeys(names):
        attack = ATTACKS.get(name)
        rows.append([name, attack.summary if attack else "(not an attack of this version)",
                     attack.paper if attack else "", *([options.get(name, "–")] if options is not None else [])])
    return {"header": ["attack", "what its score measures (higher ⇒ member)", "paper",
                       *(["options as run"] if options is not None else [])], "rows": rows,
            "caption": "The attacks (exact definitions: docs/attacks.md)"}


#: said with a `ref` comparison whose baseline is the reference model itself (e.g. M0 against the base model,
#: `reference: base`): the baseline's ref scores are all 0, its AUC 0.5 by construction
OWN_REFERENCE = ("the baseline is its own reference, so its ref AUC is 0.5 by construction: this is the ref AUC "
                 "against chance")


def _series(s: StageView, base: StageView) -> list[compare.Series]:
    """Per attack of the stage, its per-text scores keyed by (label, id): a member and a non-member may share
    an id, and a text is paired only with itself."""
    rows = compare.unique(read_jsonl(s.dir / s.result.get("scores_file", "scores.jsonl")),
                          lambda r: (r.get("label"), r.get("id")))
    own = base.result.get("reference") is not None and base.result.get("reference") == base.result.get("target")
    return [compare.Series(f"{attack} AUC", {k: r.get(attack) for k, r in rows.items()},
                           labels={k: r.get("label") for k, r in rows.items()}, items="texts",
                           extra={"note": OWN_REFERENCE} if attack == "ref" and own else {})
            for attack in s.result.get("attacks") or {}]


@register
class Mia(Kind):
    name = "mia"
    section = "evaluate"
    Options = MiaOptions
    Result = MiaResult
    roles = {"members": True, "nonmembers": True, "reference": False}
    version = 3
    changed = ("a conversation (format chat) is scored at all its assistant replies (it was its last one); "
               "version 2: recall is ReCaLL's ratio LL(x|P) / LL(x) (it was the difference LL(x) - LL(x|P))")
    summary = "membership inference attacks on `members` vs `nonmembers`: AUC with CI, TPR at low FPR"
    data_parallel = True
    model_list_options = ("attack_options.lira.references",)

    def check(self, options: MiaOptions, roles: set[str]) -> None:
        """Attacks that need a reference only with one; options only for attacks that run; no attack twice."""
        from leakaudit.attacks import get_attack

        names = attack_names(options.attacks, "reference" in roles)
        uses_reference = False
        for i, name in enumerate(names):
            loc = ("attacks", i) if options.attacks else ("attacks",)
            try:
                attack = get_attack(name, **options.attack_options.get(name, {}))
            except InputError as exc:
                raise OptionError(("attack_options", name, *(exc.field or "").split(".")), exc.message) from None
            if attack.needs_reference and "reference" not in roles:
                raise OptionError(loc, f"attack '{name}' needs a reference model; give a reference")
            if options.format == "chat" and not attack.scores_chats:  # before any stage runs, not at this one
                raise OptionError(loc, f"attack '{name}' scores plain texts only, not conversations (format chat)")
            if options.format == "chat" and name == "recall" and attack.config.prefix:
                raise OptionError(("attack_options", "recall", "prefix"), "recall's prefix texts cannot be put "
                                  "before a conversation (format chat); without them the first `shots` non-member "
                                  "conversations form the prefix")
            if options.format == "chat" and name == "recall" and "separator" in attack.config.model_fields_set:
                raise OptionError(("attack_options", "recall", "separator"), "joins prefix texts; with format "
                                  "chat the prefix conversations are earlier turns, and nothing reads it")
            uses_reference |= attack.needs_reference
        if len(set(names)) != len(names):
            raise OptionError(("attacks",), f"an attack is listed twice: {', '.join(names)}")
        if "reference" in roles and not uses_reference:
            # it was loaded and recorded in mia.json for no attack: the result read as if calibrated by it
            raise OptionError(("attacks",), f"a reference model is given but no attack uses it ({', '.join(names)}):"
                                            " add ref, or give no reference")
        for name in options.attack_options:
            if name not in names:
                raise OptionError(("attack_options", name), f"attack '{name}' is not run")

    def run(self, ctx: KindContext, options: MiaOptions) -> MiaResult:
        from leakaudit.attacks.mia import TooShortError, run_mia
        from leakaudit.data.io import write_json, write_jsonl
        from leakaudit.distributed import is_main
        from leakaudit.report.plots import plot_roc

        chat = options.format == "chat"
        fields = options.record_fields()
        members, nonmembers = ctx.records("members", **fields), ctx.records("nonmembers", **fields)
        names = attack_names(options.attacks, ctx.models.get("reference") is not None)
        target, reference = ctx.model("target"), ctx.model("reference")
        seed = ctx.seed if options.seed is None else options.seed
        try:
            report = run_mia(target, *([r.extra[options.messages_field] if chat else r.text for r in side]
                                       for side in (members, nonmembers)), names,
                             reference=reference, attack_options=dict(options.attack_options),
                             n_bootstrap=options.n_bootstrap, seed=seed,
                             batch_size=options.batch_size, max_length=options.max_length, stride=options.stride,
                             cache=options.cache, progress=ctx.progress, load=ctx.cache.load_once)
        except TooShortError as exc:
            role = exc.role or "members"
            rec = (members if role == "members" else nonmembers)[exc.row or 0]
            field = options.messages_field if chat else ctx.data_fields.get(role, {}).get("text_field", "text")
            raise InputError(f"{'conversation' if chat else 'text'} {exc.why}", file=ctx.data.get(role),
                             line=rec.line, field=field) from None
        data = {**report.to_json(), "target": ctx.models.get("target"), "reference": ctx.models.get("reference"),
                **{role: str(ctx.data[role]) if role in ctx.data else None for role in ("members", "nonmembers")},
                "seed": seed, "format": options.format, "dtype": str(target.dtype).replace("torch.", ""),
                "scores_file": "scores.jsonl"}  # comparisons' paired bootstrap reads the seed
        if is_main():  # under a launcher every process has the result; one writes it
            write_jsonl(ctx.out / "scores.jsonl", report.rows([r.id for r in members], [r.id for r in nonmembers]))
            plot_roc(report.metrics, ctx.out / "roc.png", title=f"membership inference: {ctx.shown(ctx.models.get('target'))}")
            write_json(ctx.out / "mia.json", data)
            for w in attack_warnings(data["warnings"], {name: m.warnings for name, m in report.metrics.items()}):
                ctx.log(f"warning: {w}")
        return MiaResult(data)
