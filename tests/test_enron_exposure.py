"""The shipped exposure corpus P (study 1): it loads, every pair it lists is in its message, it is big enough,
and its pairs serve the PII kinds as targets (from a file, and from an experiment's split of the data)."""

from __future__ import annotations

import json

import pytest
from conftest import run_main

from leakaudit.data.builtin import builtin_dataset


@pytest.fixture(scope="module")
def rows():
    return builtin_dataset("enron-exposure", seed=0, limit=None)


def test_shipped_file_loads_and_every_pair_is_in_its_text(rows):
    from leakaudit.data.enron import row_pairs
    from leakaudit.data.pii_find import find_emails

    assert len(rows) == 1200 and len({r["id"] for r in rows}) == 1200
    for r in rows:
        pairs = row_pairs(r["pairs"])
        assert pairs, r["id"]
        for name, email in pairs:
            assert name in r["text"] and email in r["text"], (r["id"], name)
            assert email.lower() in {e.lower() for e in find_emails(r["text"])}  # a whole address, not a piece
        assert len(r["text"]) < 4000
    distinct = {(p["name"], p["email"].lower()) for r in rows for p in r["pairs"]}
    assert len(distinct) >= 300
    assert {p["form"] for r in rows for p in r["pairs"]} >= {"header", "angle", "mailto"}
    sample = builtin_dataset("enron-sample", seed=0, limit=None)
    assert not {r["id"] for r in rows} & {r["id"] for r in sample}  # disjoint from the other shipped messages


def test_message_rows_are_a_pairs_file(tmp_path, rows):
    from leakaudit.data.enron import load_targets
    from leakaudit.errors import InputError

    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows[:50]))
    targets = load_targets(p)
    expected = list(dict.fromkeys(pp["email"].lower() for r in rows[:50] for pp in r["pairs"]))
    assert [t.email.lower() for t in targets] == expected
    assert targets[0].id == f"{rows[0]['id']}/0" and targets[0].name == rows[0]["pairs"][0]["name"]
    p.write_text(json.dumps({"id": "x", "text": "t", "pairs": [{"name": "A B", "email": "nope"}]}) + "\n")
    with pytest.raises(InputError) as exc:
        load_targets(p)
    assert exc.value.line == 1 and exc.value.field == "pairs"


def test_experiment_scores_the_pairs_of_its_data_split(tmp_path, monkeypatch, capsys):
    """`builtin: enron-exposure` split into parts; pii-logprob on one part takes that part's own pairs."""
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: p\nseed: 0\nmodels:\n  base: tiny-gpt-neox\n"
                   "datasets:\n  P:\n    builtin: enron-exposure\n    limit: 12\n"
                   "    split: {targets: 0.5, rest: 0.5}\n"
                   "evaluate:\n  ev:\n    kind: pii-logprob\n    targets: [base]\n    data: P.targets\n"
                   "    options: {templates: D, n_targets: 4, n_candidates: 3}\n")
    code, err = run_main(["run", exp, "--out", tmp_path / "run"], monkeypatch, capsys)
    assert code == 0, err
    split = [json.loads(line) for f in (tmp_path / "run").rglob("targets.jsonl")
             for line in f.read_text().splitlines()]
    own = {f"{r['id']}/{k}" for r in split for k in range(len(r["pairs"]))}
    rows = [json.loads(line) for f in (tmp_path / "run").rglob("logprobs.jsonl")
            for line in f.read_text().splitlines()]
    assert len(rows) == 4 and all(r["target"] in own and r["template"] == "D" for r in rows)
    assert all("@" not in r["email"] or "*" in r["email"] for r in rows)  # masked by default
