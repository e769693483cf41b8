"""Splitting a dataset's rows: seeded shuffles, disjoint parts by fraction (by row or by user), and the
per-user held-out attacker samples of user inference.

Pure functions of rows and a seed, so a split is the same on every machine and testable without a run.
"""

from __future__ import annotations

import random
from typing import Any

from leakaudit.errors import InputError

HOLDOUT_SUFFIX = "_holdout"  # part P's held-out samples are the part "P_holdout" (`users.in_holdout`)


def shuffled(rows: list[Any], seed: int, salt: str) -> list[Any]:
    rng = random.Random(f"{seed}:{salt}")
    rows = list(rows)
    rng.shuffle(rows)
    return rows


def split_rows(rows: list[dict[str, Any]], split: dict[str, float], by: str = "row"
               ) -> dict[str, list[dict[str, Any]]]:
    """Disjoint consecutive slices by fraction (rows are shuffled before); `by="user"` slices the users,
    so every user's rows land in one part (what user inference needs)."""
    if by == "user":
        users = list(dict.fromkeys(r.get("user") for r in rows))
        parts = split_rows([{"user": u} for u in users], split)
        return {name: [r for r in rows if r.get("user") in {p["user"] for p in part}] for name, part in parts.items()}
    # part ends at rounded cumulative fractions: fractions summing to 1 place every row (rounding each part
    # on its own dropped one of 13 users at 0.5 / 0.5)
    out, start, cumulative = {}, 0, 0.0
    for name, frac in split.items():
        cumulative += frac
        end = min(len(rows), int(round(cumulative * len(rows))))
        out[name] = rows[start:end]
        start = end
    return out


def holdout_per_user(parts: dict[str, list[dict[str, Any]]], k: int, seed: int, dataset: str | None = None
                     ) -> dict[str, list[dict[str, Any]]]:
    """Each part P becomes P (what is trained on) and P_holdout: k samples of each of P's users, a seeded
    choice, never trained on — the attacker's samples of user inference (Kandpal et al. 2023).

    The choice is among the user's distinct texts that no other user has, and the other copies of a
    held-out text leave P too: an attacker sample whose exact text was trained on (by this user, or by
    another, e.g. a shared "Thanks!") would not be held out. A user needs more than k distinct texts (k to
    hold out, at least one to train on), k of them their own; fewer is an InputError naming `dataset`."""
    owners: dict[str, set[Any]] = {}
    for rows in parts.values():
        for r in rows:
            owners.setdefault(r["text"], set()).add(r.get("user"))
    out: dict[str, list[dict[str, Any]]] = {}
    for name, rows in parts.items():
        by_user: dict[Any, list[dict[str, Any]]] = {}
        for r in rows:
            by_user.setdefault(r.get("user"), []).append(r)
        held_ids: set[int] = set()
        held_texts: set[str] = set()
        for user, mine in by_user.items():
            first_of: dict[str, dict[str, Any]] = {}  # the first row of each distinct text
            for r in mine:
                first_of.setdefault(r["text"], r)
            own = [r for r in first_of.values() if len(owners[r["text"]]) == 1]
            if len(first_of) <= k or len(own) < k:
                raise _too_few(name, user, len(mine), len(first_of), len(own), k, dataset)
            rng = random.Random(f"{seed}:holdout:{name}:{user}")
            for i in rng.sample(range(len(own)), k):
                held_ids.add(id(own[i]))
                held_texts.add(own[i]["text"])
        out[name] = [r for r in rows if r["text"] not in held_texts]
        out[name + HOLDOUT_SUFFIX] = [r for r in rows if id(r) in held_ids]
    return out


def _too_few(part: str, user: Any, n: int, distinct: int, own: int, k: int, dataset: str | None) -> InputError:
    from leakaudit.data.pii_mask import mask_pii

    texts = f"{n} rows" + (f" ({distinct} distinct texts)" if distinct != n else "")
    if distinct > k:  # enough texts, but too few that only this user has
        texts += f", {own} of them no other user's"
        need = f"{k} texts no other user has"
    else:
        need = f"at least {k + 1} distinct texts"
    return InputError(f"user {mask_pii(str(user))} of split '{part}' has {texts}; holding out {k} per user "
                      f"needs {need} (lower holdout_per_user or drop such users)",
                      field=f"datasets.{dataset}.holdout_per_user" if dataset else "holdout_per_user")
