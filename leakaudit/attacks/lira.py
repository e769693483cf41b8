"""Offline LiRA: the target's loss on a text against the spread of several reference models' losses on it.

Why: `ref` compares the target with one reference model, whose own quirks on a text (a topic it happens to
know) read as membership. With n reference models that did not train on the texts (OUT models), the text's
difficulty is their mean loss and its natural variation their spread; the target's loss is scored by how many
spreads it sits below that mean. This is the strongest reference attack at low false-positive rates.

Carlini et al., "Membership Inference Attacks From First Principles", IEEE S&P 2022, the offline variant (only
OUT models, none trained on the texts under attack), with the fixed (global) variance the paper advises for few
reference models.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, Field

from leakaudit.attacks.base import Attack, AttackConfig, register
from leakaudit.attacks.mia import TooShortError, _need_tokens
from leakaudit.errors import InputError
from leakaudit.warn import warn_once

#: the smallest σ a score divides by (nats): references that agree exactly on a text (σ 0) would divide by zero
SIGMA_FLOOR = 1e-6


def _reference_specs(specs: tuple[str, ...]) -> tuple[str, ...]:
    """At least two distinct model specs, each one `load_model` can resolve (a typo fails before any scoring)."""
    from leakaudit.models import resolve_spec
    from leakaudit.options import NAMED_MODELS

    if len(specs) < 2:
        raise ValueError(f"needs at least 2 reference models (their mean and spread), got {len(specs)}")
    where: dict[object, int] = {}  # resolved location -> the first reference there
    for i, spec in enumerate(specs):
        if spec in specs[:i]:  # the same model twice: its losses agree exactly, and the spread shrinks for nothing
            raise ValueError(f"references[{i}] '{spec}' is listed twice")
        if spec in NAMED_MODELS.get():  # a model of the experiment, resolved by its plan
            continue
        try:
            location = resolve_spec(spec)
        except InputError as exc:
            raise ValueError(f"references[{i}] '{spec}': {exc.message}") from None
        if location in where:  # the same folder spelt twice ('ref', 'ref/', './ref', tiny-opt and its folder)
            first = where[location]
            raise ValueError(f"references[{i}] '{spec}' is the model of references[{first}] '{specs[first]}' "
                             "(the same folder), listed twice")
        where[location] = i
    return specs


class LiraConfig(AttackConfig):
    references: Annotated[tuple[str, ...], AfterValidator(_reference_specs)] = Field(
        (), validate_default=True,
        description="at least 2 reference models not trained on the texts under attack (any model spec: a local "
                    "folder, a hub id, tiny-*, random:*)")
    variance: Literal["global", "per_text"] = Field(
        "global", description="σ pooled over all texts (the paper's advice for fewer than 64 reference models) or "
                              "each text's own")


def lira_scores(nll_target: np.ndarray, nll_refs: np.ndarray, variance: str = "global") -> tuple[np.ndarray, int]:
    """(μ(x) - NLL_target(x)) / σ(x) for each text, and how many σ were floored. `nll_refs` is (n references,
    texts); μ their mean per text; σ their standard deviation (ddof 1) per text, or with `global` one σ over all
    residuals NLL_ref_j(x) - μ(x) pooled (ddof = the number of texts, one mean estimated per text)."""
    nll_refs = np.asarray(nll_refs, dtype=np.float64)
    mu = nll_refs.mean(axis=0)
    if variance == "global":
        # the residuals' mean is 0 (each text's sum to 0), so np.std over them is the pooled σ
        sigma = np.full(mu.shape, np.std(nll_refs - mu, ddof=nll_refs.shape[1]))
    else:
        sigma = np.std(nll_refs, axis=0, ddof=1)
    floored = int((sigma < SIGMA_FLOOR).sum())
    return (mu - np.asarray(nll_target, dtype=np.float64)) / np.maximum(sigma, SIGMA_FLOOR), floored


@register
class LiraAttack(Attack):
    """lira = (μ(x) - NLL_target(x)) / σ(x), μ and σ the mean and standard deviation of NLL_ref_j(x) over n ≥ 2
    reference models not trained on x (each with its own tokenizer); σ pooled over all texts by default. Higher
    => member.

    The paper's offline test: Λ(x) = 1 - Pr[Z > φ(x)], Z ~ N(μ_out, σ_out²) the OUT models' statistic and φ the
    target's, oriented so that higher => member. Here the statistic is -NLL (the paper's logit-scaled confidence
    is a classifier's), so Λ(x) = Φ((μ(x) - NLL_target(x)) / σ(x)): Φ is increasing, and ranking by the z-score
    gives the same ROC as the one-sided Gaussian likelihood-ratio p-value, without its saturation at 0 and 1 in
    floating point. One scoring pass per reference, each model loaded, scored and released in turn.

    Carlini et al., "Membership Inference Attacks From First Principles", IEEE S&P 2022 (offline LiRA).
    """

    name = "lira"
    summary = ("how many standard deviations the target's loss on the text sits below the mean loss of several "
               "reference models that did not train on it")
    paper = "Carlini et al. 2022, Membership Inference Attacks From First Principles (offline LiRA)"
    Config = LiraConfig

    def score(self, ctx):
        _need_tokens(ctx)
        refs = self.config.references
        nll_refs = np.empty((len(refs), len(ctx.texts)))
        for j, spec in enumerate(refs):
            try:
                scored = ctx.reference_scores(spec, f"lira reference {j + 1}/{len(refs)}")
            except InputError as exc:  # a reference that resolved but does not load: which one, not `--model`
                if exc.field == "--model":
                    exc.field, exc.message = "references", f"references[{j}] '{spec}': {exc.message}"
                    exc.args = (exc.format(),)
                raise
            for i, s in enumerate(scored):
                if s.n_tokens == 0:
                    raise TooShortError.under(i, f"lira's references[{j}] {spec}")
                nll_refs[j, i] = -s.mean_logp
        _say_same_models(ctx, refs)
        nll_target = np.array([-s.mean_logp for s in ctx.target_scores])
        scores, floored = lira_scores(nll_target, nll_refs, self.config.variance)
        if floored:
            warn_once(f"lira: the reference models agree exactly on {floored} of {len(ctx.texts)} texts (σ 0); "
                      f"σ floored at {SIGMA_FLOOR:g} nats there, so those scores are (μ - NLL) / {SIGMA_FLOOR:g}")
        return scores


def _say_same_models(ctx, refs: tuple[str, ...]) -> None:
    """Warn of a reference that is the target itself, or a copy of another reference (the same weights and
    tokenizer files): the target's loss in μ and σ pulls its own score towards 0 (lira becomes `ref` against the
    other references), and a copy is counted twice. Said, not refused: an experiment's base model may be both a
    target (the control) and a reference of its fine-tunes."""
    seen: dict[str, int] = {}
    target = ctx.target.current_fingerprint()
    for j, spec in enumerate(refs):
        fingerprint = ctx.reference_fingerprints.get(spec)
        if fingerprint is None:
            continue
        if fingerprint == target:
            warn_once(f"lira: references[{j}] '{spec}' is the target itself (the same weights): its loss enters μ "
                      "and σ, so the score is in part the target against itself; a reference should not have "
                      "trained on the texts")
        elif fingerprint in seen:
            warn_once(f"lira: references[{j}] '{spec}' is a copy of references[{seen[fingerprint]}] "
                      f"'{refs[seen[fingerprint]]}' (the same weights): counted twice in μ and σ")
        seen.setdefault(fingerprint, j)
