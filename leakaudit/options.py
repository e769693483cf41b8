"""Option types shared by the kinds' pydantic options and the CLI, so a value means the same everywhere."""

from __future__ import annotations

import types
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo

BATCH_SIZE_RULE = "must be 'auto' or a positive integer"

#: model names a list of model specs may hold that its caller resolves itself: an experiment's `models:` entries
#: and fine-tunes, checked before their fine-tunes ran (a validator of specs lets them through, unresolved)
NAMED_MODELS: ContextVar[frozenset[str]] = ContextVar("NAMED_MODELS", default=frozenset())


def parse_batch_size(v: int | str) -> int | str:
    """'auto' or a positive number of sequences (digits read as one): the one rule of the kinds' options, the
    CLI's flags and the scoring and sampling APIs (ValueError otherwise; true is not 1)."""
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    if isinstance(v, str) and v.isdigit() and int(v) >= 1:
        return int(v)
    raise ValueError(BATCH_SIZE_RULE)


#: The largest seed numpy's and torch's generators take; a negative or larger one crashed deep inside them.
MAX_SEED = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]

#: `auto` (a token budget that fits the device) or sequences per batch.
BatchSize = Annotated[int | str, AfterValidator(parse_batch_size)]


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
    kept one row per user and `n_bootstrap: true` drew one resample, silently. A number field refuses a bool,
    and so does a list of numbers any item of it (`temperatures: [true, 0.7]` sampled at 1)."""
    annotation = cls.model_fields[info.field_name].annotation
    if isinstance(v, bool) and _numbers_only(annotation):
        raise ValueError(f"must be a number, not {str(v).lower()}")
    if isinstance(v, (list, tuple)) and any(isinstance(x, bool) for x in v) and any(
            get_origin(m) in (list, tuple, set) and any(_numbers_only(a) for a in get_args(m) if a is not ...)
            for m in _members(annotation)):
        bad = next(x for x in v if isinstance(x, bool))
        raise ValueError(f"must be numbers, not {str(bad).lower()}")
    return v


def _members(annotation: Any) -> set[Any]:
    """The types a value of `annotation` may have: unions flattened and Annotated unwrapped at any depth
    (`Seed | None` is Optional[Annotated[int, ...]]: read at its top only, `seed: true` passed as seed 1)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_members(a) for a in get_args(annotation)))
    return {annotation}


def _numbers_only(annotation: Any) -> bool:
    """Whether `annotation` takes a number and not a bool."""
    members = _members(annotation)
    return bool not in members and bool(members & {int, float})


def stride_inside_the_window(cls: Any, v: int | None, info: ValidationInfo) -> int | None:
    """A `field_validator("stride")` for options that also take `max_length` (declared before it): a stride
    the window cannot hold is said at the option's line, not when the stage's scoring pass begins."""
    window = info.data.get("max_length")
    if v is not None and window is not None and v >= window:
        raise ValueError(f"stride must be between 1 and max length - 1 ({window - 1})")
    return v
