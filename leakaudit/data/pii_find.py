"""The one PII finder: e-mail addresses, phone numbers and personal names in a text.

Every part of leakaudit that detects PII (reports, summaries, run records, extraction outputs, the data
audit, the fake replacement, the training-data scrubber) finds it with this module, and every masker
(`leakaudit.data.pii_mask`) masks what it finds, so a value hidden in one artifact is hidden in all of them.

Why a regex for addresses, a library for phones and lists for names, not NER: the studies reproduced here
measure leakage of *known* PII (the Enron name/e-mail pairs, addresses in the source data). Addresses
have a simple shape; phone numbers do not (10 bare digits, "(713) 853-6164", "+1 713 853 6164",
extensions, foreign numbers), so they are found by Google's libphonenumber (`phonenumbers`), which
accepts only numbers valid for their region and so leaves years, ids, amounts and dates alone. Names
come from a given list (e.g. the shipped pii-enron-pil pairs) plus the people named in e-mail header
fields (From:/To:/Cc:/X-From:/X-To:/X-cc:), which is precise and needs no heavy model.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import phonenumbers

# local part: letters, digits and ._%+- (a first "." or "_" too: Enron's "legal <.taylor@enron.com>");
# domain: labels separated by dots, ending in a 2+ letter TLD.
# An address ends where no letter or digit follows its TLD: "-" and "_" may ("klarnold@flash.net-----Original").
# Dashes or pluses right before it are not part of it: a signature's "-tglaze@serc1.org", "--jdoe@aol.com".
# Letters include the accented Latin, Greek and Cyrillic ones of internationalised addresses
# ("jörg.müller@énron.com"); not those of scripts written without spaces (CJK, Thai): there the text
# around an address is no part of it ("請寄到jeff@enron.com").
_LETTER = ("A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff"  # Latin, Vietnamese's too
           "\u0386\u0388-\u03ce\u0400-\u04ff")  # Greek, Cyrillic
# An address's boundary: no letter or digit of these alphabets touches it (enron.cut_context uses them too).
ADDRESS_CHAR = rf"[{_LETTER}0-9]"
ADDRESS_BEFORE = rf"(?<![{_LETTER}0-9.%+_-])"
EMAIL_RE = re.compile(rf"{ADDRESS_BEFORE}[-+]*(?P<address>[{_LETTER}0-9._][{_LETTER}0-9._%+-]*@"
                      rf"(?:[{_LETTER}0-9-]+\.)+[{_LETTER}]{{2,}})(?!{ADDRESS_CHAR})")
# Phones: numbers libphonenumber finds and judges valid, read as US numbers unless written with a country
# code (+44 ..., 011 44 ...). Seven-digit local numbers are not valid without an area code, so they are
# left out (too many false hits: ranges, ids). The matcher never spans lines and is slow, so it only
# reads lines that hold at least 7 digits in a phone-like run.
PHONE_REGION = "US"
_PHONE_LENIENCY = phonenumbers.Leniency.VALID
_DIGIT_RUN = re.compile(r"\d(?:[^\S\n]{0,2}[().\-/]?[^\S\n]{0,2}\d){6,}")
# Typographic dashes and spaces ("713–853–1234", a thin or no-break space) read as the ASCII ones the
# matcher knows; one character for one, so every offset stays that of the original text.
_PHONE_PUNCTUATION = str.maketrans({**dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d", "-"),
                                    **dict.fromkeys("\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                                                    "\u2009\u200a\u202f\u205f\u3000", " ")})
_LINE = re.compile(r"[^\n]+")
# A word glued to a number's last digit ("(281) 518-7501sarah.mcconnell@...", "713-223-5049fax", "345-8897or": a
# line break lost in a mail's re-wrapping; 5 of the 16 phone-shaped numbers of the shipped Enron messages that went
# unfound, the others invalid numbers): the matcher rejects a number a letter touches, so the word's first letter
# reads as a space to it (one character for one). Not an extension ("x123", "ext. 4"), read as part of the number.
_GLUED_WORD = re.compile(r"(?<=\d)(?!ext(?:ension)?(?![^\W\d_]))[^\W\d_](?=[^\W\d_])", re.IGNORECASE)
# Header lines that name people; X-* headers carry display names ("Karen Arnold <klarnold@flash.net>").
HEADER_RE = re.compile(r"^(?:X-)?(?:From|To|Cc|Bcc|X-cc|X-bcc):[ \t]*(.*(?:\n[ \t]+.*)*)",
                       re.IGNORECASE | re.MULTILINE)
# A name's words: an upper- or title-case letter of any script ("Émile", "Ølberg", "Дмитрий", "Ελένη"), then
# letters (combining accents too: "E\u0301mile" as typed decomposed), apostrophes or hyphens, maybe an initial's
# dot. Python's re has no \p{Lu}, so the two letter classes are built from str.isalpha/isupper on first use
# (0.1 s, not paid by processes that never read a header): `NAME_WORD` and `NAME_RE` (a match is a name's shape,
# 2 to 4 words) are made then; for ASCII text they are the old [A-Z][a-zA-Z'-]*.?, word for word.
NOT_NAMES = {"Enron", "Corp", "Inc", "Team", "Group", "Mail", "Delivery", "Subsystem", "Announcements",
             "Administrator", "Center", "Committee", "Department", "Services", "Support", "Desk", "List",
             "Fax", "Office", "Legal"}  # header comments such as "713-853-1234 (Business Fax)"


@dataclass(frozen=True)
class PiiSpan:
    """One PII value found in a text: its kind ("email", "phone", "name") and where it is."""

    kind: str
    start: int
    end: int
    value: str


def find_emails(text: str) -> list[str]:
    """Every e-mail address in `text`, in order of appearance (duplicates kept)."""
    return [text[a:b] for a, b in email_spans(text)]


def email_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every e-mail address in `text` (a sentence's final dot is not part of it)."""
    return [(m.start("address"), m.start("address") + len(m.group("address").rstrip(".")))
            for m in EMAIL_RE.finditer(text)]


def phone_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every phone number in `text`, in order (see PHONE_REGION for how they are found)."""
    spans = []
    for line in _LINE.finditer(text):
        raw = line.group(0).translate(_PHONE_PUNCTUATION)
        if _DIGIT_RUN.search(raw):
            plain = _GLUED_WORD.sub(" ", raw)
            spans += [(line.start() + m.start, line.start() + m.end)
                      for m in phonenumbers.PhoneNumberMatcher(plain, PHONE_REGION, leniency=_PHONE_LENIENCY)
                      if not _continues(plain[:m.start], m.raw_string)
                      and not (m.raw_string.isdigit() and raw[m.end:m.end + 1].isalpha())]  # an id: 2025061514abc
    return spans


def _continues(before: str, digits: str) -> bool:
    """Whether digits read as a phone number continue a number or a name: the fraction of 0.7138536164 (a
    decimal point after a short whole part; a comma-separated list of phones is phones), or a bare digit run
    joined to a word that is not a phone label, the run id of run-2025061514 or nightly_2025061514
    ("cell-7138536164" and "Tel-713-853-6164" stay phone numbers)."""
    if re.search(r"(?<![\d.,])\d{1,3}\.$", before):
        return True
    word = re.search(rf"([{_LETTER}]*)(_|-|)$", before)
    return bool(digits.isdigit() and word and (word.group(1) or word.group(2) == "_")
                and not _PHONE_LABEL.fullmatch(word.group(1)))


#: words a phone number is written after, "cell-7138536164": never an identifier's stem
_PHONE_LABEL = re.compile(r"(?i)tel|telephone|phone|ph|cell|cellphone|mobile|mob|fax|pager|office|home|work|"
                          r"direct|call|voice|contact|number|no|x|ext")


def find_phones(text: str) -> list[str]:
    """Every phone number in `text` as written, in order of appearance (duplicates kept)."""
    return [text[a:b] for a, b in phone_spans(text)]


def is_phone(text: str) -> bool:
    """Whether `text` is exactly one phone number that `find_phones` would find."""
    return phone_spans(text) == [(0, len(text))]


def phone_digits(phone: str) -> str:
    """The digits identifying a phone number, for comparing spellings: the 10 digits of a North American
    number ("+1 (713) 853-6164" -> "7138536164"), else country code + national number; no extension."""
    try:
        num = phonenumbers.parse(phone, PHONE_REGION)
    except phonenumbers.NumberParseException:
        return re.sub(r"\D", "", phone)[-10:]
    national = phonenumbers.national_significant_number(num)
    return national if num.country_code == 1 else f"{num.country_code}{national}"


# where an entry's address goes: "<addr>" or Outlook's "[mailto:addr]" (its forwarded-message header)
_ENTRY_ADDRESS = r"(?:<[^>]*>|\[mailto:[^\]]*\])"


@functools.cache
def _name_letters() -> tuple[str, str]:
    """The bodies of two regex classes: the letters a name's word starts with (upper and title case, any script)
    and the letters it goes on with (any letter)."""
    def ranges(codes: list[int]) -> str:
        runs: list[list[int]] = []
        for c in codes:
            if runs and runs[-1][1] == c - 1:
                runs[-1][1] = c
            else:
                runs.append([c, c])
        return "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in runs)  # letters need no escape

    letters = [c for c in range(sys.maxunicode + 1) if chr(c).isalpha()]
    return ranges([c for c in letters if chr(c).isupper() or chr(c).istitle()]), ranges(letters)


# combining accents (not \w to re), which a name typed decomposed holds: "E\u0301mile"
_MARKS = r"\u0300-\u036f"


def _name_word() -> str:
    upper, letter = _name_letters()
    return rf"[{upper}][{letter}{_MARKS}'\-]*\.?"


@functools.cache
def _name_re() -> re.Pattern:
    return re.compile(rf"^{_name_word()}(?: {_name_word()}){{1,3}}$")


@functools.cache
def _last_first_entry() -> re.Pattern:
    """Outlook's "Quinlan, Zed <address>": the last name and the first name(s). ", Jr." / ", III" after a name
    is its suffix, not a first name ("Gilbert R. Whitaker, Jr. [mailto:...]")."""
    return re.compile(rf"(?<![\w{_MARKS}'-]){_last_first_pair()}\s*{_ENTRY_ADDRESS}")


def _last_first_pair() -> str:
    """'Last, First' (two groups: last, first names), not 'Whitaker, Jr.': the pattern the entries share."""
    upper = _name_letters()[0]
    return (rf"([{upper}][\w{_MARKS}'-]+), (?!(?:Jr|Sr|II|III|IV)\b)"
            rf"([{upper}][\w{_MARKS}'.-]*(?: [{upper}][\w{_MARKS}'.-]*)?)")


@functools.cache
def _quoted_last_first() -> re.Pattern:
    """A quoted display name "Beck, Sally": one entry whatever follows it (the comma is inside the quotes); and
    a header holding nothing but "Beck, Sally" (no address after it, no other entry)."""
    pair = _last_first_pair()
    return re.compile(rf'"{pair}"|^\s*{pair}\s*$')


def __getattr__(name: str) -> Any:
    """`NAME_WORD` and `NAME_RE`, built on first use (see their comment at the top)."""
    if name == "NAME_WORD":
        return _name_word()
    if name == "NAME_RE":
        return _name_re()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def names_from_headers(text: str) -> list[str]:
    """Personal names in e-mail header fields ("X-From: Karen Arnold <...>", "X-To: A Smith, B Jones",
    "From: Karen Arnold [mailto:...]"), and "Last, First" entries with an address anywhere (forwarded headers)."""
    names: list[str] = []
    name_re, last_first, quoted = _name_re(), _last_first_entry(), _quoted_last_first()

    def is_name(cand: str) -> bool:  # the shape of a personal name, and no word that headers use otherwise
        return bool(name_re.match(cand)) and not (set(cand.replace(".", "").split()) & NOT_NAMES)

    for m in HEADER_RE.finditer(text):
        # Outlook's "Quinlan, Zed <...>": a comma inside one entry, told apart from a list by the address after
        # it, or by quotes around it ('"Beck, Sally" <...>' and a bare 'X-cc: Beck, Sally' were left whole)
        pairs = [(q[0] or q[2], q[1] or q[3]) for q in quoted.findall(m.group(1))]
        value = quoted.sub(",", m.group(1))
        pairs += last_first.findall(value)
        for last, first in pairs:
            cand = f"{first} {last}"
            if is_name(cand):
                names.append(cand)
        value = last_first.sub(",", value)
        # drop <address> and [mailto:address] parts; a parenthesis is its own entry: "addr (John Doe)" names
        # John Doe, Outlook's "Bob Smith (E-mail)" leaves the one word "E-mail", no name
        value = re.sub(_ENTRY_ADDRESS, ",", value).replace("(", ",").replace(")", ",")
        value = EMAIL_RE.sub(",", value)
        for part in re.split(r"[,;\n]", value):
            part = part.split("/", 1)[0]  # Lotus Notes: "Karen Arnold/HOU/ECT@ECT" names Karen Arnold
            cand = " ".join(part.replace('"', " ").replace("'", " ").split())
            if is_name(cand):
                names.append(cand)
    # forwarded header blocks in a body ("\t\t cc: ...", a list continued on the next lines): an entry with
    # an address after it is a name wherever it stands (the quotes, or the address, make it one entry)
    for q in _entry_with_address().findall(text):
        cand = f"{q[1] or q[3]} {q[0] or q[2]}"
        if is_name(cand) and cand not in names:
            names.append(cand)
    return names


@functools.cache
def _entry_with_address() -> re.Pattern:
    """'"Beck, Sally" <address>' or 'Beck, Sally <address>' anywhere in a text (forwarded headers)."""
    pair = _last_first_pair()
    return re.compile(rf'"{pair}"\s*{_ENTRY_ADDRESS}|(?<![\w{_MARKS}\'"-]){pair}\s*{_ENTRY_ADDRESS}')


def load_name_list(path: str | Path) -> list[str]:
    """Names from a JSONL file of objects with a "name" field (e.g. pii-enron-pil/name2email.jsonl)
    or a plain text file with one name per line."""
    from leakaudit.data.io import read_lines
    from leakaudit.errors import InputError

    p = Path(path).expanduser()
    if not p.exists():
        raise InputError("file not found", file=p, field="--names")
    names = []
    with read_lines(p, jsonl=p.suffix == ".jsonl") as fh:  # bytes that are not UTF-8: an InputError naming the line
        for lineno, raw in enumerate(fh, start=1):
            raw = raw.strip()
            if not raw:
                continue
            if p.suffix == ".jsonl":
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise InputError(f"malformed JSON: {exc.msg}", file=p, line=lineno) from None
                if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                    raise InputError("expected an object with a string 'name'", file=p, line=lineno, field="name")
                raw = obj["name"].strip()
            if raw:
                names.append(raw)
    return names


def shipped_names() -> list[str]:
    """The names of the shipped Enron name/e-mail pairs."""
    from leakaudit import resources

    return load_name_list(resources.path("pii-enron-pil", "name2email.jsonl"))


@functools.cache
def shipped_name_finder() -> NameFinder:
    """A finder of the shipped Enron names (the people whose addresses the studies extract), built once per
    process (0.4 s): what reports, run records and messages mask names with."""
    return NameFinder(shipped_names())


def name_finder(mask_names: str | Path | None = None) -> NameFinder:
    """The shipped Enron names plus those of a name list (an experiment's `report.mask_names`): what a run's
    records and report mask. A list that cannot be read is an error, never a silently unmasked report.
    Built once per version of the list (a run record is written after every stage)."""
    if mask_names is None:
        return shipped_name_finder()
    from leakaudit.errors import InputError

    p = Path(mask_names).expanduser()
    try:
        stat = p.stat()
    except OSError:
        raise InputError("file not found", file=p, field="report.mask_names") from None
    try:
        return _finder_of_list(str(p.resolve()), stat.st_mtime_ns, stat.st_size)
    except InputError as exc:
        exc.field = "report.mask_names"
        raise


@functools.lru_cache(maxsize=4)
def _finder_of_list(path: str, mtime_ns: int, size: int) -> NameFinder:
    del mtime_ns, size  # the cache key: an edited list is read again
    return NameFinder([*shipped_names(), *load_name_list(path)])


@dataclass(frozen=True)
class _Found:
    """A name found in the lower-cased text, read back from the original: the part of re.Match callers use."""

    text: str
    begin: int
    stop: int

    def start(self) -> int:
        return self.begin

    def end(self) -> int:
        return self.stop

    def group(self, index: int = 0) -> str:
        return self.text[self.begin:self.stop]


def name_key(name: str) -> str:
    """One key per person for a name as `NameFinder` matches it: any case, "Last, First" as "First Last"."""
    if "," in name:
        last, _, rest = name.partition(",")
        name = f"{rest} {last}"
    return " ".join(name.lower().split())


class NameFinder:
    """Finds whole-word occurrences of known full names (longest first, so "Mary Ann Lee" beats "Mary Ann"),
    in any letter case and also as "Last, First". Names of one word are left out: the shipped name list holds 306 of them, among them
    "ENRON", "more" and "Register", and replacing those as names rewrote ordinary text in 40% of messages.
    A name may be followed by "@" (Lotus Notes' "Zed Quinlan@ENRON"), not preceded by one."""

    def __init__(self, names: Iterable[str]):
        uniq = sorted({" ".join(n.split()) for n in names if len(n.split()) >= 2 and len(n.strip()) >= 3},
                      key=lambda n: (-len(n), n))
        self.names = uniq
        self._re = _name_regex(tuple(uniq), 0) if uniq else None

    def find(self, text: str) -> list[re.Match]:
        """Matches with their offsets and text in `text` (match.group(0) as written there)."""
        if self._re is None:
            return []
        lower = text.lower()
        if len(lower) != len(text):  # a character whose lower case is longer ("İ"): offsets would shift
            return list(_name_regex(tuple(self.names), re.IGNORECASE).finditer(text))
        return [_Found(text, m.start(), m.end()) for m in self._re.finditer(lower)]


@functools.lru_cache(maxsize=8)
def _name_regex(names: tuple[str, ...], flags: int) -> re.Pattern:
    """The regex of a name list (also as "Last, First", Outlook's X-To: "Quinlan, Zed"), matched on the
    lower-cased text where lower-casing keeps every offset (nearly always); the IGNORECASE twin, for the rest,
    is compiled only when such a text comes. Built once per list: compiling the shipped names takes ~0.15 s,
    and every replacer, audit and mask of the same list would pay it again."""
    forms = {*names, *(f"{n.split()[-1]}, {' '.join(n.split()[:-1])}" for n in names)}
    return re.compile(rf"(?<![\w@.])(?:{_trie_pattern([n.lower() for n in forms])})(?!\w)", flags)


def _trie_pattern(forms: list[str]) -> str:
    """One regex for many names, as a prefix tree ("karen (?:arnold|jones)"): the regex engine then follows the
    text's characters once instead of trying thousands of alternatives at each position (100x faster over
    the shipped names, the same matches). An optional tail is greedy, so the longest name still wins."""
    trie: dict[str, dict] = {}
    for form in forms:
        node = trie
        for i, word in enumerate(form.split()):
            if i:
                node = node.setdefault(" ", {})
            for ch in word:
                node = node.setdefault(ch, {})
        node[""] = {}  # a name ends here

    def build(node: dict[str, dict]) -> str:
        alts = [(r"\s+" if ch == " " else re.escape(ch)) + build(node[ch]) for ch in sorted(node) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return build(trie)


#: the North American layout of a phone number, 3-3-4 digits with the last two groups apart: "713-053-1234",
#: "(555) 123 4567", "+1 212.012.3456", "713 - 053 - 1234", "713/053-1234", "Tel.713-053-1234", and with a word
#: glued to it where a line break was lost ("at713-053-1234", "713-053-1234ext"); digits around it (or a
#: number's dot or dash before it, or a word before its country code: "v1.713.053.1234", "12-713-053-1234")
#: make it part of something else, as a letter and a digit after it do (a hex id: "e608831.2761c976")
_PHONE_SHAPE = re.compile(r"(?:(?<![\w+-])\+?1[-. ]?|(?<![\d_+-])(?<!\d\.))(?:\(\d{3}\) ?|\d{3}(?: ?[-./] ?| )?)"
                          r"\d{3}(?: ?[-.] ?| )\d{4}(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?![\d_]|[.-]\d|[A-Za-z]\d)")


def phone_shaped_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every digit group laid out as a North American phone number, valid or not: what a
    report masks besides `phone_spans`' numbers, since a number libphonenumber rejects (an exchange starting
    with 0 or 1, area code 555, a digit mistyped in what a model recalled) can still be someone's."""
    return [m.span() for m in _PHONE_SHAPE.finditer(text)]


def find_pii(text: str, names: NameFinder | None = None, phones: bool = True,
             phone_shapes: bool = False) -> list[PiiSpan]:
    """E-mails, phones (unless `phones=False`; with `phone_shapes` also digits laid out as one that is not a valid
    number: masking's rule) and (given) names in `text`, sorted by position, overlaps resolved left-first."""
    spans = [PiiSpan("email", a, b, text[a:b]) for a, b in email_spans(text)]
    if phones:
        spans += [PiiSpan("phone", a, b, text[a:b]) for a, b in phone_spans(text)]
    if phones and phone_shapes:
        spans += [PiiSpan("phone", a, b, text[a:b]) for a, b in phone_shaped_spans(text)]
    if names is not None:
        spans += [PiiSpan("name", m.start(), m.end(), " ".join(m.group(0).split())) for m in names.find(text)]
    spans.sort(key=lambda s: (s.start, -(s.end - s.start)))
    kept: list[PiiSpan] = []
    for s in spans:
        if not kept or s.start >= kept[-1].end:
            kept.append(s)
    return kept
