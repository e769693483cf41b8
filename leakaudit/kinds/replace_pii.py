"""Generation kind `replace-pii`: a copy of a data file with names, e-mail addresses and phone numbers
replaced by consistent fake ones (the study's "replaced data" variant).

Why: training on replaced data keeps the structure of the texts (the same person writing many e-mails)
without the real values, so it shows how much of a leak replacement prevents. The replacement itself is
leakaudit/data/pii_replace.py (`replace_pii_file`); this file holds its options.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from leakaudit.kinds.base import Kind, KindContext, KindOptions, Result
from leakaudit.kinds.registry import register


class ReplacePiiOptions(KindOptions):
    text_field: list[str] = Field(default=["text"], description="field(s) to rewrite (a list or 'a,b')")
    names: str | None = Field(default=None, description="name list file (default: the shipped Enron names)")
    header_names: bool = Field(default=True, description="also replace the names in From:/To:/Cc: headers")

    @field_validator("text_field", mode="before")
    @classmethod
    def _fields(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [f.strip() for f in v.split(",") if f.strip()]
        if isinstance(v, list) and not v:
            raise ValueError("no field given")
        twice = next((f for i, f in enumerate(v) if f in v[:i]), None) if isinstance(v, list) else None
        if twice is not None:  # rewritten once, but counted (pii_replaced) and listed (provenance) twice
            raise ValueError(f"'{twice}' given twice")
        return v


@register
class ReplacePii(Kind):
    name = "replace-pii"
    section = "generate"
    Options = ReplacePiiOptions
    roles = {"data": True}
    summary = "`data` with names, e-mail addresses and phone numbers replaced by consistent fakes"
    version = 2
    changed = ("a phone number with a word glued to its last digit (\"713-223-5049fax\") is replaced too, and a "
               "row's chat copy (`messages`) with its text")

    def run(self, ctx: KindContext, options: ReplacePiiOptions) -> Result:
        from leakaudit.data.io import write_jsonl
        from leakaudit.data.pii_find import load_name_list
        from leakaudit.data.pii_replace import replace_pii_file
        from leakaudit.warn import warn_if_no_names

        names = warn_if_no_names(load_name_list(options.names), options.names) if options.names else None
        rows, summary = replace_pii_file(ctx.data["data"], options.text_field, names=names,
                                         header_names=options.header_names, seed=ctx.seed)
        write_jsonl(ctx.output_file("data.jsonl"), rows)
        return Result(summary)
