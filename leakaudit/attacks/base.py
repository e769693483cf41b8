"""The attack contract and registry: each attack is a small class with a typed config and one method,
`score(ctx) -> one number per text, higher => member`, computed from scoring passes shared in a context.

Why a shared context: loss, zlib, min_k and min_k_pp all read the same teacher-forced pass (with the
Min-K%++ moments), so running all of them costs one forward pass; the context computes each pass at most
once, and the scoring engine caches it on disk.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from leakaudit.errors import InputError
from leakaudit.options import numbers_are_not_booleans

if TYPE_CHECKING:  # the registry (names, papers, summaries) is read by the report, which needs no torch
    from leakaudit.models import LoadedModel
    from leakaudit.scoring import TokenScores


class AttackConfig(BaseModel):
    """Options of one attack; unknown options are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    _numbers_are_not_booleans = field_validator("*", mode="before")(numbers_are_not_booleans)


@dataclass
class ScoringContext:
    """The texts under attack, the models, and scoring passes computed once and shared by all attacks."""

    target: LoadedModel
    texts: list[str]
    reference: LoadedModel | None = None
    moments: bool = True
    score_options: dict[str, Any] = field(default_factory=dict)  # batch_size, max_length, stride, cache, progress
    _passes: dict[tuple, list[TokenScores]] = field(default_factory=dict, repr=False)

    def scores(self, model: str = "target", texts: Sequence[str] | None = None, prefix: str | None = None,
               moments: bool | None = None) -> list[TokenScores]:
        """Token scores of `texts` (default: the texts under attack) under the target or reference model."""
        from leakaudit.distributed import score_texts_distributed

        lm = self.target if model == "target" else self.reference
        if lm is None:
            raise InputError("this attack needs a reference model", field="--reference")
        texts = self.texts if texts is None else list(texts)
        want = self.moments if moments is None else moments
        key = (model, tuple(texts), prefix)
        have = self._passes.get(key)
        if have is None or (want and have and have[0].mu is None):
            have = score_texts_distributed(lm, texts, prefixes=prefix, moments=want,
                                           description=f"scoring ({model})", **self.score_options)
            self._passes[key] = have
        return have

    @property
    def target_scores(self) -> list[TokenScores]:
        """The one shared pass of the target model over the texts (with moments when any attack needs them)."""
        return self.scores("target")


class Attack:
    """Base class: subclasses set `name`, `paper`, `summary`, optionally `Config`, `needs_reference` and
    `needs_moments`, implement `score` (one float per text of `ctx.texts`, higher => member, read from the
    context's shared passes) and register with `@register`. docs/architecture.md, "Adding a membership-inference
    score", lists the docs and tests a new attack takes."""

    name: ClassVar[str]
    paper: ClassVar[str]
    summary: ClassVar[str] = ""  # one plain line for the report's reader: what the score measures (higher => member)
    needs_reference: ClassVar[bool] = False
    needs_moments: ClassVar[bool] = False
    Config: ClassVar[type[AttackConfig]] = AttackConfig

    def __init__(self, config: AttackConfig | None = None):
        self.config = config if config is not None else self.Config()

    def score(self, ctx: ScoringContext) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


ATTACKS: dict[str, type[Attack]] = {}


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator adding an attack to the registry under its `name`."""
    if cls.name in ATTACKS:
        raise RuntimeError(f"attack '{cls.name}' registered twice")
    ATTACKS[cls.name] = cls
    return cls


def unknown_attack_message(name: str) -> str:
    """"unknown attack 'mink'; did you mean 'min_k'? valid attacks: ..." (every front end says the same)."""
    close = difflib.get_close_matches(name, list(ATTACKS), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ";"
    return f"unknown attack '{name}'{hint} valid attacks: {', '.join(ATTACKS)}"


def get_attack(name: str, **config: Any) -> Attack:
    """An attack by name with validated options; unknown names and bad options are InputErrors (field: the
    option's name inside the attack's config). The registry is filled by importing `leakaudit.attacks`,
    which every import of this module does first."""
    if name not in ATTACKS:
        raise InputError(unknown_attack_message(name), field="attacks")
    cls = ATTACKS[name]
    try:
        return cls(cls.Config(**config))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or name
        raise InputError(f"attack '{name}': {err['msg'].removeprefix('Value error, ')}", field=loc) from None
