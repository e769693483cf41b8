"""audit-data: planted PII and planted verbatim spans are found, clean text scores zero, counts match hand counts."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from leakaudit.audit_data import audit, word_ngrams
from leakaudit.cli import app

SOURCE = [
    "X-From: Karen Arnold <klarnold@flash.net>\nX-To: Zed Quinlan\n\nPlease call me at 713-853-1234 about the "
    "quarterly gas storage contract renewal before Friday morning so we can close it.",
    "From: epao3@yahoo.com\n\nThe meeting with Eva Pao moved to room 32C; bring the signed transmission agreement.",
]
CLEAN = "The weather was mild and the river was calm, so we walked along the bank until dusk."
PLANTED_PII = "You can reach her at KLARNOLD@flash.net or (713) 853-1234, says Zed Quinlan."
# 10 words copied from source 0 => 10 - 8 + 1 = 3 verbatim 8-grams; the text has 12 words => 5 8-grams
PLANTED_SPAN = "Sure: the quarterly gas storage contract renewal before Friday morning so okay"


def test_word_ngrams_by_hand():
    assert word_ngrams("a b c d", 3) == ["a b c", "b c d"]
    assert word_ngrams("a b", 3) == []


def test_finds_planted_pii_and_spans_and_nothing_in_clean_text():
    summary, records = audit(SOURCE, [("clean", CLEAN), ("pii", PLANTED_PII), ("span", PLANTED_SPAN)],
                             names=["Eva Pao", "Nobody Here"], n=8)
    clean, pii, span = records
    assert (clean.emails, clean.phones, clean.names, clean.ngrams) == ([], [], [], 0)
    assert clean.n_ngrams == len(CLEAN.split()) - 7
    assert pii.emails == ["klarnold@flash.net"]  # case-insensitive match, reported as in the source
    assert pii.phones == ["713-853-1234"]         # same digits, other spelling
    assert pii.names == ["Zed Quinlan"]           # a header name of the source
    assert pii.ngrams == 0
    assert (span.ngrams, span.n_ngrams) == (3, 5)
    assert span.ngram_fraction == pytest.approx(0.6)
    s = summary["pii"]
    # source holds 2 e-mails, 1 phone, 3 names (Karen Arnold, Zed Quinlan from headers; Eva Pao from the list)
    assert s["emails"] == {"in_source": 2, "reproduced": 1, "fraction": 0.5, "records_with_any": 1}
    assert s["phones"] == {"in_source": 1, "reproduced": 1, "fraction": 1.0, "records_with_any": 1}
    assert s["names"]["in_source"] == 3 and s["names"]["reproduced"] == 1
    assert summary["records_with_any_pii"] == 1
    total = clean.n_ngrams + pii.n_ngrams + span.n_ngrams
    assert summary["verbatim"]["ngrams_reproduced"] == 3 and summary["verbatim"]["ngrams_total"] == total
    assert summary["verbatim"]["records_with_any"] == 1


def test_zero_on_clean_data():
    summary, records = audit(SOURCE, [("a", CLEAN), ("b", "Another harmless sentence about apples.")])
    assert summary["records_with_any_pii"] == 0
    assert all(v["reproduced"] == 0 for v in summary["pii"].values())
    assert summary["verbatim"]["ngrams_reproduced"] == 0 and summary["verbatim"]["fraction"] == 0.0


def test_audit_data_command_masks_and_skips_prompts(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in SOURCE))
    gen = tmp_path / "gen.jsonl"  # continuation layout: the prompt is part of `text` but not of `generated`
    gen.write_text("".join(json.dumps({"id": i, "text": SOURCE[0][:60] + g, "generated": g}) + "\n"
                           for i, g in enumerate([CLEAN, PLANTED_PII])))
    out = tmp_path / "audit"
    res = CliRunner().invoke(app, ["audit-data", "--source", str(src), "--generated", str(gen), "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "audit_data.json").read_text())
    assert summary["generated_field"] == "generated"
    assert summary["pii"]["emails"]["reproduced"] == 1 and summary["pii"]["phones"]["reproduced"] == 1
    rows = [json.loads(line) for line in (out / "audit_records.jsonl").read_text().splitlines()]
    assert [r["n_emails"] for r in rows] == [0, 1]
    assert [r["id"] for r in rows] == ["0", "1"]  # the rows' own ids (auto), as generate writes them
    assert rows[0]["names"] == []  # the prompt's "Karen Arnold" is not counted against the generator
    assert rows[1]["emails"] == ["k***@flash.net"] and rows[1]["phones"] == ["***-***-**34"]
    text = (out / "audit_records.jsonl").read_text() + res.output
    assert "klarnold" not in text and "853-1234" not in text and "emails" in res.output
    # a CSV whose first row is short: the id column is still found (it was guessed from the first row alone)
    csv_gen = tmp_path / "gen.csv"
    csv_gen.write_text(f'text,id\n"{CLEAN}"\n"{PLANTED_PII}",g2\n')
    res2 = CliRunner().invoke(app, ["audit-data", "--source", str(src), "--generated", str(csv_gen)])
    assert "gen.csv:2: field 'id': missing" in res2.exception.format(), res2.exception
    # the n-grams on their own line, in the generated data's own count (the table's columns are distinct values)
    v = summary["verbatim"]
    assert (f"verbatim 8-grams: {v['ngrams_reproduced']} of the generated data's {v['ngrams_total']} occur in the "
            f"source") in " ".join(res.output.split())
    # a record's own id is often PII too: masked like the values
    gen.write_text("".join(json.dumps({"id": i, "text": SOURCE[0][:60] + g, "generated": g}) + "\n"
                           for i, g in [("klarnold@flash.net", CLEAN), ("713-853-1234", PLANTED_PII)]))
    res = CliRunner().invoke(app, ["audit-data", "--source", str(src), "--generated", str(gen), "--out",
                                   str(tmp_path / "audit2")])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "audit2" / "audit_records.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["k***@flash.net", "***-***-**34"]


def test_an_address_the_generator_completes_from_its_prompt_is_reproduced(tmp_path):
    """A continuation's prompt can end inside an address ("<msagel@") or a name: the generated part alone
    ("home.com>") held no source address, so the audit said 0 where the generator wrote one out. A value that
    reaches into the generated part counts; one wholly in the prompt does not."""
    src = tmp_path / "src.jsonl"
    src.write_text(json.dumps({"text": SOURCE[0]}) + "\n")
    cut = SOURCE[0].index("arnold@")  # the prompt ends inside the address: "... <kl"
    rows = [{"id": "completes", "prompt": SOURCE[0][:cut], "generated": "arnold@flash.net> wrote"},
            {"id": "in prompt only", "prompt": SOURCE[0][:cut + 20], "generated": " something else"},
            {"id": "other", "prompt": SOURCE[0][:cut], "generated": "x@flash.net"},
            {"id": "name", "prompt": "Call Zed", "generated": " Quinlan now"}]
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({**r, "text": r["prompt"] + r["generated"]}) + "\n" for r in rows))
    out = tmp_path / "audit"
    res = CliRunner().invoke(app, ["audit-data", "--source", str(src), "--generated", str(gen), "--out", str(out),
                                   "--show-pii"])
    assert res.exit_code == 0, res.output
    got = [json.loads(line) for line in (out / "audit_records.jsonl").read_text().splitlines()]
    assert [(r["emails"], r["names"]) for r in got] == [
        (["klarnold@flash.net"], []), ([], []), ([], []), ([], ["Zed Quinlan"])]
    assert json.loads((out / "audit_data.json").read_text())["pii"]["emails"]["reproduced"] == 1


def test_one_person_is_one_name_however_it_is_spelt():
    """Names match in any case and as "Last, First": each person counts once, in the source and reproduced
    (a differently spelt copy raised KeyError)."""
    from leakaudit.audit_data import audit

    summary, rows = audit(["Cy Doe wrote. Later CY DOE wrote again. Doe, Cy signed."],
                          [("g1", "Doe, Cy replied"), ("g2", "then cy doe replied"), ("g3", "nobody")],
                          names=["Cy Doe"])
    assert summary["pii"]["names"]["in_source"] == 1 and summary["pii"]["names"]["reproduced"] == 1
    assert [r.names for r in rows] == [["Cy Doe"], ["Cy Doe"], []]


def test_the_ngram_lookup_counts_what_isin_counts():
    """The per-record lookup is a binary search in the sorted source hashes (np.isin sorted the whole index
    again for every record): the same counts, at both ends of the index and with repeated n-grams."""
    import numpy as np

    from leakaudit.audit_data import _found_in

    rng = np.random.default_rng(0)
    source = np.unique(rng.integers(-2**62, 2**62, 5000))
    for grams in (rng.integers(-2**62, 2**62, 300), rng.choice(source, 300), np.r_[source[[0, -1, 0]], [2**63 - 1]],
                  np.r_[rng.choice(source, 50), rng.integers(-2**62, 2**62, 50)], np.zeros(0, dtype=np.int64)):
        assert _found_in(source, grams) == int(np.isin(grams, source).sum())
    assert _found_in(np.zeros(0, dtype=np.int64), source[:3]) == 0
