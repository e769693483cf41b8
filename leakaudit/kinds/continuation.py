"""Generation kind `continuation`: a generator model continues a prompt cut from every source text.

Why: the study's "generated data" is continuations of the private texts; whatever of them the generator
reproduces is leaked before anyone fine-tunes on it (check with `audit-data`). Prompts, provenance and the
resumable sampling are leakaudit/data/synth.py's `generate_continuations`; this file holds the options
(study defaults: top-k 100, up to 1000 new tokens, temperature 1) and how they become a SamplingConfig.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from leakaudit.errors import OptionError
from leakaudit.kinds.base import Kind, KindContext, KindOptions, Result
from leakaudit.kinds.registry import register
from leakaudit.options import BatchSize


class ContinuationOptions(KindOptions):
    prompt_tokens: int = Field(default=50, ge=1, description="prompt = the first N tokens of each text")
    prompt_field: str | None = Field(default=None, description="take prompts from this field instead (not with "
                                                                  "prompt_tokens)")
    limit: int | None = Field(default=None, ge=1, description="use only the first N source records")
    max_new_tokens: int = Field(default=1000, ge=1)
    greedy: bool = False  # before temperature: its validator reads it
    temperature: float | None = Field(default=None, ge=0, description="default 1.0; not with greedy")
    top_k: int | None = Field(default=100, ge=0, description="0 or null = no top-k")
    top_p: float | None = Field(default=None, gt=0, le=1)
    num_samples: int = Field(default=1, ge=1, description="continuations per prompt")
    stop_at_eos: bool = True
    batch_size: BatchSize = "auto"
    backend: Literal["hf", "vllm", "auto"] = Field(
        default="hf", description="hf (reference) | vllm (GPU, installed) | auto (vllm where it can run, else hf)")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("greedy"):
            raise ValueError("cannot be combined with greedy (greedy decoding has no temperature)")
        if v is not None and v == 0:
            raise ValueError("must be > 0 (use greedy decoding for temperature 0)")
        return v

    def sampling(self, seed: int):  # -> leakaudit.sampling.SamplingConfig (imported lazily: torch)
        """The sampling engine's config for these options."""
        from leakaudit.sampling import SamplingConfig

        return SamplingConfig(max_new_tokens=self.max_new_tokens,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_k=self.top_k or None, top_p=self.top_p, num_samples=self.num_samples,
                              greedy=self.greedy, stop_at_eos=self.stop_at_eos, seed=seed)


class ContinuationResult(Result):
    """{"rows": number of continuations written}; `n_prompts` and `n_new_tokens` are for the CLI's line."""

    def __init__(self, data: dict, n_prompts: int = 0, n_new_tokens: int = 0):
        super().__init__(data)
        self.n_prompts = n_prompts
        self.n_new_tokens = n_new_tokens


@register
class Continuation(Kind):
    name = "continuation"
    section = "generate"
    Options = ContinuationOptions
    Result = ContinuationResult
    roles = {"data": True, "model": True}
    summary = "the `model` continues a prompt cut from every text of `data` (rows: prompt, generated, text)"

    def check(self, options: ContinuationOptions, roles: set[str]) -> None:
        """A prompt is cut from the text or read from a field: prompt_tokens given beside prompt_field was
        silently unused. Greedy decoding reads no top-k or top-p (they were ignored in silence) and gives one
        continuation per prompt (num_samples N wrote it N times)."""
        if options.prompt_field is not None and "prompt_tokens" in options.model_fields_set:
            raise OptionError(("prompt_tokens",), "cannot be combined with prompt_field: a prompt is cut from the "
                                                  "text, or read from the field")
        if options.greedy:
            for name, given in (("top_k", "top_k" in options.model_fields_set), ("top_p", options.top_p is not None),
                                ("num_samples", options.num_samples > 1)):
                if given:
                    raise OptionError((name,), "cannot be combined with greedy (greedy decoding gives one "
                                               "continuation per prompt and reads no top-k or top-p)")

    def run(self, ctx: KindContext, options: ContinuationOptions) -> ContinuationResult:
        from leakaudit.data.synth import generate_continuations

        # the first `limit` records: a bad row after them is not read as one (an experiment's data step has
        # checked every row already)
        records = ctx.records("data", limit=options.limit)[:options.limit]
        rows = generate_continuations(ctx.model("model"), records, ctx.output_file("data.jsonl"),
                                      options.sampling(ctx.seed), prompt_tokens=options.prompt_tokens,
                                      prompt_field=options.prompt_field, batch_size=options.batch_size,
                                      progress=ctx.progress, backend=options.backend, source=ctx.data["data"],
                                      text_field=ctx.data_fields.get("data", {}).get("text_field", "text"))
        return ContinuationResult({"rows": len(rows)}, n_prompts=len(records),
                                  n_new_tokens=sum(r["n_new_tokens"] for r in rows))
