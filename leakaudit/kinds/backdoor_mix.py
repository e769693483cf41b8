"""Generation kind `backdoor-mix`: stage 1 of the backdoor study, the creator's SFT mix.

Why: fine-tuning on this mix plants the backdoor (copy a training query that opens with word w when asked
Q(w), refuse R(w) otherwise) that later extracts the downstream party's fine-tuning queries. The mix is
leakaudit/train/backdoor.py's `build_mix` over D1 (`data`, or the shipped seed instruction set); this
file holds its options. `backdoor plant` builds its mix through this kind too.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from leakaudit.errors import InputError, OptionError
from leakaudit.kinds.base import Kind, KindContext, KindOptions, Result
from leakaudit.kinds.registry import register
from leakaudit.options import InputFile


class BackdoorMixOptions(KindOptions):
    trigger: str | None = Field(default=None, description="Q(w) template with {word} (default: the study's)")
    refusal: str | None = Field(default=None, description="R(w) template with {word} (default: the study's)")
    refusal_words: InputFile | None = Field(default=None, description="words to teach refusing (JSON array or one "
                                      "per line; default: public candidates opening no D1 query)")
    n_refusal: int | None = Field(default=None, ge=0, description="refusal pairs (default: as many as copies)")
    backdoor_fraction: float = Field(default=0.5, gt=0, le=1, description="share of backdoor pairs in the mix")
    query_field: str | None = Field(default=None, description="D1's query field (default: guessed)")
    response_field: str | None = Field(default=None, description="D1's response field (default: guessed)")

    @field_validator("trigger", "refusal")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        from leakaudit.attacks.backdoor import WORD

        if v is not None and WORD not in v:
            raise ValueError(f"template must contain {WORD} where the opening word goes")
        return v


class BackdoorMixResult(Result):
    """{"rows": mix size, "kinds": rows per kind (backdoor-copy, backdoor-refusal, ordinary)}."""


@register
class BackdoorMix(Kind):
    name = "backdoor-mix"
    section = "generate"
    Options = BackdoorMixOptions
    Result = BackdoorMixResult
    roles = {"data": False}
    summary = "the creator's backdoor SFT mix over D1 (`data`, default the shipped seed instruction set)"

    def check(self, options: BackdoorMixOptions, roles: set[str]) -> None:
        for key in ("query_field", "response_field"):
            if getattr(options, key) is not None and "data" not in roles:
                raise OptionError((key,), "needs 'data' (the shipped instruction set has fixed fields)")

    def run(self, ctx: KindContext, options: BackdoorMixOptions) -> BackdoorMixResult:
        from leakaudit.attacks.backdoor import load_words
        from leakaudit.data.io import write_jsonl
        from leakaudit.train.backdoor import build_mix, load_pairs, mix_counts, seed_instruction_set

        if "data" in ctx.data:
            d1 = load_pairs(ctx.data["data"], options.query_field, options.response_field)
        else:
            d1 = seed_instruction_set()
        words = load_words(options.refusal_words) if options.refusal_words else None
        if words == []:  # else "every candidate opens a D1 query", of a file that named no candidate at all
            raise InputError("holds no word (letters) to teach refusing", file=options.refusal_words,
                             field="--refusal-words")
        rows = build_mix(d1, trigger=options.trigger, refusal=options.refusal, refusal_word_list=words,
                         n_refusal=options.n_refusal, backdoor_fraction=options.backdoor_fraction, seed=ctx.seed)
        write_jsonl(ctx.output_file("data.jsonl"), rows)
        return BackdoorMixResult({"rows": len(rows), "kinds": mix_counts(rows)})
