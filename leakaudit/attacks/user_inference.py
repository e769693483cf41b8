"""User inference (Kandpal et al., "User Inference Attacks on Large Language Models", 2023): was this
person's data used for fine-tuning, judged from m samples of theirs (not necessarily the trained ones)?

Per-user statistic, higher => the user was in training:
    S(u) = (1/m) * sum_{i=1..m} [ log p_target(x_i) - log p_ref(x_i) ]
with log p(x) a sequence log-likelihood (sum of token log-probs, each model with its own tokenizer) and
x_1..x_m the first m samples of user u in input order. Users with fewer than m samples are left out of the
result for that m (the counts say how many users each m covers). The ROC runs across users.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from leakaudit.data.io import Record
from leakaudit.errors import InputError
from leakaudit.metrics import RocMetrics, roc_metrics
from leakaudit.models import LoadedModel

ALL = "all"
DEFAULT_M_VALUES = ("1", "2", "4", "8", ALL)  # the numbers of samples per user tried unless told otherwise


@dataclass
class UserInferenceReport:
    """ROC metrics across users for each number m of samples per user, and each user's statistic per m."""

    per_m: dict[str, RocMetrics]
    users: list[str]
    labels: dict[str, int]
    n_samples: dict[str, int]
    user_scores: dict[str, dict[str, float]]  # m -> user -> statistic
    warnings: list[str] = field(default_factory=list)
    #: user -> mean per-token NLL of all the user's samples under the reference: how unusual the user's
    #: writing is to a model that never saw it (an outlier measure for "who is vulnerable")
    ref_nll: dict[str, float | None] = field(default_factory=dict)

    @property
    def headline(self) -> str:
        """The m reported at the top level: all samples when computed, else the largest m."""
        return ALL if ALL in self.per_m else max(self.per_m, key=int)

    def to_json(self) -> dict:
        """`user_inference.json`: the headline m's auc, auc_ci, tpr_at_fpr, tpr_ci, n_users_in/out, plus every m."""

        def one(m: RocMetrics) -> dict:
            js = m.to_json()
            return {"auc": js["auc"], "auc_ci": js["auc_ci"], "tpr_at_fpr": js["tpr_at_fpr"], "tpr_ci": js["tpr_ci"],
                    "tpr_needs_nonmembers": js["tpr_needs_nonmembers"], "advantage": js["advantage"],
                    "n_users_in": m.n_pos, "n_users_out": m.n_neg,
                    "warnings": js["warnings"]}

        top = one(self.per_m[self.headline])
        return {**top, "samples_per_user": self.headline, "per_m": {m: one(r) for m, r in self.per_m.items()},
                "warnings": self.warnings + top["warnings"]}

    def rows(self) -> list[dict]:
        """`user_scores.jsonl`: one row per user with its label, sample count, statistic per m (`scores`),
        the statistic at the headline m (`score`; null when the user has too few samples for it) and the
        user's mean token NLL under the reference (`ref_nll`)."""
        top = self.user_scores.get(self.headline, {})
        return [{"user": u, "label": self.labels[u], "n_samples": self.n_samples[u],
                 "scores": {m: s[u] for m, s in self.user_scores.items() if u in s}, "score": top.get(u),
                 "ref_nll": self.ref_nll.get(u)}
                for u in self.users]


class UserClashError(InputError):
    """A held-out record whose user is also among the in-training users: the one check that the two sets
    of users are disjoint (the front ends name the file and field from `record`)."""

    def __init__(self, record: Record):
        self.record = record
        super().__init__(f"user '{record.user}' appears among both member (in-training) and non-member users; "
                         "split the data by user", line=record.line, field="user")


class TooShortSampleError(InputError):
    """A sample with fewer than 2 tokens: no token of it can be scored, so it would count as a score of 0 in
    its user's mean (mia refuses such a text the same way). `record` and `label` let the front ends name the
    file and line."""

    def __init__(self, record: Record, label: int):
        self.record, self.label = record, label
        super().__init__("text has fewer than 2 tokens; no token can be scored (drop such samples)",
                         line=record.line, field="text")


def group_users(records_in: Sequence[Record], records_out: Sequence[Record]
                ) -> tuple[dict[str, list[Record]], dict[str, int]]:
    """Each user's records in input order and label (1 = in training); a user on both sides is an error."""
    samples: dict[str, list[Record]] = {}
    labels: dict[str, int] = {}
    for records, label in ((records_in, 1), (records_out, 0)):
        for r in records:
            if r.user is None:
                raise InputError("record has no user", line=r.line, field="user")
            if labels.setdefault(r.user, label) != label:
                raise UserClashError(r)
            samples.setdefault(r.user, []).append(r)
    return samples, labels


def parse_m_values(spec: str | Sequence[int | str]) -> list[str]:
    """'1,2,4,all' -> ['1', '2', '4', 'all'] (validated)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for raw in items:
        item = str(raw).strip().lower()
        if item == ALL:
            out.append(ALL)
            continue
        if not item.isdigit() or int(item) < 1:
            raise InputError(f"'{raw}' is not a positive number of samples or 'all'", field="m_values")
        out.append(str(int(item)))
    if not out:
        raise InputError("give at least one value", field="m_values")
    return list(dict.fromkeys(out))


def run_user_inference(target: LoadedModel, reference: LoadedModel, records_in: Sequence[Record],
                       records_out: Sequence[Record], m_values: str | Sequence[int | str] = DEFAULT_M_VALUES, *,
                       n_bootstrap: int = 1000, seed: int = 0, batch_size: int | str = "auto",
                       max_length: int | None = None, stride: int | None = None, cache: bool = True,
                       progress: bool = True, messages_field: str | None = None) -> UserInferenceReport:
    """Score every sample once under target and reference, then aggregate per user for each m. With
    `messages_field` the samples are conversations (records read with it: a chat fine-tune's users), each
    scored at its assistant replies in context, as `run_mia` scores them."""
    from leakaudit.attacks.base import chat_training_notes, scoring_pass
    from leakaudit.errors import check_model

    check_model(target, "target")
    check_model(reference, "reference")
    checked = []
    for name, records in (("records_in", records_in), ("records_out", records_out)):
        rows = [records] if isinstance(records, str) else list(records)  # a generator is read once, here
        bad = next((r for r in rows if not hasattr(r, "user") or not hasattr(r, "text")), None)
        if bad is not None:  # strings or dicts failed on "no attribute 'user'"
            raise TypeError(f"{name}: expected leakaudit.data.io.Record rows (load_records(path, "
                            f"user_field=...)), got {type(bad).__name__}")
        checked.append(rows)
    records_in, records_out = checked
    samples, labels = group_users(records_in, records_out)
    users = list(samples)
    ms = parse_m_values(m_values)
    records = [r for u in users for r in samples[u]]
    texts = [r.text for r in records]
    chats = None if messages_field is None else [r.extra[messages_field] for r in records]
    opts = {"batch_size": batch_size, "max_length": max_length, "stride": stride, "cache": cache,
            "progress": progress}
    tgt = scoring_pass(target, texts, chats, name="target", **opts)
    short = next((i for i, s in enumerate(tgt) if s.n_tokens == 0), None)
    if short is not None:  # before the reference pass; the target's scores stay in the score cache
        raise TooShortSampleError(records[short], labels[records[short].user])
    ref = scoring_pass(reference, texts, chats, name="reference", **opts)
    ratio = np.array([t.sum_logp - r.sum_logp for t, r in zip(tgt, ref, strict=True)])
    per_user: dict[str, np.ndarray] = {}
    ref_nll: dict[str, float | None] = {}
    pos = 0
    for u in users:
        per_user[u] = ratio[pos:pos + len(samples[u])]
        scored = ref[pos:pos + len(samples[u])]
        n_tok = sum(r.n_tokens for r in scored)
        ref_nll[u] = -sum(r.sum_logp for r in scored) / n_tok if n_tok else None
        pos += len(samples[u])
    per_m: dict[str, RocMetrics] = {}
    user_scores: dict[str, dict[str, float]] = {}
    warnings: list[str] = []
    if chats is not None:
        warnings += chat_training_notes(target, chats)
    for m in ms:
        keep = [u for u in users if m == ALL or len(per_user[u]) >= int(m)]
        stats = {u: float(per_user[u][: None if m == ALL else int(m)].mean()) for u in keep}
        y = [labels[u] for u in keep]
        if len(set(y)) < 2:
            warnings.append(f"m={m}: too few users with {m} samples in both groups; no result for this m")
            continue
        user_scores[m] = stats
        per_m[m] = roc_metrics([stats[u] for u in keep], y, n_bootstrap=n_bootstrap, seed=seed,
                               negatives="non-member users")
    if not per_m:  # the most samples each side's users have says which m would do
        most = {lab: max((len(samples[u]) for u in users if labels[u] == lab), default=0) for lab in (1, 0)}
        raise InputError(f"no value of samples-per-user leaves users both in and out of training (the most "
                         f"samples an in-training user has: {most[1]}; a user not in training: {most[0]})",
                         field="m_values")
    return UserInferenceReport(per_m, users, labels, {u: len(samples[u]) for u in users}, user_scores, warnings,
                               ref_nll)
