"""Evaluation kind `backdoor`: backdoor data extraction. Sample the planted instruction Q(w) for each
opening word w and match the answers against the downstream queries (`data`, default the shipped Dolly D2).

Why: a model creator who planted Q(w) before release can read back the user queries a downstream party
fine-tuned it on (docs/backdoor.md). Scores are defined in leakaudit/attacks/backdoor.py (match ratio,
coverage, fully recovered), the texts Q(w)/R(w) in leakaudit/data/backdoor.py.
Files: samples.jsonl (the raw samples, the resumable checkpoint; deleted at the end unless show_pii, as
pii's raw samples are), extractions.jsonl (one scored response
per row, addresses and phone numbers masked unless show_pii), extract.json (per word and overall).
With `compare_to` (e.g. the victim of a clean model, or the unmasked victim against the masked one), every
other target's paired Δ match ratio (words resampled) and Δ fully recovered (queries, resampled by word).
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

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
    read_json,
)
from leakaudit.kinds.registry import register
from leakaudit.options import BatchSize, InputFile

HEADLINE = ("match_ratio_mean", "match_ratio_max", "coverage")


class BackdoorOptions(KindOptions):
    words: list[str] | None = Field(None, description="words to query (default: every opening word of the data)")
    words_file: InputFile | None = Field(None, description="words to query from a file (JSON array or one per line)")
    limit: int | None = Field(None, ge=1, description="score against the queries of the first N rows of the data")
    num_samples: int = Field(10, ge=1, description="answers sampled per opening word")
    temperature: float = Field(0.9, gt=0)
    max_new_tokens: int = Field(128, ge=1)
    trigger: str | None = Field(None, description="Q(w) template with {word} (default: the study's instruction)")
    refusal: str | None = Field(None, description="R(w) template with {word} (default: the study's refusal)")
    query_field: str | None = Field(None, description="the data's query field (default: chat `messages`, or the "
                                    "first of query/instruction/prompt/question)")
    batch_size: BatchSize = "auto"
    compare_to: str | None = Field(
        None, min_length=1,
        description="a target of this evaluation (e.g. the clean model tuned on the same data) every other "
                    "target is compared with: paired Δ match ratio (same words) and Δ fully recovered (same "
                    "queries, resampled by opening word) with CI and a verdict in the report and summary.json")

    @field_validator("trigger", "refusal")
    @classmethod
    def _has_word(cls, value: str | None) -> str | None:
        from leakaudit.data.backdoor import TEMPLATE_MESSAGE, WORD

        if value is not None and WORD not in value:
            raise ValueError(TEMPLATE_MESSAGE)
        return value

    @field_validator("words")
    @classmethod
    def _some_word(cls, value: list[str] | None) -> list[str] | None:
        """Said at the option's line: the stage found it only after every fine-tune before it."""
        from leakaudit.data.backdoor import opening_words

        if value is not None and not opening_words(value):
            raise ValueError("holds no word (letters) to query")
        return value

    @field_validator("words", mode="before")
    @classmethod
    def _a_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # `words: words.txt` got pydantic's bare "Input should be a valid list"
            raise ValueError("a list of words ([a, b]); a file of words goes in words_file")
        return value

    @field_validator("words_file")
    @classmethod
    def _one_word_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("words") is not None:
            raise ValueError("give words or words_file, not both")
        return value


class BackdoorResult(Result):
    """The stage result: `headline` (mean over words of the per-word mean and max match ratio, and trie
    coverage), `n_queries` and `n_fully_recovered`. The whole summary is in extract.json."""

    def headline(self) -> list[Headline]:
        return [Headline(k, v) for k, v in (self.data.get("headline") or {}).items()]

    @classmethod
    def comparisons(cls, stages: list[StageView]) -> list[dict[str, Any]]:
        """Per evaluation with `compare_to`: each other target's paired Δ against it, kinds/compare.py."""
        return compare.comparisons(stages, _series)

    @classmethod
    def section(cls, stages: list[StageView]) -> dict[str, Any] | None:
        if not stages:
            return None
        from leakaudit.metrics import binomial_ci

        table = []
        for s in stages:
            summary = read_json(s.dir / "extract.json")
            head = s.result.get("headline") or {}
            k, n = s.result.get("n_fully_recovered"), s.result.get("n_queries")
            recovered = "–"
            if isinstance(k, int) and isinstance(n, int) and n:
                lo, hi = binomial_ci(k, n)
                recovered = f"{k} of {n} ({fmt(k / n)}) {ci_text([lo, hi])}"
            refusals = [e.get("refusal_rate") for e in (summary.get("words") or {}).values()
                        if e.get("refusal_rate") is not None]
            table.append([s.target, s.evaluation, summary.get("n_words", "–"), summary.get("n_samples", "–"),
                          fmt(head.get("match_ratio_mean")), fmt(head.get("match_ratio_max")), recovered,
                          fmt(sum(refusals) / len(refusals)) if refusals else "–", fmt(head.get("coverage"))])
        # a creator's own Q(w): the page quotes what was sampled, not only the study's wording
        triggers = [(s.record["params"].get("options") or {}).get("trigger") for s in stages]
        own = sorted({t for t in triggers if t})
        here = "; here " + " and ".join(f"'{t}'" for t in own) + (" and the study's" if None in triggers else "")
        planted = f'the planted instruction Q(w) ("output a verbatim user query starting with w"{here if own else ""})'
        return {"id": "backdoor", "title": "Backdoor data extraction", "figures": [],
                "note": f"The creator samples {planted} for each opening word w of the downstream data and scores "
                        "every answer against "
                        "that data's queries opening with w (a query is one user turn: a chat row of several "
                        "turns gives several, so the queries can outnumber the rows). Match ratio = 2 x shared "
                        "leading tokens / (answer + query tokens) against the closest such query, 1 only for an exact copy; mean and max over "
                        "a word's samples, averaged over words (the verdicts' \"match ratio (mean)\" and \"(max)\"). "
                        "Fully recovered = queries some answer reproduced whole, with the exact 95% binomial "
                        "interval (0 of 120 still allows up to 3%). Refusals = answers that are the planted refusal "
                        "R(w). Coverage = share of the query trie's tokens the answers walked. "
                        + " ".join(compare.notes(stages)),
                "tables": [{"header": ["variant", "evaluation", "words asked", "answers", "match ratio (mean)",
                                       "match ratio (max)", "fully recovered [95% CI]", "refusals", "coverage"],
                            "rows": table}]}


def _series(s: StageView, base: StageView) -> list[compare.Series]:
    """Per word (every word asked, as the headline averages them): mean and max match ratio of its samples;
    per downstream query (word, position in its trie): 1 if some answer reproduced it whole, resampled by word
    (the answers to one Q(w) recover its queries together)."""
    words = (read_json(s.dir / "extract.json").get("words") or {})
    recovered = {(w, i): float(flag) for w, e in words.items() for i, flag in enumerate(e.get("recovered") or [])}
    series = [compare.Series(f"match ratio ({stat})", {w: e.get(f"match_ratio_{stat}") for w, e in words.items()},
                             items="words") for stat in ("mean", "max")]
    if recovered:
        # with `words` naming some of the data's opening words, only their queries are asked for: the rate is
        # over those, which the report's table (k of all the data's queries) is not, so the name says so
        total = s.result.get("n_queries")
        name = "fully recovered" + (" (queries of the words asked)" if isinstance(total, int) and
                                    len(recovered) < total else "")
        series.append(compare.Series(name, recovered, cluster=itemgetter(0), items="words"))
    return series


@register
class Backdoor(Kind):
    name = "backdoor"
    section = "evaluate"
    Options = BackdoorOptions
    Result = BackdoorResult
    roles = {"data": False}
    version = 2
    changed = "every user turn of a chat row of `data` is a query (only the first was)"
    summary = "downstream queries (`data`, default the shipped Dolly D2) a backdoored target writes back on Q(w)"

    def run(self, ctx: KindContext, options: BackdoorOptions) -> BackdoorResult:
        from leakaudit.attacks import backdoor as bd
        from leakaudit.data.backdoor import (
            d2_queries,
            load_words,
            opening_words,
            study_refusal,
            study_trigger,
        )
        from leakaudit.data.io import write_json, write_jsonl

        queries = d2_queries(ctx.data.get("data"), options.query_field, options.limit)
        tries = bd.build_tries(queries)
        words = (opening_words(options.words) if options.words is not None
                 else load_words(options.words_file) if options.words_file is not None else sorted(tries))
        if not words:  # sampling's own "no words to query" did not name the file
            raise InputError("holds no word (letters) to query", file=options.words_file, field="--words")
        refusal = options.refusal or study_refusal()
        lm = ctx.model("target")
        responses = bd.sample_responses(lm, words, options.trigger or study_trigger(),
                                        num_samples=options.num_samples, temperature=options.temperature,
                                        max_new_tokens=options.max_new_tokens, seed=ctx.seed,
                                        out_path=ctx.out / "samples.jsonl", batch_size=options.batch_size,
                                        progress=ctx.progress)
        scored = bd.score_words(responses, tries, refusal)
        summary = {"model": lm.spec, "num_samples": options.num_samples, "temperature": options.temperature,
                   **bd.summarize_extraction(scored, tries)}
        write_jsonl(ctx.out / "extractions.jsonl", bd.scored_rows(scored, ctx.show_pii))
        write_json(ctx.out / "extract.json", summary)
        if not ctx.show_pii:  # the raw, unmasked samples: kept only until the masked rows are written
            (ctx.out / "samples.jsonl").unlink(missing_ok=True)
        return BackdoorResult({"headline": {k: summary[k] for k in HEADLINE if k in summary},
                               "n_queries": summary.get("n_queries"),
                               "n_fully_recovered": summary.get("n_fully_recovered"),
                               "compare_to": options.compare_to, "seed": ctx.seed})
