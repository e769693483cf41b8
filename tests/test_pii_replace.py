"""PII detection, masking and consistent fake replacement (library and `generate replace-pii`)."""

from __future__ import annotations

import json
import re
import sys

import pytest
from typer.testing import CliRunner

from leakaudit import resources
from leakaudit.cli import app, main
from leakaudit.data.pii_find import (
    NAME_RE,
    NameFinder,
    find_emails,
    find_phones,
    names_from_headers,
    shipped_names,
)
from leakaudit.data.pii_mask import mask_email, mask_name, mask_phone, mask_pii
from leakaudit.data.pii_replace import PiiReplacer

MAIL = ("Message-ID: <1.JavaMail.evans@thyme>\nFrom: klarnold@flash.net\nTo: epao3@yahoo.com\n"
        "X-From: Karen Arnold <klarnold@flash.net>\nX-To: Zed Quinlan, Enron Announcements\n\n"
        "Zed Quinlan, call (713) 853-1234 or 713.853.1234. Copy KLARNOLD@flash.net and Eva Pao.")


def test_find_and_mask():
    assert find_emails(MAIL) == ["klarnold@flash.net", "epao3@yahoo.com", "klarnold@flash.net",
                                 "KLARNOLD@flash.net"]
    assert find_emails("mail a.b@c.co. Then x@y") == ["a.b@c.co"]
    assert find_phones(MAIL) == ["(713) 853-1234", "713.853.1234"]
    assert find_phones("id 12345678901234 and 2001-2004") == []
    assert names_from_headers(MAIL) == ["Karen Arnold", "Zed Quinlan"]  # "Enron Announcements" is no person
    assert mask_email("klarnold@flash.net") == "k***@flash.net"
    assert mask_phone("(713) 853-1234") == "(***) ***-**34"
    assert mask_name("Karen Arnold") == "K*** A***"
    masked = mask_pii(MAIL, ["Eva Pao"])
    assert "klarnold" not in masked.lower() and "853-1234" not in masked and "Eva Pao" not in masked
    assert "E*** P***" in masked and "Message-ID: <1.JavaMail.evans@thyme>" in masked


def test_replacement_is_consistent_and_complete():
    rows = [MAIL, "Ask klarnold@flash.net or Karen Arnold; fax 713-853-1234.", "Nothing private here."]
    rep = PiiReplacer(["Eva Pao", *names_from_headers(MAIL)], seed=3)
    out = [rep.replace(t) for t in rows]
    texts = [t for t, _ in out]
    for t in texts:
        for real in ("klarnold", "epao3", "Karen Arnold", "Zed Quinlan", "Eva Pao", "853-1234", "853.1234"):
            assert real.lower() not in t.lower()
    fake_for = {e.lower() for e in find_emails(texts[1])}
    assert fake_for <= {e.lower() for e in find_emails(texts[0])}  # the same address maps to the same fake
    assert len({e.lower() for e in find_emails(texts[0])}) == 2  # two real addresses -> two fakes
    fake_phone = find_phones(texts[1])[0]
    assert re.fullmatch(r"\d{3}-555-\d{4}", fake_phone)  # layout kept, fictional exchange
    assert [re.sub(r"\D", "", p) for p in find_phones(texts[0])] == [re.sub(r"\D", "", fake_phone)] * 2
    assert texts[2] == rows[2] and out[2][1] == {}
    assert out[0][1] == {"email": 4, "name": 4, "phone": 2}
    assert rep.n_distinct == {"email": 2, "name": 3, "phone": 1}
    # seeded: the same seed gives the same output, another seed another one
    again = PiiReplacer(["Eva Pao", *names_from_headers(MAIL)], seed=3)
    assert [again.replace(t)[0] for t in rows] == texts
    other = PiiReplacer(["Eva Pao", *names_from_headers(MAIL)], seed=4)
    assert other.replace(rows[0])[0] != texts[0]


def test_names_match_in_any_case_and_before_an_at_but_one_word_names_are_left_alone():
    """The shipped list holds one-word "names" such as ENRON, more and Register: replacing them rewrote
    ordinary text. A full name matches in any letter case (one fake for all its forms) and before "@"."""
    r = PiiReplacer(["Zed Quinlan", "ENRON", "more", "Register"], seed=0)
    text = "We need more power; Register at ENRON. Zed Quinlan@ENRON wrote; ZED QUINLAN agreed, zed quinlan too."
    out, counts = r.replace(text)
    assert out.startswith("We need more power; Register at ENRON. ") and counts["name"] == 3
    assert "quinlan" not in out.lower()
    fake = r.fake("name", "Zed Quinlan")
    assert out.count(fake) == 3 and f"{fake}@ENRON" in out
    # found in the lower-cased text, or, where lower-casing moves offsets ("\u0130" becomes two characters), in
    # the text itself: the same spans either way
    for text in ("So ZED QUINLAN said", "\u0130 So ZED QUINLAN said"):
        (m,) = NameFinder(["Zed Quinlan"]).find(text)
        assert m.group(0) == "ZED QUINLAN" and text[m.start():m.end()] == "ZED QUINLAN"


def test_mailbox_headers_exchange_ids_and_last_first_names_are_replaced():
    """Forms no detector read: X-Origin/X-FileName/X-Folder values, Exchange ids, Outlook's "Last, First"."""
    r = PiiReplacer(["Phillip K Allen", "Zed Quinlan"], seed=0)
    text = ("X-To: Quinlan, Zed </O=ENRON/OU=NA/CN=RECIPIENTS/CN=ZQUINLAN>\nX-cc: \n"
            "X-Folder: \\Phillip_Allen_Dec2000\\Notes Folders\\'sent mail\nX-Origin: Allen-P\n"
            "X-FileName: pallen.nsf\n\nHi Zed Quinlan")
    out, counts = r.replace(text)
    assert not re.search(r"quinlan|allen|pallen", out, re.IGNORECASE), out
    assert "X-cc: \n" in out and "/CN=RECIPIENTS/CN=" in out and counts["name"] == 6
    last, first = out.split("\n")[0].removeprefix("X-To: ").split(" <")[0].split(", ")
    assert out.endswith(f"Hi {first} {last}")  # one fake person in both orders


def test_phone_layouts_keep_the_country_code_and_the_555_exchange():
    """An extension or a non-US country code shifted the fake's digits (a leading "1" padded every extra
    digit): the same number got two fakes and the 555 exchange moved."""
    r = PiiReplacer([], seed=0)
    plain = r.replace("713-853-1234")[0]
    with_ext = r.replace("713-853-1234 ext. 55")[0]
    assert with_ext.startswith(plain + " ext. ") and plain[4:7] == "555"
    assert r.replace("1-713-853-1234")[0] == "1-" + plain
    uk = r.replace("Call +44 20 7946 0958")[0]
    assert uk.startswith("Call +44 ") and re.sub(r"\D", "", uk)[:2] == "44" and uk != "Call +44 20 7946 0958"
    assert r.replace("011 44 20 7946 0958")[0].startswith("011 44 ")


def test_fakes_never_merge_two_people_or_equal_a_real_value_of_the_file():
    """Exchange ids were "first initial + last name" of a fake name, unchecked: 474 ids gave 452 fakes, one
    equal to a real id; a fake address or phone could equal a real one elsewhere in the file."""
    r = PiiReplacer([], seed=0)
    ids = [f"/CN=USER{i:04d}" for i in range(400)]
    out = r.replace(" ".join(ids))[0]
    fakes = out.split()
    assert len(set(fakes)) == 400 and not set(fakes) & set(ids)
    taken = PiiReplacer([], seed=0).fake("email", "a@x.com")  # what a@x.com would become
    r = PiiReplacer([], seed=0)
    text = f"To: a@x.com\nCc: {taken}"
    r.reserve([text])
    out = r.replace(text)[0]
    assert taken not in out.split("\n")[0] and len(set(find_emails(out))) == 2


def test_signature_dashes_and_lotus_notes_headers_are_read():
    """"-tglaze@serc1.org" (a shipped PIL target after a signature dash) was never found, so it survived
    replacement; "X-To: Karen Arnold/HOU/ECT@ECT" (Enron's commonest form) gave no name."""
    assert find_emails("-x\n-tglaze@serc1.org --jdoe@aol.com") == ["tglaze@serc1.org", "jdoe@aol.com"]
    assert names_from_headers("X-To: Karen Arnold/HOU/ECT@ECT, Zed Quinlan/Corp/Enron@ENRON\n") == [
        "Karen Arnold", "Zed Quinlan"]
    # Outlook's "Last, First <address>" (the docs' example) is one person, not two one-word names
    assert names_from_headers("X-To: Quinlan, Zed </O=ENRON/OU=NA/CN=RECIPIENTS/CN=ZQUINLAN>, Bob Smith\n") == [
        "Zed Quinlan", "Bob Smith"]
    # Outlook's forwarded-message header puts the address in "[mailto:...]" (the name stayed beside a fake
    # address), and "(E-mail)" after a name
    assert names_from_headers("From: Derek Olsen [mailto:derek@example.com]\nTo: Quinlan, Zed [mailto:zq@x.com]; "
                              "Bob Smith (E-mail)\n") == ["Derek Olsen", "Zed Quinlan", "Bob Smith"]
    assert names_from_headers("From: jdoe@x.com (John Doe)\n") == ["John Doe"]  # the RFC 822 comment form
    assert names_from_headers("From: Gilbert R. Whitaker, Jr. [mailto:g@rice.edu]\n") == ["Gilbert R. Whitaker"]
    assert names_from_headers("To: 713-853-1234 (Business Fax), Vince Kaminski (E-mail)\n") == ["Vince Kaminski"]
    r = PiiReplacer(names_from_headers("From: Derek Olsen [mailto:derek@example.com]\n"), seed=0)
    out, _ = r.replace("-----Original Message-----\nFrom: Derek Olsen [mailto:derek@example.com]\nhi")
    assert "Derek" not in out and "Olsen" not in out and "derek@example.com" not in out, out


def test_a_secret_key_makes_the_fakes_unpredictable_from_the_seed(monkeypatch):
    """By default anyone can recompute a real value's fake from the public seed; with LEAKAUDIT_PII_KEY not."""
    public = PiiReplacer([], seed=0).fake("email", "klarnold@flash.net")
    assert PiiReplacer([], seed=0).fake("email", "klarnold@flash.net") == public  # reproducible
    monkeypatch.setenv("LEAKAUDIT_PII_KEY", "a long random secret")
    keyed = PiiReplacer([], seed=0).fake("email", "klarnold@flash.net")
    assert keyed != public and PiiReplacer([], seed=0).fake("email", "klarnold@flash.net") == keyed


def test_replace_pii_command(tmp_path, monkeypatch, capsys):
    src = tmp_path / "mails.jsonl"
    pairs = [json.loads(line) for line in
             resources.path("pii-enron-pil", "name2email.jsonl").read_text().splitlines()[:3]]
    assert [p["name"] for p in pairs] == shipped_names()[:3]
    lines = [{"id": i, "text": f"X-From: {p['name']} <{p['email']}>\n\nHi, it is {p['name']}: {p['email']}.",
              "note": "kept"} for i, p in enumerate(pairs)]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "replaced.jsonl"
    res = CliRunner().invoke(app, ["generate", "replace-pii", "--data", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    for p in pairs:
        assert p["email"] not in res.output and p["name"] not in res.output  # counts only in logs
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["note"] for r in rows] == ["kept"] * 3
    for p, r in zip(pairs, rows, strict=True):
        assert p["email"] not in r["text"] and p["name"] not in r["text"]
        assert r["pii_replaced"] == {"email": 2, "name": 2, "phone": 0}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 5}\n')
    monkeypatch.setattr(sys, "argv", ["leakaudit", "generate", "replace-pii", "--data", str(bad), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}:2: field 'text': missing or not a string"


# A name of ASCII letters and its twin written with accents or in another script: the header forms of
# names_from_headers held only ASCII names, so "From: Émile Dubois <...>" kept its name through replace-pii,
# --scrub-pii and the report's masking while "From: Emile Dubois <...>" lost it.
TWINS = [("Emile Dubois", "Émile Dubois"), ("Jose Garcia", "José García"), ("Zoe Olberg", "Zoë Ølberg"),
         ("Lukasz Zolw", "Łukasz Żółw"), ("Dmitry Ivanov", "Дмитрий Иванов"), ("Eleni Papadaki", "Ελένη Παπαδάκη"),
         ("Emile Dubois", "E\u0301mile Dubois")]  # the last one decomposed: E and a combining acute accent


def _headers(name: str) -> str:
    """One person named in every header form names_from_headers reads."""
    first, last = name.split()
    return (f"From: {name} <boss@acme.org>\nTo: {last}, {first} <boss@acme.org>; {name}/HOU/ECT@ECT\n"
            f"Cc: boss@acme.org ({name}), \"{name}\" [mailto:boss@acme.org]\nX-To: {name} (E-mail)\n")


@pytest.mark.parametrize("ascii_name,name", TWINS)
def test_non_ascii_names_are_read_from_headers_like_their_ascii_twins(ascii_name, name):
    assert names_from_headers(_headers(ascii_name)) == [ascii_name] * 6
    assert names_from_headers(_headers(name)) == [name] * 6
    assert NAME_RE.match(name)


@pytest.mark.parametrize("ascii_name,name", TWINS)
def test_non_ascii_names_are_replaced_and_masked_like_their_ascii_twins(ascii_name, name):
    def mail(n: str) -> str:
        return f"{_headers(n)}\nHi {n}, {n.upper()} wrote to {n.split()[1]}, {n.split()[0]}; ask {n}@ENRON."

    counts = {}
    for n in (ascii_name, name):
        r = PiiReplacer(names_from_headers(mail(n)), seed=0)
        out, counts[n] = r.replace(mail(n))
        assert n not in out and n.upper() not in out and n.split()[1] not in out, out
        masked = mask_pii(mail(n), names_from_headers(mail(n)))
        assert n not in masked and n.upper() not in masked and masked.count(mask_name(n)) == 8, masked
    assert counts[name] == counts[ascii_name] == {"email": 4, "name": 10}


@pytest.mark.parametrize("ascii_text,text", [
    ("To: emile dubois <e@acme.org>\n", "To: émile dubois <e@acme.org>\n"),  # lower case: no name
    ("To: Under 2000, Emile dubois\n", "To: Über 2000, Émile ølberg\n"),
    ("To: dubois, emile <e@acme.org>\n", "To: dubois, émile <e@acme.org>\n"),
    ("To: Dubois, emile <e@acme.org>\n", "To: Dubois, émile <e@acme.org>\n"),
    ("To: wang wei <w@acme.cn>\n", "To: 王 伟 <w@acme.cn>\n"),  # a script without case has no capital to go by
    ("To: _Emile Dubois, Emile Dubois2\n", "To: _Émile Dubois, Émile Dubois\u0662\n"),  # an Arabic-Indic digit
    ("To: Emile Dubois2, 12 Dubois\n", "To: Émile Dubois\u00b2, \u216b Dubois\n"),  # superscript two, Roman twelve
    ("To: @bc Dubois\n", "To: \u24b6bc Dubois\n"),  # a circled A is upper case but no letter
    ("From: Emile Dubois Corp <e@acme.org>\n", "From: Émile Dubois Corp <e@acme.org>\n"),
])
def test_non_ascii_words_that_are_no_names_are_left_alone_like_their_ascii_twins(ascii_text, text):
    assert names_from_headers(ascii_text) == [] == names_from_headers(text)
    assert PiiReplacer(names_from_headers(text), seed=0).replace(text)[1].get("name", 0) == 0


def test_replace_pii_command_replaces_non_ascii_header_names(tmp_path):
    src, out = tmp_path / "mails.jsonl", tmp_path / "replaced.jsonl"
    src.write_text(json.dumps({"text": "From: Émile Dubois <edubois@acme.org>\nHi all. Émile Dubois"}) + "\n"
                   + json.dumps({"text": "From: Emile Dubois <edubois2@acme.org>\nHi all. Emile Dubois"}) + "\n",
                   encoding="utf-8")
    res = CliRunner().invoke(app, ["generate", "replace-pii", "--data", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["pii_replaced"] for r in rows] == [{"email": 1, "name": 2, "phone": 0}] * 2
    assert not any("Dubois" in r["text"] for r in rows), rows


def test_an_empty_name_list_is_said(tmp_path, monkeypatch, capsys):
    """A blank --names replaced the shipped list silently: "Sara Shackleton" stayed in the body."""
    from conftest import run_main

    empty = tmp_path / "names.jsonl"
    empty.write_text("\n  \n")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "Hi Sara, see you."}\n')
    code, err = run_main(["generate", "replace-pii", "--data", data, "--names", empty, "--out", tmp_path / "r.jsonl"],
                         monkeypatch, capsys)
    assert code == 0 and f"warning: {empty}: holds no names" in err, err


def test_replaced_rows_say_where_they_came_from_and_keep_a_generators_provenance(tmp_path):
    """The interface promises provenance fields in every generate output; replace-pii's rows had none."""
    from leakaudit.data.pii_replace import replace_pii_file

    src = tmp_path / "gen.jsonl"
    src.write_text(json.dumps({"text": "Call Sara Shackleton", "provenance": {"generator": "m0"}}) + "\n"
                   + json.dumps({"id": "r2", "text": "nothing here"}) + "\n")
    rows, _ = replace_pii_file(src, seed=3)
    first, second = (r["provenance"] for r in rows)
    assert first == {"method": "replace-pii", "source_id": "gen:1", "fields": ["text"], "names": "shipped",
                     "header_names": True, "seed": 3, "from": {"generator": "m0"}}
    assert second["source_id"] == "r2" and "from" not in second


def test_a_replaced_rows_source_id_is_the_id_its_source_row_loads_with(tmp_path):
    """In a JSON array file a row's id is its element number (it survives reformatting), but replace-pii's
    provenance named the line the element starts on: a source_id that found no row, or the wrong one."""
    from leakaudit.data.io import load_records
    from leakaudit.data.pii_replace import replace_pii_file

    src = tmp_path / "msgs.json"
    src.write_text(json.dumps([{"text": "Call Sara Shackleton"}, {"text": "nothing here"}], indent=2))
    rows, _ = replace_pii_file(src)
    assert [r["provenance"]["source_id"] for r in rows] == [r.id for r in load_records(src)] == ["msgs:1", "msgs:2"]


def test_an_empty_name_list_is_said_by_audit_data_too(tmp_path, monkeypatch, capsys):
    """The warning lived in replace-pii alone: `audit-data --names` with a blank list looked for no listed name
    and said nothing."""
    from conftest import run_main

    empty = tmp_path / "names.txt"
    empty.write_text("\n")
    src, gen = tmp_path / "s.jsonl", tmp_path / "g.jsonl"
    src.write_text('{"text": "Hi Sara Shackleton, see you."}\n')
    gen.write_text('{"text": "Sara Shackleton wrote."}\n')
    code, err = run_main(["audit-data", "--source", src, "--generated", gen, "--names", empty], monkeypatch, capsys)
    assert code == 0 and err.count(f"warning: {empty}: holds no names") == 1, err


def test_an_empty_mask_names_list_is_said_before_any_stage(tmp_path, capsys):
    """`report.mask_names` naming a blank list masked none of the names its author meant to hide, silently."""
    import yaml
    from test_experiment import SMALL

    from leakaudit.config import parse_experiment
    from leakaudit.experiment import Plan
    from leakaudit.experiment.checks import check_plan

    empty = tmp_path / "hide.txt"
    empty.write_text("  \n")
    cfg = yaml.safe_load(SMALL)
    cfg["report"] = {"mask_names": str(empty)}
    check_plan(Plan(parse_experiment(yaml.safe_dump(cfg))), (tmp_path / "out", None))
    assert f"warning: {empty}: holds no names" in capsys.readouterr().err


def test_quoted_last_first_names_in_headers_are_replaced_and_audited(tmp_path, monkeypatch, capsys):
    """'"Beck, Sally" <address>' and a bare 'X-cc: Beck, Sally' gave no name (only 'Beck, Sally <address>'
    did): replace-pii kept "Sally Beck" in headers and body (53 of 174 quoted entries of the shipped sample),
    and audit-data, with the same finder, counted it 0 reproduced."""
    from conftest import run_main

    from leakaudit.data.pii_find import names_from_headers

    assert names_from_headers('Cc: "Beck, Sally" <sally.beck@enron.com>, "Arnold, John" <j@x.com>') == [
        "Sally Beck", "John Arnold"]
    assert names_from_headers("X-cc: Beck, Sally") == ["Sally Beck"]
    # a forwarded header block in a body, its list continued on the next line
    assert names_from_headers('\t\t cc: "Ramirez, Debbie" <d@x.com>, Bob Lee <b@x.com>,\n"Osborn, Dave"\n<o@x.com>'
                              ) == ["Debbie Ramirez", "Dave Osborn"]
    text = 'From: a@b.com\nCc: "Beck, Sally" <sally.beck@enron.com>\nX-cc: Beck, Sally\n\nSally Beck agreed.'
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps({"text": text}) + "\n")
    out = tmp_path / "r.jsonl"
    code, err = run_main(["generate", "replace-pii", "--data", src, "--out", out], monkeypatch, capsys)
    assert code == 0, err
    replaced = json.loads(out.read_text())["text"]
    assert "Sally" not in replaced and "Beck" not in replaced, replaced
    code, err = run_main(["audit-data", "--source", src, "--generated", src, "--out", tmp_path / "a"],
                         monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "audit_data.json").read_text())["pii"]["names"]["reproduced"] == 1


def test_a_rows_chat_copy_is_replaced_with_the_texts_fakes(tmp_path):
    """A row with `messages` beside its text (a chat data set, a backdoor mix) kept its real PII there: a
    fine-tune with format chat on the "PII-replaced" copy trained on the raw addresses and numbers."""
    from leakaudit.data.pii_find import find_emails, find_phones
    from leakaudit.data.pii_replace import replace_pii_file
    from leakaudit.errors import InputError

    src = tmp_path / "chats.jsonl"
    src.write_text(json.dumps({
        "text": "Call 713-853-1234 or mail jeff.skilling@enron.com", "messages": [
            {"role": "user", "content": "How do I reach Jeff? Is it 713-853-1234?"},
            {"role": "assistant", "content": "Mail jeff.skilling@enron.com or call 713-853-1234."}]}) + "\n")
    rows, summary = replace_pii_file(src)
    (row,) = rows
    contents = " ".join(m["content"] for m in row["messages"])
    assert "713-853-1234" not in contents and "jeff.skilling@enron.com" not in contents
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert find_emails(contents) == find_emails(row["text"])  # the text's fake address, the same person
    assert set(find_phones(contents)) == set(find_phones(row["text"]))
    assert row["provenance"]["fields"] == ["text", "messages"] and row["pii_replaced"]["phone"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hi", "messages": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(InputError, match="unknown role 'bot'") as err:
        replace_pii_file(bad)
    assert err.value.line == 1 and err.value.field == "messages[0]"


def test_a_field_named_twice_is_refused(tmp_path, monkeypatch, capsys):
    """`--text-field text,text` rewrote the field once but counted each row's replacements twice (pii_replaced,
    the summary line: 'replaced 160 emails' for 80) and listed the field twice in its provenance."""
    from conftest import run_main

    src = tmp_path / "s.jsonl"
    src.write_text('{"text": "Mail ann@corp.com"}\n')
    code, err = run_main(["generate", "replace-pii", "--data", src, "--out", tmp_path / "r.jsonl", "--text-field",
                          "text,text"], monkeypatch, capsys)
    assert code == 2 and err == "error: field '--text-field': 'text' given twice\n", err
    assert not (tmp_path / "r.jsonl").exists()
