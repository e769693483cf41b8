"""User-grouped data for user inference: the shipped `enron-users` draw and the per-user held-out attacker
samples (`holdout_per_user`, leakaudit/data/split.py) with their data references in experiment files."""

from __future__ import annotations

import sys
from collections import Counter

import pytest

from leakaudit.config import parse_experiment
from leakaudit.data.builtin import builtin_dataset
from leakaudit.data.split import holdout_per_user, shuffled, split_rows
from leakaudit.errors import InputError


@pytest.fixture(scope="module")
def enron_users():
    return builtin_dataset("enron-users", seed=0, limit=None)


# ----------------------------------------------------------------------------------------- shipped draw
def test_shipped_draw_has_enough_users_with_varied_counts(enron_users):
    per_user = Counter(r["user"] for r in enron_users)
    assert len(per_user) >= 150
    assert min(per_user.values()) >= 12 and max(per_user.values()) <= 24
    assert len(set(per_user.values())) >= 5  # users contribute different amounts (a finding to test)
    assert len({r["id"] for r in enron_users}) == len(enron_users)
    for r in enron_users:
        assert r["text"].startswith(f"From: {r['user']}\n") and r["text"].split("\n\n", 1)[1].strip()
    # within-user duplicates are kept (the de-duplication defense needs some)
    assert len({(r["user"], r["text"]) for r in enron_users}) < len(enron_users)


def test_shipped_draw_loads_from_an_experiment_file():
    exp = parse_experiment("name: x\nmodels: {base: tiny-gpt-neox}\n"
                           "datasets: {users: {builtin: enron-users, split: {in: 0.5, out: 0.5}, split_by: user}}\n")
    assert exp.datasets["users"].builtin == "enron-users"


# ----------------------------------------------------------------------------------------- holdout
def _parts(rows, seed=0):
    return split_rows(shuffled(rows, seed, "users"), {"in": 0.5, "out": 0.5}, by="user")


def test_holdout_takes_k_per_user_and_never_leaves_them_in_the_part(enron_users):
    parts = holdout_per_user(_parts(enron_users), 8, seed=0, dataset="users")
    assert set(parts) == {"in", "in_holdout", "out", "out_holdout"}
    for name in ("in", "out"):
        kept, held = parts[name], parts[f"{name}_holdout"]
        assert set(Counter(r["user"] for r in held).values()) == {8}
        assert {r["user"] for r in held} == {r["user"] for r in kept}  # every user keeps training samples
        assert not {r["id"] for r in held} & {r["id"] for r in kept}
        # no held-out text is trained on, even through a within-user duplicate
        assert not {(r["user"], r["text"]) for r in held} & {(r["user"], r["text"]) for r in kept}
    assert not {r["user"] for r in parts["in"]} & {r["user"] for r in parts["out"]}
    assert len(parts["in_holdout"]) + len(parts["out_holdout"]) == 8 * len({r["user"] for r in enron_users})


def test_holdout_is_deterministic_for_a_seed(enron_users):
    def ids(seed):
        return {k: [r["id"] for r in v] for k, v in holdout_per_user(_parts(enron_users), 4, seed).items()}

    assert ids(0) == ids(0)
    assert ids(0)["in_holdout"] != ids(1)["in_holdout"]


def test_holdout_drops_the_other_copies_of_a_held_out_text():
    rows = [{"id": f"{u}{i}", "user": u, "text": u + t} for u in "ab" for i, t in enumerate("xxyz")]
    parts = holdout_per_user({"p": rows}, 2, seed=0)
    for u in "ab":
        held = [r["text"] for r in parts["p_holdout"] if r["user"] == u]
        kept = [r["text"] for r in parts["p"] if r["user"] == u]
        assert len(held) == 2 and not set(held) & set(kept) and kept


def test_a_text_other_users_share_is_never_held_out():
    """A "Thanks!" several users wrote: held out for one, it would still be trained on through another
    (a non-member's attacker sample in the training set), so only a user's own texts are held out."""
    rows = [{"id": f"{u}{i}", "user": u, "text": t} for u in "abcdef"
            for i, t in enumerate([*(f"{u} message {j}" for j in range(4)), "Thanks!", "See attached."])]
    for seed in range(20):
        parts = holdout_per_user(split_rows(shuffled(rows, seed, "users"), {"in": 0.5, "out": 0.5}, by="user"),
                                 3, seed=seed)
        held = {r["text"] for name in ("in_holdout", "out_holdout") for r in parts[name]}
        assert len(held) == 18 and not held & {r["text"] for name in ("in", "out") for r in parts[name]}
    with pytest.raises(InputError, match="has 6 rows, 4 of them no other user's; holding out 5 per user needs "
                                         "5 texts no other user has"):
        holdout_per_user({"p": rows}, 5, seed=0)


def test_a_user_with_too_few_rows_is_refused():
    rows = [{"id": str(i), "user": "ann.lee@x.com" if i < 9 else "bob.smith@x.com", "text": str(i)} for i in range(12)]
    with pytest.raises(InputError) as exc:
        holdout_per_user({"in": rows}, 3, seed=0, dataset="users")
    assert exc.value.field == "datasets.users.holdout_per_user"
    assert "split 'in' has 3 rows" in exc.value.message and "at least 4" in exc.value.message
    assert "bob.smith@x.com" not in exc.value.message  # the address is masked like every printed artifact


# ----------------------------------------------------------------------------------------- references
STUDY = """\
name: ui
models:
  base: tiny-gpt-neox
datasets:
  users:
    builtin: enron-users
    split: {{in: 0.5, out: 0.5}}
    split_by: user
{holdout}finetune:
  ft:
    model: base
    data: users.in
evaluate:
  ui:
    kind: user-inference
    targets: [ft]
    reference: base
    members: users.in_holdout
    nonmembers: users.out_holdout
"""


def test_holdout_references_plan_when_the_option_is_set():
    from leakaudit.experiment import Plan, check_plan

    plan = Plan(parse_experiment(STUDY.format(holdout="    holdout_per_user: 8\n")))
    check_plan(plan)
    assert plan.data_stage("users.in_holdout") == ("data/users", "in_holdout.jsonl")
    assert plan.stages["data/users"].params["holdout_per_user"] == 8  # part of the data stage's key


@pytest.mark.parametrize("extra, line, field, message", [
    ("", 18, "evaluate.ui.members", "unknown data 'users.in_holdout'"),
    ("    split_by: row\n    holdout_per_user: 8\n", 5, "datasets.users",
     "holdout_per_user needs a 'split' with 'split_by: user'"),
    ("    holdout_per_user: 0\n", 9, "datasets.users.holdout_per_user", "greater than or equal to 1"),
])
def test_holdout_references_are_refused_without_the_option(extra, line, field, message, tmp_path, monkeypatch,
                                                              capsys):
    from leakaudit.cli import main

    text = STUDY.format(holdout=extra)
    if "split_by: row" in extra:
        text = text.replace("    split_by: user\n", "", 1)
    exp = tmp_path / "ui.yaml"
    exp.write_text(text)
    monkeypatch.setattr(sys, "argv", ["leakaudit", "run", str(exp), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {exp}:{line}: field '{field}': ") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ui.yaml"]


def test_the_dataset_stage_writes_the_held_out_parts(tmp_path):
    """End to end through the engine: `users.in` (training) and `users.in_holdout` (the attacker's samples) hold
    the same users and no shared text; every in-user keeps training rows."""
    import json

    from leakaudit.experiment import run_experiment

    exp = parse_experiment("name: u\nmodels: {base: tiny-gpt-neox}\ndatasets:\n  users:\n    builtin: enron-users\n"
                           "    split: {in: 0.5, out: 0.5}\n    split_by: user\n    holdout_per_user: 8\n")
    run_experiment(exp, tmp_path, report=False, log=lambda m: None)
    read = {p: [json.loads(x) for x in (tmp_path / "data/users" / f"{p}.jsonl").read_text().splitlines()]
            for p in ("in", "in_holdout", "out", "out_holdout")}
    users_in = {r["user"] for r in read["in"]}
    assert users_in == {r["user"] for r in read["in_holdout"]}
    assert not users_in & {r["user"] for r in read["out_holdout"]}
    assert not {r["text"] for r in read["in"]} & {r["text"] for r in read["in_holdout"]}
    assert set(Counter(r["user"] for r in read["in_holdout"]).values()) == {8}


def test_max_users_keeps_whole_users(tmp_path):
    """`max_users: N` keeps every row of N users (a user's samples are never cut, unlike `limit`)."""
    import json

    from leakaudit.experiment import run_experiment

    exp = parse_experiment("name: u\nmodels: {base: tiny-gpt-neox}\ndatasets:\n  users:\n    builtin: enron-users\n"
                           "    max_users: 10\n")
    run_experiment(exp, tmp_path, report=False, log=lambda m: None)
    rows = [json.loads(x) for x in (tmp_path / "data/users/all.jsonl").read_text().splitlines()]
    full = Counter(r["user"] for r in builtin_dataset("enron-users", seed=0, limit=None))
    kept = Counter(r["user"] for r in rows)
    assert len(kept) == 10 and all(kept[u] == full[u] for u in kept)


def test_min_texts_per_user_leaves_out_users_whose_truncated_texts_repeat(tmp_path):
    """After `max_chars`, a sender's messages can become identical; `min_texts_per_user` leaves such users out,
    so a hold-out of K distinct texts works for every user kept."""
    import json

    from leakaudit.experiment import run_experiment

    exp = parse_experiment("name: u\nmodels: {base: tiny-gpt-neox}\ndatasets:\n  users:\n    builtin: enron-users\n"
                           "    max_chars: 120\n    min_texts_per_user: 12\n")
    run_experiment(exp, tmp_path, report=False, log=lambda m: None)
    rows = [json.loads(x) for x in (tmp_path / "data/users/all.jsonl").read_text().splitlines()]
    distinct: dict[str, set[str]] = {}
    for r in rows:
        distinct.setdefault(r["user"], set()).add(r["text"])
    assert all(len(t) >= 12 for t in distinct.values())
    assert len(distinct) < len({r["user"] for r in builtin_dataset("enron-users", seed=0, limit=None)})


def test_fractions_summing_to_one_place_every_row_and_user():
    """Each part ends at its rounded cumulative fraction: 13 users at 0.5 / 0.5 are 6 + 7 (rounding each part
    on its own gave 6 + 6 and silently dropped a user); the shipped splits (80 and 500 rows at 0.4/0.2/0.4,
    40 users at 0.5/0.5) are as before."""
    users = [{"user": f"u{i}", "text": str(i)} for i in range(13)]
    parts = split_rows(users, {"in": 0.5, "out": 0.5}, by="user")
    assert sorted(len(p) for p in parts.values()) == [6, 7] and sum(map(len, parts.values())) == 13
    for n, sizes in ((80, [32, 16, 32]), (500, [200, 100, 200]), (7, [3, 1, 3])):
        rows = [{"text": str(i)} for i in range(n)]
        parts = split_rows(rows, {"targets": 0.4, "prompts": 0.2, "nonmembers": 0.4})
        assert [len(p) for p in parts.values()] == sizes
    assert [len(p) for p in split_rows(users, {"a": 0.3, "b": 0.3}).values()] == [4, 4]  # the rest left out
