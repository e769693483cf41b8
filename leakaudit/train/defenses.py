"""Training-data defenses applied before fine-tuning, each aimed at one kind of leak.

- `dedup_within_user`: drop exact repeats of a text within one user. Protects against memorisation
  driven by duplication (repeated samples are memorised and extracted far more often).
- `max_samples_per_user N`: keep at most the first N samples (file order, after dedup) of each user.
  Bounds any one user's influence on the model, the signal user-inference attacks measure.
- `scrub_pii`: replace e-mail addresses, phone numbers and names in the training text before training, so
  the model never sees them (protects against PII extraction), with the project's consistent fake
  replacement (`leakaudit.data.pii_replace`).
Batch gradient clipping (`max_grad_norm`), early stopping and DP-SGD live in the training loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

#: how a run that holds data out (early stopping, eval_fraction) splits it: every copy of a held-out text with
#: it (since 2026-12-06; rows were held out one by one before, so a repeated text was both trained on and in the
#: eval loss). Here, not in finetune.py: the experiment engine reads it on every rerun without importing torch.
HELDOUT_RULE = "whole texts"


@dataclass
class DefenseReport:
    """What the data defenses changed (written to the run's `defenses.json`)."""

    n_in: int = 0
    n_out: int = 0
    dropped_duplicates: int = 0
    dropped_over_cap: int = 0
    pii_replaced: int = 0
    dropped_no_loss_tokens: int = 0  # examples whose loss tokens max_length cut off (not a defense: reported)
    per_user_out: dict[str, int] = field(default_factory=dict)


def dedup_and_cap(rows: list[tuple[str | None, str]], *, dedup_within_user: bool = False,
                  max_samples_per_user: int | None = None) -> tuple[list[int], DefenseReport]:
    """Indices of rows (user, text) to keep after within-user dedup then the per-user cap, in file order."""
    report = DefenseReport(n_in=len(rows))
    seen: set[tuple[str | None, str]] = set()
    count: Counter[str | None] = Counter()
    keep: list[int] = []
    for i, (user, text) in enumerate(rows):
        if dedup_within_user:
            key = (user, text)
            if key in seen:
                report.dropped_duplicates += 1
                continue
            seen.add(key)
        if max_samples_per_user is not None and count[user] >= max_samples_per_user:
            report.dropped_over_cap += 1
            continue
        count[user] += 1
        keep.append(i)
    report.n_out = len(keep)
    report.per_user_out = {str(u): n for u, n in count.items() if u is not None}  # no user field: no users
    return keep, report


def pii_scrubber(seed: int = 0) -> Callable[[list[str]], tuple[list[str], int]]:
    """The project's consistent fake replacement (names from the shipped list and e-mail headers, e-mails,
    phones), seeded. Returns texts -> (texts, number replaced)."""
    from leakaudit.data.pii_find import names_from_headers, shipped_names
    from leakaudit.data.pii_replace import PiiReplacer

    def project(texts: list[str]) -> tuple[list[str], int]:
        replacer = PiiReplacer(names=shipped_names(), seed=seed)
        replacer.add_names({n for t in texts for n in names_from_headers(t)})
        out = [replacer.replace(t)[0] for t in texts]
        return out, sum(replacer.counts.values())
    return project
