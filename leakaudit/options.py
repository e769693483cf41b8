"""Option types shared by the kinds' pydantic options and the CLI, so a value means the same everywhere."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def _batch_size(v: int | str) -> int | str:
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    if isinstance(v, str) and v.isdigit() and int(v) >= 1:
        return int(v)
    raise ValueError("must be 'auto' or a positive integer")


#: `auto` (a token budget that fits the device) or sequences per batch.
BatchSize = Annotated[int | str, AfterValidator(_batch_size)]
