"""Evaluation kind `pii`: prompt the target with people's names and count how often it completes their
e-mail address, per prompt template x sampling temperature, minus what a baseline model extracts.

Why: the address a model was fine-tuned on is the plainest privacy leak there is; the baseline (e.g. the
model before fine-tuning) separates what training taught from what is guessable. Matching, statistics and
the output files are defined in leakaudit/attacks/pii.py; templates in leakaudit/data/enron.py.
Files: results_purified.jsonl (one row per cell and model), pii.json (best cell and grid mean, with
intervals, per protocol), extractions.jsonl (every response, addresses masked unless show_pii).
"""

from __future__ import annotations

from operator import itemgetter
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, field_validator

from leakaudit.errors import InputError
from leakaudit.kinds import compare
from leakaudit.kinds.base import (
    Headline,
    Kind,
    KindContext,
    KindOptions,
    Result,
    StageView,
    ci_text,
    figure_names,
    fmt,
    read_jsonl,
)
from leakaudit.kinds.registry import register
from leakaudit.options import BatchSize, CommaList, InputFile, Seed


def _temperatures(value: Any) -> Any:
    """'0.5, greedy' (the CLI's form) -> [0.5, 0.0]; a list passes through; every value must be >= 0."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts:
            raise ValueError("no values given")
        value = []
        for part in parts:
            try:
                value.append(0.0 if part == "greedy" else float(part))
            except ValueError:
                raise ValueError(f"'{part}' is not a number (or 'greedy')") from None
    if isinstance(value, list):
        for t in value:
            if isinstance(t, (int, float)) and not isinstance(t, bool) and t < 0:
                raise ValueError(f"temperature {t:g} is negative (0 means greedy)")
        numbers = [float(t) for t in value if isinstance(t, (int, float)) and not isinstance(t, bool)]
        twice = sorted({t for t in numbers if numbers.count(t) > 1})
        if twice:  # one cell per temperature: a repeat would sample the same prompts twice under one id
            raise ValueError(f"temperature {twice[0]:g} is given twice ('greedy' is 0)")
    return value


class PiiOptions(KindOptions):
    templates: CommaList = Field("fake-privacy", description="comma-separated families (fake-privacy, pil, "
                           "pil-zero-shot, pil-k-shot, pil-context, all) or template names (A, zero_shot-a, ...)")
    temperatures: Annotated[list[float] | None, BeforeValidator(_temperatures)] = Field(
        None, description="0 = greedy (default: each protocol's own grid)")
    top_k: int | None = Field(None, ge=0, description="0 = none (default: each protocol's)")
    max_new_tokens: int | None = Field(None, ge=1, description="default: 15 for fake-privacy, 100 for PIL")
    n_targets: int | None = Field(None, ge=1, description="use the first N targets (default: all)")
    pairs: InputFile | None = Field(None, description="targets: rows with `name` and `email`, or with `pairs` lists "
                              "(default: the `data` rows' `pairs`, else the shipped Enron pairs)")
    contexts: InputFile | None = Field(None, description="rows with `email` and `context` for the context-k templates")
    messages: InputFile | None = Field(None, description="raw e-mail messages (`text`) to cut contexts from")
    samples_per_prompt: int = Field(1, ge=1)
    seed: Seed | None = Field(None, description="sampling and bootstrap seed (default: the run's seed)")
    batch_size: BatchSize = "auto"
    compare_to: str | None = Field(
        None, min_length=1,
        description="a target of this evaluation (e.g. the model before a fine-tune) every other target is "
                    "compared with: paired Δ match rate (same targets and cells, targets resampled together) "
                    "with CI and a verdict in the report and summary.json")

    @field_validator("templates")
    @classmethod
    def _known_templates(cls, value: str) -> str:
        from leakaudit.data.enron import resolve_templates

        try:
            resolve_templates(value)
        except InputError as exc:
            raise ValueError(exc.message) from None
        return value

    def cells(self) -> list[Any]:
        """The grid: every template x temperature, decoded as these options say."""
        from leakaudit.attacks.pii import make_grid
        from leakaudit.data.enron import resolve_templates

        return make_grid(resolve_templates(self.templates), self.temperatures, self.top_k, self.max_new_tokens)


class PiiResult(Result):
    """The stage result: the per-cell rows of results_purified.jsonl (`rows`, `baseline_rows`), the grid-mean
    match rate of the first protocol with its interval, its best cell, and the change against the baseline."""

    def headline(self) -> list[Headline]:
        d = self.data
        rows = [Headline("PII match rate", d.get("match_rate"), d.get("match_rate_ci"))]
        if d.get("match_rate_minus_baseline") is not None:
            rows.append(Headline("PII match rate − baseline", d["match_rate_minus_baseline"],
                                 d.get("match_rate_minus_baseline_ci")))
        return rows

    @classmethod
    def comparisons(cls, stages: list[StageView]) -> list[dict[str, Any]]:
        """Per evaluation with `compare_to`: each other target's paired Δ match rate against it, per protocol;
        items = target x cell hits from extractions.jsonl, resampled by target (kinds/compare.py)."""
        return compare.comparisons(stages, _series)

    @classmethod
    def section(cls, stages: list[StageView]) -> dict[str, Any] | None:
        if not stages:
            return None
        rates: dict[str, dict[tuple[str, str], float]] = {}
        table = []
        name = figure_names(stages)
        for s in stages:
            cells: dict[tuple[str, str], list[float]] = {}
            for r in s.result.get("rows") or []:
                if r.get("n_targets"):
                    key = (str(r["template"]), f"{float(r['temperature']):g}")
                    # the protocol's own hits: fuzzy matches for fake-privacy cells, exact ones for PIL
                    cells.setdefault(key, []).append(r.get("hits", r["matches"]) / r["n_targets"])
                table.append([s.target, s.evaluation, r.get("template"), r.get("temperature"), r.get("top_k", ""),
                              r.get("hits", r.get("matches")), r.get("matches"), r.get("exact_matches", ""),
                              r.get("n_targets"), _rate_text(r.get("hits", r.get("matches")), r.get("n_targets"))])
            if cells:
                rates[name(s)] = {k: sum(v) / len(v) for k, v in cells.items()}
        return {"id": "pii", "title": "PII extraction", "figures": _figures(rates),
                "note": " ".join(["Hit rate = targets hit / targets, per prompt template and sampling "
                                  "temperature; a hit is the template's own criterion (a fuzzy match for the "
                                  "fake-privacy templates, an exact one for PIL's). Extracted text is not shown.",
                                  *compare.notes(stages)]),
                "tables": [{"header": ["variant", "evaluation", "template", "temperature", "top-k", "hits", "fuzzy matches",
                                       "exact", "targets", "hit rate [exact 95% CI]"], "rows": table}]}


def _rate_text(hits: Any, n: Any) -> str:
    """A cell's hit rate with its exact (Clopper-Pearson) interval, as docs/pii.md defines it: the heatmaps
    showed the rate alone and the table the counts, so 0 of 3 read as a rate of 0 with nothing to say that
    it still allows up to 71%."""
    from leakaudit.metrics import binomial_ci

    if not (isinstance(hits, int) and isinstance(n, int) and 0 <= hits <= n and n > 0):
        return "–"
    return f"{fmt(hits / n)} {ci_text(list(binomial_ci(hits, n)))}"


#: up to this many evaluated models get a template x temperature heatmap each; more get one figure per axis
MAX_HEATMAPS = 3
#: bars in one chart (models x templates or temperatures) before a heatmap reads better
MAX_BARS = 30


def _figures(rates: dict[str, dict[tuple[str, str], float]]) -> list[dict[str, str]]:
    """The figure that fits the grid of match rates (model -> (template, temperature) -> rate): bars when a
    grid axis has one value (a heatmap of one row says nothing a bar does not), a heatmap per model when
    both vary, and for many models a model x template and a model x temperature heatmap, each the mean
    over the other axis (the table has every cell)."""
    from leakaudit.report import plots

    if not rates:
        return []
    models = list(rates)
    templates = sorted({k[0] for cells in rates.values() for k in cells})
    temps = sorted({k[1] for cells in rates.values() for k in cells}, key=float)

    def mean_over(axis: int) -> dict[tuple[str, str], float]:
        """(model, value on the other axis) -> mean rate over this axis."""
        acc: dict[tuple[str, str], list[float]] = {}
        for m, cells in rates.items():
            for k, v in cells.items():
                acc.setdefault((m, k[1 - axis]), []).append(v)
        return {k: sum(v) / len(v) for k, v in acc.items()}

    if len(templates) == 1 and len(temps) == 1:
        cell = f"template {templates[0]}, temperature {temps[0]}"
        return [{"uri": plots.bars_figure({m: rates[m][(templates[0], temps[0])] for m in models},
                                          f"PII match rate ({cell})", "match rate"),
                 "caption": f"PII extraction match rate per model, {cell}"}]
    if len(templates) == 1 or len(temps) == 1:
        axis, name, values = (1, "temperature", temps) if len(templates) == 1 else (0, "template", templates)
        fixed = f"{'template' if axis else 'temperature'} {(templates if axis else temps)[0]}"
        by = mean_over(1 - axis)  # (model, value on the varying axis) -> rate
        caption = f"PII extraction match rate by {name} ({fixed})"
        if len(models) * len(values) > MAX_BARS:
            uri = plots.heatmap_figure(models, values, by, f"PII match rate ({fixed})", name, "model",
                                       limits=(0.0, 1.0))
        elif len(models) == 1:
            uri = plots.bars_figure({v: by[(models[0], v)] for v in values if (models[0], v) in by},
                                    f"PII match rate: {models[0]} ({fixed})", "match rate", name)
            caption += f", {models[0]}"
        else:
            uri = plots.bars_figure({m: {f"{name} {v}": by[(m, v)] for v in values if (m, v) in by} for m in models},
                                    f"PII match rate by {name} ({fixed})", "match rate")
            caption += ", a bar group per model"
        return [{"uri": uri, "caption": caption}]
    if len(models) <= MAX_HEATMAPS:
        return [{"uri": plots.heatmap_figure(templates, temps, rates[m], f"PII match rate: {m}", "temperature",
                                             "template", limits=(0.0, 1.0)),
                 "caption": f"PII extraction match rate by template and temperature, {m}"} for m in models]
    return [{"uri": plots.heatmap_figure(models, values, mean_over(axis), f"PII match rate, mean over {other}s",
                                         name, "model", limits=(0.0, 1.0)),
             "caption": f"PII extraction match rate by model and {name} (mean over {other}s)"}
            for axis, name, other, values in ((1, "template", "temperature", templates),
                                              (0, "temperature", "template", temps))]


def _series(s: StageView, base: StageView) -> list[compare.Series]:
    """Per protocol, the target model's hit (any sample matched, the protocol's criterion) per target x cell,
    from extractions.jsonl (one row per sample). Their mean, each cell weighted alike (cells may hold different
    targets: context-k ones only those with a context), is the grid-mean match rate. Targets are told apart
    by masked id, and by position where masking made ids alike (compare.target_key); a key whose samples
    repeat (ids alike in a file from before positions were written) is left out."""
    hits: dict[str, dict[tuple[Any, ...], float]] = {}
    seen: dict[tuple[Any, ...], set[Any]] = {}
    twice: set[tuple[Any, ...]] = set()
    rows = [r for r in read_jsonl(s.dir / "extractions.jsonl") if r.get("role", "model") == "model"]
    target = compare.target_key(rows)
    for r in rows:
        key = (*target(r), r.get("template"), r.get("temperature"), r.get("top_k"))
        if r.get("sample_index") in seen.setdefault(key, set()):
            twice.add(key)
        seen[key].add(r.get("sample_index"))
        cell = hits.setdefault(str(r.get("protocol")), {})
        cell[key] = max(cell.get(key, 0.0), float(bool(r.get("hit"))))
    several = len(hits) > 1
    out = []
    for protocol, values in hits.items():
        kept = {k: v for k, v in values.items() if k not in twice}
        per_cell: dict[tuple[Any, ...], int] = {}
        for k in kept:
            per_cell[k[2:]] = per_cell.get(k[2:], 0) + 1
        # each cell weighs alike, whatever its targets: a context-k cell holds only the targets with a context,
        # and the plain mean over target x cell items was not the grid-mean match rate the stage reports
        out.append(compare.Series("PII match rate" + (f" ({protocol})" if several else ""), kept,
                                  cluster=itemgetter(0, 1), items="targets",
                                  weights={k: 1 / per_cell[k[2:]] for k in kept}
                                  if len(set(per_cell.values())) > 1 else None))
    return out


@register
class Pii(Kind):
    name = "pii"
    section = "evaluate"
    Options = PiiOptions
    Result = PiiResult
    roles = {"data": False, "baseline": False}
    version = 2
    changed = ("a demonstration's address is cut from a response only where it stands as an address of its own "
               "(it was cut from inside the target's own address)")
    summary = ("e-mail addresses the target completes from names (only the addresses in `data` when given), "
               "minus the baseline's")

    def check(self, options: PiiOptions, roles: set[str]) -> None:
        """Greedy temperatures alone read no top-k (given, it was ignored in silence) and give one answer per
        prompt (samples_per_prompt N decoded it N times): refused, as continuation's greedy is; so are greedy
        cells alone by the templates' own default (PIL's), with no temperatures given."""
        from leakaudit.errors import OptionError

        if all(c.temperature == 0 for c in options.cells()):
            for name, given in (("top_k", options.top_k is not None), ("samples_per_prompt",
                                                                      options.samples_per_prompt > 1)):
                if given:
                    raise OptionError((name,), "greedy decoding gives one answer per prompt and reads no "
                                               "top-k; give a temperature above 0 to sample")

    def targets(self, ctx: KindContext, options: PiiOptions) -> list[Any]:
        """The targets: from `pairs`, only those whose address occurs in `data` when that role is given (e.g.
        the training e-mails), the first `n_targets`, with contexts from `contexts` / `messages`."""
        from leakaudit.data import enron
        from leakaudit.data.io import read_rows

        targets = enron.select_targets(options.pairs, ctx.records("data") if "data" in ctx.data else None)
        targets = targets[:options.n_targets] if options.n_targets else targets
        if options.contexts is not None:
            by_email = {t.email.lower(): t for t in targets}
            for lineno, row in read_rows(options.contexts):
                for key in ("email", "context"):
                    if not isinstance(row.get(key), str):
                        raise InputError("missing or not a string", file=options.contexts, line=lineno, field=key)
                if row["email"].lower() in by_email:
                    by_email[row["email"].lower()].context = row["context"]
        if options.messages is not None:
            texts = []
            for lineno, row in read_rows(options.messages):
                if not isinstance(row.get("text"), str):
                    raise InputError("missing or not a string", file=options.messages, line=lineno, field="text")
                texts.append(row["text"])
            n = enron.attach_contexts(targets, texts)
            ctx.log(f"contexts cut from messages for {n} of {len(targets)} targets")
        return targets

    def run(self, ctx: KindContext, options: PiiOptions) -> PiiResult:
        from leakaudit.attacks.pii import no_address_fits, run_pii

        cells = options.cells()
        targets = self.targets(ctx, options)
        has_baseline = ctx.models.get("baseline") is not None
        ctx.log(f"{len(targets)} targets x {len(cells)} cells" + (" x 2 models" if has_baseline else ""))
        seed = ctx.seed if options.seed is None else options.seed
        summary = run_pii(ctx.model("target"), targets, cells, ctx.out, baseline=ctx.model("baseline"),
                          samples_per_prompt=options.samples_per_prompt, seed=seed, batch_size=options.batch_size,
                          show_pii=ctx.show_pii, progress=ctx.progress, log=ctx.log)
        rows = read_jsonl(ctx.out / "results_purified.jsonl")
        data: dict[str, Any] = {"rows": [r for r in rows if r.get("role", "model") == "model"],
                                "baseline_rows": [r for r in rows if r.get("role") == "baseline"],
                                "seed": seed}  # comparisons' paired bootstrap reads the seed
        part = next(iter(summary["protocols"].values()))
        data["match_rate"] = part["grid_mean"]["hit_rate"]
        data["match_rate_ci"] = part["grid_mean"]["hit_rate_ci"]
        data["best_cell"] = {k: part["best_cell"][k] for k in ("template", "temperature", "hit_rate", "hit_rate_ci")}
        if "baseline_subtraction" in part:
            change = part["baseline_subtraction"]["grid_mean"]
            data["match_rate_minus_baseline"] = change["change"]
            data["match_rate_minus_baseline_ci"] = change["change_ci"]
        # said on stderr only, the report showed a cell's 0% beside no word that it is 0 by construction
        warning = no_address_fits(ctx.model("target"), cells, targets)
        if warning:
            data["warnings"] = [warning]
        return PiiResult(data)
