"""The PII finder (leakaudit.data.pii_find) and masker (leakaudit.data.pii_mask): what they detect, what they
leave alone, how they mask, and that every artifact of an experiment run (run.json, summary.json, report.html)
goes through them."""

from __future__ import annotations

import json

import pytest

from leakaudit.data.pii_find import find_emails, find_phones, find_pii, is_phone, phone_digits
from leakaudit.data.pii_mask import mask_obj, mask_pii

PHONE = "7138536164"
ADDRESS = "jeff.skilling@enron.com"


@pytest.mark.parametrize("written", [
    "7138536164", "(713) 853-6164", "713.853.6164", "+1 713 853 6164", "713-853-6164", "1-713-853-6164",
    "713/853-6164", "(713)853-6164", "713 853 6164",
])
def test_each_phone_spelling_is_found_and_means_the_same_number(written):
    assert find_phones(f"Call me at {written}, thanks.") == [written]
    assert phone_digits(written) == PHONE
    assert is_phone(written)


def test_phone_with_extension_and_foreign_number_are_found():
    assert find_phones("desk (713) 629-1381 Ext 206 or London +44 20 7946 0958") == [
        "(713) 629-1381 Ext 206", "+44 20 7946 0958"]
    assert phone_digits("(713) 629-1381 Ext 206") == "7136291381"  # the extension is not part of the number
    assert phone_digits("+44 20 7946 0958") == "442079460958"


@pytest.mark.parametrize("text", [
    "In 2001 the company filed.", "user id 2001", "a deal worth $1,000,000", "signed 10/23/2001",
    "on 2001-10-23 at 10:30", "1999-2001", "amount 1,234,567.89", "zip 77002", "call 853-6164",
    "ticket 1234567890", "Message-ID: <12345678.1075855378110.JavaMail.evans@thyme>", "version 2.4.1+cu121",
    "seed a3f7138536164be (a hash)", "ip 192.168.100.101", "ssn-like 123-45-6789",
    "AUC 0.7138536164", "out/run-2025061514/model", "nightly_2025061514", "build2025061514",
])
def test_ordinary_numbers_are_not_phones(text):
    assert find_phones(text) == []
    assert mask_pii(text) == text


@pytest.mark.parametrize("text,expected", [
    ("write to jeff@enron.com today", "jeff@enron.com"),
    ("cc Name.Surname@ECT.ENRON.COM.", "Name.Surname@ECT.ENRON.COM"),
    ("<a href='mailto:kenneth.lay@enron.com'>Ken</a>", "kenneth.lay@enron.com"),
    ("mailto:john_doe+deals@mail.enron.com?subject=hi", "john_doe+deals@mail.enron.com"),
    ("From: \"Lay, Kenneth\" <kenneth.lay@enron.com>", "kenneth.lay@enron.com"),
    ("klarnold@flash.net-----Original Message-----", "klarnold@flash.net"),  # dashes or _ may follow
    ("see jeff@enron.com_ and", "jeff@enron.com"),
])
def test_email_forms_are_found(text, expected):
    assert find_emails(text) == [expected]
    masked = mask_pii(text)
    assert expected not in masked and expected.split("@")[1] in masked  # the domain stays readable


def test_mask_text_hides_the_local_part_and_the_phone_digits_in_the_existing_format():
    text = f"Mail {ADDRESS} or Name.Surname@ECT.ENRON.COM, call {PHONE} or (713) 853-6164 in 2001."
    masked = mask_pii(text)
    assert masked == ("Mail j***@enron.com or N***@ECT.ENRON.COM, call ********64 or "
                      "(***) ***-**64 in 2001.")
    assert mask_pii(masked) == masked  # masking twice changes nothing: a last pass over a page is safe
    assert [s.kind for s in find_pii(text)] == ["email", "email", "phone", "phone"]


def test_mask_obj_masks_every_string_and_key_recursively():
    obj = {"name": f"study of {ADDRESS}", "n": 7138536164, "ok": True, "none": None,
           f"stage/{ADDRESS}": [PHONE, {"deep": (f"tel {PHONE}", 2001)}],
           "folder": f"data/{PHONE}", "x": 0.5}
    masked = mask_obj(obj, keep={"folder"})
    text = json.dumps(masked)
    assert ADDRESS not in text and text.count(PHONE) == 2  # only the int (not a string) and the kept folder
    assert masked["n"] == 7138536164 and masked["ok"] is True and masked["none"] is None and masked["x"] == 0.5
    assert masked["stage/j***@enron.com"] == ["********64", {"deep": ["tel ********64", 2001]}]
    assert masked["folder"] == f"data/{PHONE}"
    assert obj["name"] == f"study of {ADDRESS}"  # the input is not changed
    # two keys that mask alike stay two entries
    assert len(mask_obj({"a1@x.com": 1, "a2@x.com": 2})) == 2


def test_fake_phones_are_valid_numbers_the_detector_finds():
    from leakaudit.data.pii_replace import PiiReplacer

    rep = PiiReplacer(seed=0)
    fakes = [rep.fake("phone", f"713-853-{i:04d}") for i in range(40)]
    assert all(is_phone(f) and f[4:7] == "555" for f in fakes)
    assert len(set(fakes)) == 40


# ----------------------------------------------------------------------------------------- artifacts
EXPERIMENT = f"""\
# owner: Name.Surname@ECT.ENRON.COM, {PHONE}
name: "leak {ADDRESS} {PHONE}"
models:
  base: tiny-gpt-neox
datasets:
  emails:
    builtin: enron-synthetic
    limit: 4
    max_chars: 100
report:
  title: "call {PHONE} or mailto:{ADDRESS}"
"""
RAW = (ADDRESS, PHONE, "Name.Surname@ECT.ENRON.COM")


def _run(text, out):
    from leakaudit.config import parse_experiment
    from leakaudit.experiment import run_experiment

    run_experiment(parse_experiment(text), out, config_text=text, log=lambda m: None)
    return {f: (out / f).read_text(encoding="utf-8") for f in ("run.json", "summary.json", "report.html")}


def test_run_artifacts_carry_no_raw_address_or_phone(tmp_path):
    files = _run(EXPERIMENT, tmp_path / "out")
    for name, text in files.items():
        for raw in RAW:
            assert raw not in text, (name, raw)
    run = json.loads(files["run.json"])
    assert run["experiment"]["name"] == "leak j***@enron.com ********64"
    assert "N***@ECT.ENRON.COM, ********64" in run["config_text"]
    assert json.loads(files["summary.json"])["stages"]["data/emails"]["rows"] == {"all": 4}  # numbers intact
    assert [s["folder"] for s in run["stages"]] == ["data/emails"]


def test_show_pii_keeps_the_raw_values(tmp_path):
    files = _run(EXPERIMENT + "  show_pii: true\n", tmp_path / "out")
    assert json.loads(files["run.json"])["experiment"]["name"] == f"leak {ADDRESS} {PHONE}"
    assert json.loads(files["summary.json"])["experiment"] == f"leak {ADDRESS} {PHONE}"


def test_a_name_list_of_your_own_is_masked_too(tmp_path, monkeypatch, capsys):
    """Names were masked only when on the shipped Enron list: a study of your own people showed theirs in the
    title, the configuration and run.json. `report.mask_names` adds a list (read before any stage)."""
    from conftest import run_main

    (tmp_path / "people.txt").write_text("Olga Novak\nBram de Vries\n")
    text = EXPERIMENT.replace(f'title: "call {PHONE} or mailto:{ADDRESS}"',
                              'title: "Audit for Olga Novak"  # and Bram de Vries\n  mask_names: people.txt')
    exp = tmp_path / "exp.yaml"
    exp.write_text(text)
    code, err = run_main(["run", str(exp), "--out", str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 0, err
    for f in ("run.json", "summary.json", "report.html"):
        page = (tmp_path / "out" / f).read_text(encoding="utf-8")
        assert "Olga Novak" not in page and "Bram de Vries" not in page and "Novak" not in page, f
    assert "Audit for O*** N***" in (tmp_path / "out/report.html").read_text()
    code, err = run_main(["report", str(tmp_path / "out")], monkeypatch, capsys)  # rewritten: still masked
    assert code == 0 and "Olga Novak" not in (tmp_path / "out/report.html").read_text()
    # the report masks them itself too: a run record written unmasked (by hand, or before the list was added)
    from leakaudit.report.html import write_report

    hand = tmp_path / "hand"
    hand.mkdir()
    (hand / "run.json").write_text(json.dumps({
        "experiment": {"name": "x", "report": {"title": "t", "mask_names": str(tmp_path / "people.txt")}},
        "config_text": "name: x", "versions": {}, "stages": [
            {"id": "data/d", "kind": "dataset", "folder": "data/d", "key": "k", "params": {},
             "status": "done", "seconds": 1.0, "result": {"note": "by Olga Novak"}}]}), encoding="utf-8")
    write_report(hand)
    for f in ("summary.json", "report.html"):
        assert "Olga Novak" not in (hand / f).read_text(encoding="utf-8"), f
    # errors and progress lines of this process mask them too (the list was read when the plan was checked)
    from leakaudit.data.pii_mask import mask_message

    assert mask_message("error: model 'Olga Novak' not found") == "error: model 'O*** N***' not found"
    # a list under ~, and under a folder whose name reads as a phone number (run.json keeps its path as is)
    home = tmp_path / "home" / "2024061512"
    home.mkdir(parents=True)
    (home / "people.txt").write_text("Olga Novak\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    exp.write_text(text.replace("mask_names: people.txt", "mask_names: ~/2024061512/people.txt"))
    code, err = run_main(["run", str(exp), "--out", str(tmp_path / "tilde")], monkeypatch, capsys)
    assert code == 0, err
    assert "Olga Novak" not in (tmp_path / "tilde/report.html").read_text()
    # a list that is not there fails before any stage, naming the key's line
    exp.write_text(text.replace("mask_names: people.txt", "mask_names: nobody.txt"))
    code, err = run_main(["run", str(exp), "--out", str(tmp_path / "out2")], monkeypatch, capsys)
    assert code == 2 and err.startswith(f"error: {exp}:") and "field 'report.mask_names': name list not found" \
        in err and not (tmp_path / "out2" / "data").exists(), err


def test_report_masks_a_summary_built_from_an_unmasked_run_record(tmp_path):
    """A run.json written before masking existed (or edited by hand) still gives a masked summary and page."""
    from leakaudit.report.html import write_report

    (tmp_path / "run.json").write_text(json.dumps({
        "experiment": {"name": f"x {ADDRESS}", "report": {"title": f"t {PHONE}"}},
        "config_text": f"name: x {ADDRESS}", "versions": {}, "stages": [
            {"id": f"data/{PHONE}", "kind": "dataset", "folder": "data/d", "key": "k", "params": {},
             "status": "done", "seconds": 1.0, "result": {"note": f"by {ADDRESS}"}}]}), encoding="utf-8")
    write_report(tmp_path)
    for f in ("summary.json", "report.html"):
        text = (tmp_path / f).read_text(encoding="utf-8")
        assert ADDRESS not in text and PHONE not in text, f
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"] == {"data/********64": {"note": "by j***@enron.com"}}
    assert summary["pii"] == "masked"  # the file says what it holds


def test_addresses_whose_local_part_starts_with_a_dot_or_underscore_are_masked():
    """Enron's headers hold "legal <.taylor@enron.com>"; the address pattern required a letter or digit first."""
    from leakaudit.data.pii_mask import mask_pii

    assert mask_pii("legal <.taylor@enron.com>") == "legal <.***@enron.com>"
    assert mask_pii("user '_john.smith@example.com' appears") == "user '_***@example.com' appears"


def test_internationalised_addresses_and_typographic_phone_punctuation_are_masked():
    """Addresses with accented letters were never found (so shown and kept unreplaced), nor an ASCII address
    glued to CJK text, nor phones written with typographic dashes or thin spaces."""
    from leakaudit.data.pii_find import find_emails, find_phones, phone_digits

    assert mask_pii("mail jörg.müller@énron.com now") == "mail j***@énron.com now"
    assert mask_pii("Пётр <пётр@почта.рф>") == "Пётр <п***@почта.рф>"
    assert find_emails("請寄到jeff@enron.com請") == ["jeff@enron.com"]  # CJK around it is not part of it
    assert find_emails("x 2×3@x.com") == ["3@x.com"]  # a sign is no letter
    assert mask_pii("Άlex@x.com, nguyễn.văn@việt.vn") == "Ά***@x.com, n***@việt.vn"  # not "Ά" + "l***@x.com"
    from leakaudit.data.enron import cut_context  # the context is cut where the finder sees the address

    assert cut_context("h\n\n請寄到jeff@enron.com請", "jeff@enron.com") == "請寄到"
    assert cut_context("h\n\nsee ajohn@enron.com.au, or john@enron.com.", "john@enron.com") == "see ajohn@enron.com.au, or "
    for dash in ("\u2013", "\u2014", "\u2011", "\u2212", "\u2009", "\u202f"):
        phone = f"713{dash}853{dash}1234"
        assert find_phones(f"call {phone} today") == [phone], repr(dash)
        assert mask_pii(phone) == f"***{dash}***{dash}**34" and phone_digits(phone) == "7138531234"


def test_an_address_glued_to_the_next_one_leaves_no_address_unmasked():
    """"a@x.comjohn.doe@enron.com" was found as the address "a@x.comjohn.doe", and its mask showed
    "john.doe@enron.com" whole; masking the masked text again changed it."""
    from leakaudit.data.pii_find import find_pii
    from leakaudit.data.pii_mask import mask_message

    for mask in (mask_pii, mask_message):
        masked = mask("sent to a@x.comjohn.doe@enron.com today")
        assert masked == "sent to a***@x***@enron.com today"
        assert find_pii(masked) == [] and mask(masked) == masked


def test_an_experiment_files_numbers_are_not_masked_its_strings_and_comments_are():
    from leakaudit.data.pii_mask import mask_yaml_text

    text = ("name: x  # call 713-853-1234\nseed: 2024061501\nreport: {title: \"j.doe@enron.com 713-853-1234\"}\n"
            "grid: [7138531234, 1.0e-4]\nphone: 713-853-1234\n")
    assert mask_yaml_text(text) == ("name: x  # call ***-***-**34\nseed: 2024061501\n"
                                    "report: {title: \"j***@enron.com ***-***-**34\"}\n"
                                    "grid: [7138531234, 1.0e-4]\nphone: ***-***-**34\n")
    assert mask_yaml_text("a: [713-853-1234") == "a: [***-***-**34"  # not YAML: masked whole


def test_a_phone_written_with_separators_after_a_word_is_still_a_phone():
    """Digits joined to a word are an id (run-2025061514) only when they are a bare run: a phone number written
    with its separators after "Tel-" is a phone number."""
    assert mask_pii("Tel-713-853-6164") == "Tel-***-***-**64"
    assert mask_pii("call 7138536164") == "call ********64"
    # a phone label joined by a hyphen, and a comma-separated list, are phones (a first rule read both as ids)
    assert mask_pii("cell-7138536164 or Phone-7138536165") == "cell-********64 or Phone-********65"
    assert mask_pii("office 713-853-6164,713-853-6165") == "office ***-***-**64,***-***-**65"
    assert mask_pii("tel: 7138536164,7138536165") == "tel: ********64,********65"


def test_warnings_and_machine_errors_are_masked(tmp_path, capsys):
    """Warnings name specs, ids and files (a model dir named after a person), as errors do."""
    from leakaudit import warn

    warn._WARNED.discard("x")
    warn.warn_once("2 prompt(s) do not fit the context of models/Karen Arnold klarnold@flash.net (256 tokens)")
    err = capsys.readouterr().err
    assert "klarnold" not in err and "Karen Arnold" not in err and "models/K*** A*** k***@flash.net" in err


def test_the_lines_saying_what_a_command_wrote_are_masked(tmp_path, monkeypatch, capsys):
    """Warnings were masked, the lines naming the files written were not: an --out named after a person
    (`out/jane.doe@enron.com/`) was printed whole by score, pii, generate and run."""
    from conftest import run_main

    texts = tmp_path / "t.jsonl"
    texts.write_text(json.dumps({"text": "one two three four five"}) + "\n")
    where = tmp_path / "jane.doe@enron.com"
    where.mkdir()
    code, out, err = run_main(["score", "--model", "tiny-gpt-neox", "--data", texts, "--out", where / "s.jsonl",
                               "--no-cache"], monkeypatch, capsys, stdout=True)
    assert code == 0, err
    assert "-> " in err and "jane.doe@enron.com" not in err + out, err
    # the dtype as model-info and run.json name it (it said torch.float32): the one the run resolves
    # (LEAKAUDIT_DTYPE; bfloat16 where the suite forces bf16), not either of two
    import torch

    from leakaudit.models.dtype import resolve_dtype

    assert f"({str(resolve_dtype(None, torch.device('cpu'))).removeprefix('torch.')}, cpu)" in err, err
    code, out, err = run_main(["generate", "replace-pii", "--data", texts, "--out", where / "r.jsonl"], monkeypatch,
                              capsys, stdout=True)
    assert code == 0 and "wrote 1 rows to " in err and "jane.doe@enron.com" not in err + out, err


def test_a_kind_shows_a_model_spec_masked_unless_show_pii(tmp_path):
    from leakaudit.kinds.base import KindContext

    spec = "models/Karen Arnold klarnold@flash.net"
    assert KindContext(out=tmp_path).shown(spec) == "models/K*** A*** k***@flash.net"
    assert KindContext(out=tmp_path, show_pii=True).shown(spec) == spec
    # masked as a message is: a path's digits are not a phone number (runs/********14/ named no real folder)
    assert KindContext(out=tmp_path).shown("out/runs/2025061514/model") == "out/runs/2025061514/model"


@pytest.mark.parametrize("text,phone", [
    ("Facsimile (281) 518-7501sarah.mcconnell@compaq.com", "(281) 518-7501"),  # shipped Enron messages' lines
    ("please call Mark at (713) 345-8897or Bob", "(713) 345-8897"),
    ("> 713-223-5049fax", "713-223-5049"),
    ("713.661.0245tfiandt@houston.rr.com", "713.661.0245"),
    ("desk 713-853-1234ext5", "713-853-1234ext5"),  # an extension glued on stays the number's
    ("713-853-1234extra copies", "713-853-1234"),  # a word that only begins like one does not
])
def test_a_phone_with_a_word_glued_to_its_last_digit_is_found_and_masked(text, phone):
    """A line break lost in a mail's re-wrapping glues the next word to the number: the matcher rejected any
    number a letter touches, so these real numbers stayed in reports and in replace-pii's "fake" copies."""
    assert find_phones(text) == [phone]
    assert phone not in mask_pii(text)


@pytest.mark.parametrize("text", ["id 7138536164abc", "build 2025061514rc1", "seed a3f7138536164be"])
def test_a_bare_digit_run_glued_to_a_word_stays_an_id(text):
    assert find_phones(text) == []


@pytest.mark.parametrize("text, masked", [
    ("call 713-053-1234 now", "call ***-***-**34 now"),  # an exchange starting with 0: not a valid number
    ("call (713) 012-3456.", "call (***) ***-**56."),
    ("555-123-4567", "***-***-**67"),  # area code 555
    ("+1 555 012 3456 or 713-053-1234 x12", "+* *** *** **56 or ***-***-**** x12"),
    ("Tel.713-053-1234", "Tel.***-***-**34"),  # a label's dot before it (a number's dot is another thing)
    ("at713-053-1234", "at***-***-**34"),  # a word glued before it (a line break lost)
    ("Energy713/647-8690FAX", "Energy***/***-**90FAX"),  # and after it, with a slash: a shipped Enron signature
    ("713 - 053 - 1234", "*** - *** - **34"),  # spaced dashes
    ("call 713/053-1234.", "call ***/***-**34."),
])
def test_a_number_laid_out_as_a_phone_is_masked_even_where_it_is_not_a_valid_one(text, masked):
    """A report masked only what libphonenumber calls a valid number, so a number a model recalled with one
    digit wrong, or any invalid one, was shown whole; masking also takes the 3-3-4 layout. Finding PII
    (extraction, replace-pii) keeps to valid numbers."""
    from leakaudit.data.pii_find import find_phones

    assert mask_pii(text) == masked
    assert find_phones(text) == []  # none of them is a valid number


@pytest.mark.parametrize("text", ["date 2001-10-12", "id 1234567890", "v1.713.053.1234", "12-713-053-1234",
                                  "10.713.053.1234", "isbn 978-0-13-110362-7", "713-053-12345", "ratio 0.713 053 1234",
                                  "build1-713-053-1234", "boundary part2_1e.e608831.2761c976_b"])
def test_digits_in_other_layouts_are_not_masked_as_phones(text):
    assert mask_pii(text) == text
