"""Option types shared by the kinds' pydantic options and the CLI, so a value means the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field


def _batch_size(v: int | str) -> int | str:
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    if isinstance(v, str) and v.isdigit() and int(v) >= 1:
        return int(v)
    raise ValueError("must be 'auto' or a positive integer")


#: The largest seed numpy's and torch's generators take; a negative or larger one crashed deep inside them.
MAX_SEED = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]

#: `auto` (a token budget that fits the device) or sequences per batch.
BatchSize = Annotated[int | str, AfterValidator(_batch_size)]


def _existing(v: str) -> str:
    if not Path(v).expanduser().exists():
        raise ValueError(f"file not found: {v}")
    return v


#: A file (or dataset folder) an option names: checked when the options are, so a typo fails before any stage
#: runs, not when its stage starts after every stage before it.
InputFile = Annotated[str, AfterValidator(_existing)]


def _comma_joined(v: object) -> object:
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return ",".join(v)
    return v


#: comma-separated names that an experiment file may also write as a YAML list (`templates: [C, D]`), as it
#: writes `attacks` and `temperatures`
CommaList = Annotated[str, BeforeValidator(_comma_joined)]
