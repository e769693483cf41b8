"""Option types shared by the kinds' pydantic options and the CLI, so a value means the same everywhere."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo


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


def numbers_are_not_booleans(cls: Any, v: Any, info: ValidationInfo) -> Any:
    """A `field_validator("*", mode="before")` for option models that are not strict (a CLI hands them
    strings): pydantic reads true as 1, so `dp_epsilon: yes` trained at epsilon 1, `max_samples_per_user: true`
    kept one row per user and `n_bootstrap: true` drew one resample, silently. A number field refuses a bool."""
    annotation = cls.model_fields[info.field_name].annotation
    members = set(get_args(annotation)) if get_origin(annotation) in (Union, types.UnionType) else {annotation}
    if isinstance(v, bool) and bool not in members and members & {int, float}:
        raise ValueError(f"must be a number, not {str(v).lower()}")
    return v
