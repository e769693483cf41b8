"""Evaluation kind `pii-logprob`: how likely the target finds each person's true e-mail address after the
extraction prompt, by teacher forcing instead of sampling.

Why: sampled extraction (the `pii` kind) is a rare-event count over a temperature grid, noisy and costly; the
log-probability of the true address after the same prompt is a continuous, sampling-free measure of the same
memorisation: one forward pass per target, template and candidate, so hundreds of targets cost seconds on a
GPU. Its rank among other people's addresses (the candidates) says whether the model prefers the true one.

Definitions, per target x template:
- prompt: the template rendered without the address (the exact prompt the `pii` kind samples from);
- continuation: the address, after one space when the prompt does not already end in whitespace or
  `[mailto:`. Prompt and continuation are tokenised apart and their ids concatenated: that is the token
  sequence a sampler emits after the prompt's tokens (tokenising the joined text would let BPE merge the
  prompt's trailing space into the address's first token and score a sequence the sampler never sees);
- logp = sum over the continuation's tokens of log p(token | prompt, earlier tokens); logp_per_token its mean;
- rank = 1 + the number of candidates with a higher logp; candidates = the true address plus
  n_candidates - 1 other addresses of the pairs file (all its targets, not only the first n_targets; as
  written) drawn with the seed (fewer when there are fewer).
Files: logprobs.jsonl (one row per model x target x template; addresses masked unless show_pii),
pii_logprob.json (per template and overall: mean logp, top-1 rate, mean reciprocal rank, each with a 95%
bootstrap interval over targets; with a baseline, the paired change).
"""

from __future__ import annotations

import random
from operator import itemgetter
from typing import Any

import numpy as np
from pydantic import Field, field_validator

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
    fmt,
    read_jsonl,
)
from leakaudit.kinds.registry import register
from leakaudit.metrics import bootstrap_ci
from leakaudit.options import BatchSize, CommaList, InputFile, Seed

OVERALL = "overall"


class PiiLogprobOptions(KindOptions):
    templates: CommaList = Field("fake-privacy", description="comma-separated families (fake-privacy, pil, "
                           "pil-zero-shot, pil-k-shot, all) or template names (A, zero_shot-a, ...)")
    pairs: InputFile | None = Field(None, description="targets: rows with `name` and `email`, or with `pairs` lists "
                              "(default: the `data` rows' `pairs`, else the shipped Enron pairs)")
    n_targets: int | None = Field(None, ge=1, description="use the first N targets (default: all)")
    n_candidates: int = Field(20, ge=1, le=1000, description="addresses ranked per target: the true one plus "
                              "N-1 other targets' addresses")
    batch_size: BatchSize = "auto"
    cache: bool = Field(True, description="read and write the score cache")
    seed: Seed | None = Field(None, description="candidate draw and bootstrap seed (default: the run's seed)")
    compare_to: str | None = Field(
        None, min_length=1,
        description="a target of this evaluation (e.g. the model before a fine-tune) every other target is "
                    "compared with: paired Δ mean log p(address) and Δ rank-1 rate (same targets x templates, "
                    "targets resampled together) with CI and a verdict in the report and summary.json")

    @field_validator("templates")
    @classmethod
    def _known_templates(cls, value: str) -> str:
        from leakaudit.data.enron import PIL_CONTEXT, resolve_templates

        try:
            chosen = resolve_templates(value)
        except InputError as exc:
            raise ValueError(exc.message) from None
        context = [t.name for t in chosen if t.name in PIL_CONTEXT]
        if context:
            raise ValueError(f"context template '{context[0]}' is not supported here (it needs each target's "
                             "message text); use the pii kind")
        return value


def continuation(prompt: str, email: str) -> str:
    """The text the address is scored as after `prompt` (see the module docstring)."""
    return email if not prompt or prompt[-1].isspace() or prompt.endswith("[mailto:") else " " + email


def score_targets(lm: Any, targets: list[Any], templates: list[Any], candidates: list[list[str]], *,
                  batch_size: int | str = "auto", progress: bool = True, cache: bool = True) -> list[dict[str, Any]]:
    """One row per target x template: logp and logp_per_token of the true address, its rank among the target's
    candidates (candidates[i][0] is target i's own address), and whether BPE would have merged across the
    prompt/address boundary. Every (prompt, candidate) is scored in one batched, cached pass."""
    from leakaudit.distributed import score_ids_distributed as score_ids  # one process: score_ids itself
    from leakaudit.models.tokens import encode

    tok = lm.tokenizer
    contexts, conts, where, merged = [], [], [], []
    for i, t in enumerate(targets):
        for template in templates:
            prompt = template.render(t, tok)
            p_ids = encode(tok, [prompt])[0]  # special tokens at the start only, as every scored text
            for j, email in enumerate(candidates[i]):
                c_ids = tok(continuation(prompt, email), add_special_tokens=False)["input_ids"]
                if j == 0:
                    joined = encode(tok, [prompt + continuation(prompt, email)])[0]
                    merged.append(joined != p_ids + c_ids)
                contexts.append(p_ids)
                conts.append(c_ids)
                where.append((i, template.name, j))
    scores = score_ids(lm, contexts, conts, batch_size=batch_size, progress=progress, cache=cache,
                       description="scoring addresses")
    by_cell: dict[tuple[int, str], list[Any]] = {}
    for (i, name, _), s in zip(where, scores, strict=True):
        by_cell.setdefault((i, name), []).append(s)
    rows = []
    k = 0
    for i, t in enumerate(targets):
        for template in templates:
            cell = by_cell[(i, template.name)]
            true = cell[0].sum_logp
            rows.append({"target": t.id, "target_index": i, "email": t.email, "template": template.name, "logp": true,
                         "logp_per_token": cell[0].mean_logp, "n_tokens": cell[0].n_tokens,
                         "rank": 1 + sum(s.sum_logp > true for s in cell[1:]), "n_candidates": len(cell),
                         "boundary_merged": merged[k]})
            k += 1
    return rows


def draw_candidates(targets: list[Any], pool: list[str], n: int, seed: int) -> list[list[str]]:
    """Per target: its own address first, then n-1 other addresses from `pool` (case-insensitively distinct,
    each as first written: lowercasing them, as before, set a mixed-case true address against lowercased
    rivals, whose log p differs), drawn with a generator seeded by (seed, target id) from the pool sorted by
    address, so a target's candidates depend neither on the other targets nor on the order the pairs file
    lists them in (drawn from the file's order, the same targets shuffled ranked against other rivals)."""
    first_written: dict[str, str] = {}
    for e in pool:
        first_written.setdefault(e.lower(), e)
    ordered = sorted(first_written.items())
    out = []
    for t in targets:
        others = [e for key, e in ordered if key != t.email.lower()]
        rng = random.Random(f"pii-logprob:{seed}:{t.id}")
        out.append([t.email, *rng.sample(others, min(n - 1, len(others)))])
    return out


# ----------------------------------------------------------------------------------------- statistics
def _matrices(rows: list[dict[str, Any]], ids: list[str], names: list[str]) -> dict[str, np.ndarray]:
    """targets x templates arrays of logp, top-1 and reciprocal rank."""
    at = {(r["target"], r["template"]): r for r in rows}
    cells = [[at[(i, n)] for n in names] for i in ids]
    return {"logp": np.array([[c["logp"] for c in row] for row in cells], dtype=float),
            "top1": np.array([[c["rank"] == 1 for c in row] for row in cells], dtype=float),
            "rr": np.array([[1.0 / c["rank"] for c in row] for row in cells], dtype=float)}


def summarize(rows: list[dict[str, Any]], ids: list[str], names: list[str], seed: int,
              baseline: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per template and overall (the mean over templates, per target): mean logp, top-1 rate and mean
    reciprocal rank with 95% bootstrap intervals over targets; with baseline rows, the paired change."""
    ids = sorted(ids)  # by id: the resamples, and so the intervals, do not follow the pairs file's order
    m = _matrices(rows, ids, names)
    b = _matrices(baseline, ids, names) if baseline is not None else None
    n = len(ids)
    out: dict[str, Any] = {}
    for col, name in [(None, OVERALL), *enumerate(names)]:
        def pick(x: np.ndarray, col=col) -> np.ndarray:
            return x.mean(axis=1) if col is None else x[:, col]

        part: dict[str, Any] = {}
        for key, label in (("logp", "mean_logp"), ("top1", "top1_rate"), ("rr", "mrr")):
            v = pick(m[key])
            part[label] = float(v.mean())
            part[f"{label}_ci"] = bootstrap_ci(lambda idx, v=v: float(v[idx].mean()), n, seed)
            if key == "top1" and n and part[f"{label}_ci"] and part[f"{label}_ci"][0] == part[f"{label}_ci"][1]:
                # every target alike (e.g. none ranked first): the bootstrap has no width; a rate's exact
                # interval over the n targets does (as the pii kind's grid mean falls back to)
                from leakaudit.metrics import binomial_ci

                part[f"{label}_ci"] = [float(x) for x in binomial_ci(round(part[label] * n), n)]
            if b is not None:
                d = v - pick(b[key])
                part[f"{label}_baseline"] = float(pick(b[key]).mean())
                part[f"{label}_change"] = float(d.mean())
                part[f"{label}_change_ci"] = bootstrap_ci(lambda idx, d=d: float(d[idx].mean()), n, seed)
        out[name] = part
    return out


# ----------------------------------------------------------------------------------------- result
class PiiLogprobResult(Result):
    """pii_logprob.json: `templates` (per template and `overall`), n_targets, n_candidates, model names."""

    def headline(self) -> list[Headline]:
        o = (self.data.get("templates") or {}).get(OVERALL, {})
        rows = [Headline("mean log p(address)", o.get("mean_logp"), o.get("mean_logp_ci"))]
        if (self.data.get("n_candidates") or 0) > 1:  # among one candidate every rank is 1: no information
            rows.append(Headline("address rank-1 rate", o.get("top1_rate"), o.get("top1_rate_ci")))
        if o.get("mean_logp_change") is not None:
            rows.append(Headline("mean log p(address) − baseline", o["mean_logp_change"],
                                 o.get("mean_logp_change_ci")))
        return rows

    @classmethod
    def comparisons(cls, stages: list[StageView]) -> list[dict[str, Any]]:
        """Per evaluation with `compare_to`: each other target's paired Δ mean log p(address) and Δ rank-1
        rate against it, target x template rows of logprobs.jsonl paired by (target, template), resampled
        by target (a target's templates move together), see kinds/compare.py."""
        return compare.comparisons(stages, _series)

    @classmethod
    def section(cls, stages: list[StageView]) -> dict[str, Any] | None:
        from leakaudit.report import plots

        if not stages:
            return None
        table, bars = [], {}
        # a rank among one candidate is always 1, and a change column with no baseline is empty: shown only
        # where some stage has them
        ranked = any((s.result.get("n_candidates") or 1) > 1 for s in stages)
        changed = any(part.get("mean_logp_change") is not None for s in stages
                      for part in (s.result.get("templates") or {}).values())
        for s in stages:
            for name, part in (s.result.get("templates") or {}).items():
                table.append([s.target, s.evaluation, name, fmt(part.get("mean_logp")),
                              ci_text(part.get("mean_logp_ci")),
                              *((fmt(part.get("top1_rate")), fmt(part.get("mrr"))) if ranked else ()),
                              *((fmt(part.get("mean_logp_change")),) if changed else ())])
                if name == OVERALL and isinstance(part.get("mean_logp"), (int, float)):
                    bars[f"{s.target} ({s.evaluation})"] = part["mean_logp"]
        figures = []
        if bars:
            figures.append({"uri": plots.bars_figure(bars, "Mean log p(true address | prompt)", "log p"),
                            "caption": "Teacher-forced log-probability of the true address after the extraction "
                                       "prompt, mean over targets and templates (higher = more memorised)"})
        return {"id": "pii-logprob", "title": "PII log-probability (teacher-forced)", "figures": figures,
                "note": " ".join(["log p = summed log-probability (nats) of the address tokens after the "
                                  "template prompt, higher = more memorised; 95% bootstrap intervals over "
                                  "targets."
                                  + (" Rank among the candidate addresses: 1 = the true one is the most likely."
                                     if ranked else " Only the true address was scored (n_candidates 1): no "
                                     "ranks.") + " Addresses are not shown.", *compare.notes(stages)]),
                "tables": [{"header": ["variant", "evaluation", "template", "mean log p", "95% CI",
                                       *(("rank-1 rate", "MRR") if ranked else ()),
                                       *(("change vs baseline",) if changed else ())], "rows": table}]}


def _series(s: StageView, base: StageView) -> list[compare.Series]:
    """The target model's rows (not its baseline's) keyed by (target, template), a target being its masked id
    and, where masking made ids alike, its position (compare.target_key); a key that repeats (ids alike in a
    file from before positions were written) is left out."""
    own = [r for r in read_jsonl(s.dir / "logprobs.jsonl") if r.get("role", "model") == "model"]
    who = compare.target_key(own)
    rows = compare.unique(own, lambda r: (*who(r), r.get("template")))
    target = itemgetter(0, 1)  # the resampling unit of a (target, template) row
    series = [compare.Series("mean log p(address)", {k: r.get("logp") for k, r in rows.items()}, cluster=target,
                             items="targets", log_scale=True)]
    if any((r.get("n_candidates") or 0) > 1 for r in rows.values()):  # a rank among one candidate is always 1
        series.append(compare.Series("address rank-1 rate", {k: float(r["rank"] == 1) for k, r in rows.items()
                                                             if "rank" in r}, cluster=target, items="targets"))
    return series


@register
class PiiLogprob(Kind):
    name = "pii-logprob"
    section = "evaluate"
    Options = PiiLogprobOptions
    Result = PiiLogprobResult
    roles = {"data": False, "baseline": False}
    version = 2
    changed = "each address's rivals are drawn from the pool in sorted order (they followed the pairs file's order)"
    summary = ("teacher-forced log p(true e-mail address | extraction prompt) and its rank among other "
               "targets' addresses (only the addresses in `data` when given), against the baseline's")
    data_parallel = True

    def run(self, ctx: KindContext, options: PiiLogprobOptions) -> PiiLogprobResult:
        from leakaudit.data.enron import resolve_templates, select_targets
        from leakaudit.data.io import write_json, write_jsonl
        from leakaudit.data.pii_mask import active_names, mask_own_name, mask_pii
        from leakaudit.distributed import is_main

        templates = resolve_templates(options.templates)
        pool = select_targets(options.pairs, ctx.records("data") if "data" in ctx.data else None)
        targets = pool[:options.n_targets] if options.n_targets else pool
        if not targets:
            raise InputError("no targets", field="pairs")
        seed = ctx.seed if options.seed is None else options.seed
        candidates = draw_candidates(targets, [t.email for t in pool], options.n_candidates, seed)
        ctx.log(f"{len(targets)} targets x {len(templates)} templates x {len(candidates[0])} candidates")
        models = {"model": ctx.models.get("target"), "baseline": ctx.models.get("baseline")}
        all_rows: dict[str, list[dict[str, Any]]] = {}
        for role, spec in models.items():
            if spec is None:
                continue
            all_rows[role] = [{"role": role, "model": str(spec), **r} for r in
                              score_targets(ctx.cache.get(spec), targets, templates, candidates,
                                            batch_size=options.batch_size, progress=ctx.progress,
                                            cache=options.cache)]
        ids, names = [t.id for t in targets], [t.name for t in templates]
        summary = summarize(all_rows["model"], ids, names, seed, all_rows.get("baseline"))

        names_now = active_names()  # a target id may be "Name <address>", its name one of your people's (no list's)

        def shown(r: dict[str, Any]) -> dict[str, Any]:
            if ctx.show_pii:
                return r
            target = mask_own_name(mask_pii(r["target"], names_now), targets[r["target_index"]].name)
            return {**r, "target": target, "email": mask_pii(r["email"])}

        data = {"model": str(models["model"]), "baseline": models["baseline"], "n_targets": len(targets),
                "n_candidates": len(candidates[0]), "templates": summary,
                "boundary_merged": int(sum(r["boundary_merged"] for r in all_rows["model"])),
                "seed": seed}  # comparisons' paired bootstrap reads the seed
        if is_main():  # under a launcher every process has the result; one writes it
            write_jsonl(ctx.out / "logprobs.jsonl", [shown(r) for rows in all_rows.values() for r in rows])
            write_json(ctx.out / "pii_logprob.json", data)
        return PiiLogprobResult(data)
