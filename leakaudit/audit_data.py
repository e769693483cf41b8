"""Audit generated data for leaks of its source *before* anyone trains on it.

Definitions (per generated record g, against the whole source corpus S):
- source PII: the e-mail addresses (case-insensitive), phone numbers (compared by their 10 digits) and
  names (from a name list plus the names in S's e-mail headers) that occur in S.
- `emails` / `phones` / `names` of g: the distinct source PII values of that kind that g contains; for a
  continuation, read after its prompt and counted when they reach into g (an address the generator
  completes from the prompt's "<msagel@" is reproduced; one wholly in the prompt is not).
- `ngrams`: the number of g's word n-grams (whitespace words, n = 8 by default, exact) that occur
  anywhere in S, and `ngram_fraction` = that number / g's n-gram count (0 for a text shorter than n).
  A reproduced 8-gram is a verbatim span of at least 8 words copied from the source.
Overall: for each PII kind, how many distinct source values occur in S, how many of them the generated
data reproduces (and the fraction); records with any reproduced PII; records with any verbatim n-gram;
the fraction of all generated n-grams found in S. Higher => more leakage. Reported values are masked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leakaudit.data.pii_find import (
    NameFinder,
    email_spans,
    find_emails,
    find_phones,
    name_key,
    names_from_headers,
    phone_digits,
    phone_spans,
)
from leakaudit.data.pii_mask import active_names, mask_email, mask_name, mask_phone, mask_pii

KINDS = ("emails", "phones", "names")


def word_ngrams(text: str, n: int) -> list[str]:
    words = text.split()
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def _hashes(grams: Iterable[str]) -> np.ndarray:
    """64-bit hashes of n-grams (blake2b), so millions of source n-grams fit in a sorted array."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(g.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                       "little", signed=True) for g in grams), dtype=np.int64)


@dataclass
class SourceIndex:
    """What the source contains: its PII values and its n-gram hashes."""

    emails: dict[str, str] = field(default_factory=dict)   # lower-case address -> as first seen
    phones: dict[str, str] = field(default_factory=dict)   # 10 digits -> as first seen
    names: dict[str, str] = field(default_factory=dict)    # normalised name -> as first seen
    ngram_hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    n: int = 8
    name_finder: NameFinder | None = None

    @classmethod
    def build(cls, texts: Sequence[str], *, names: Iterable[str] = (), n: int = 8) -> SourceIndex:
        idx = cls(n=n)
        candidates = set(" ".join(x.split()) for x in names)
        for t in texts:
            candidates.update(names_from_headers(t))
        finder = NameFinder(candidates)
        chunks = []
        for t in texts:
            for e in find_emails(t):
                idx.emails.setdefault(e.lower(), e)
            for p in find_phones(t):
                idx.phones.setdefault(phone_digits(p), p)
            for m in finder.find(t):  # one entry per person, however the name is spelt
                idx.names.setdefault(name_key(m.group(0)), " ".join(m.group(0).split()))
            chunks.append(_hashes(word_ngrams(t, n)))
        idx.ngram_hashes = np.unique(np.concatenate(chunks)) if chunks else idx.ngram_hashes
        idx.name_finder = NameFinder(idx.names)  # only names that really occur in the source (any case)
        return idx


@dataclass
class RecordAudit:
    """Leaks found in one generated record (values are the source's, unmasked: mask before showing)."""

    id: str
    emails: list[str]
    phones: list[str]
    names: list[str]
    ngrams: int
    n_ngrams: int

    @property
    def ngram_fraction(self) -> float:
        return self.ngrams / self.n_ngrams if self.n_ngrams else 0.0

    def row(self, show_pii: bool = False) -> dict[str, Any]:
        emails = self.emails if show_pii else [mask_email(e) for e in self.emails]
        phones = self.phones if show_pii else [mask_phone(p) for p in self.phones]
        names = self.names if show_pii else [mask_name(x) for x in self.names]
        # ids are often an address or a phone, sometimes a name
        record = self.id if show_pii else mask_pii(self.id, active_names())
        return {"id": record, "emails": emails, "phones": phones, "names": names,
                "n_emails": len(self.emails), "n_phones": len(self.phones), "n_names": len(self.names),
                "verbatim_ngrams": self.ngrams, "n_ngrams": self.n_ngrams,
                "ngram_fraction": round(self.ngram_fraction, 6)}


def audit_record(idx: SourceIndex, rid: str, text: str, prompt: str = "") -> RecordAudit:
    """One generated text's leaks. `prompt`: the source text it continues (a continuation's prompt): a PII
    value is read in prompt + text and counted when it reaches into the text, so an address or name the
    generator completes ("... <msagel@" + "home.com>") counts, and one wholly in the prompt does not; the
    n-grams are the text's own."""
    full, start = prompt + text, len(prompt)
    emails = {full[a:b].lower() for a, b in email_spans(full) if b > start} & idx.emails.keys()
    phones = {phone_digits(full[a:b]) for a, b in phone_spans(full) if b > start} & idx.phones.keys()
    names = ({name_key(m.group(0)) for m in idx.name_finder.find(full) if m.end() > start} & idx.names.keys()
             if idx.name_finder else set())
    grams = _hashes(word_ngrams(text, idx.n))
    return RecordAudit(rid, sorted(idx.emails[e] for e in emails), sorted(idx.phones[p] for p in phones),
                       sorted(idx.names[x] for x in names), _found_in(idx.ngram_hashes, grams), int(grams.size))


def _found_in(sorted_hashes: np.ndarray, grams: np.ndarray) -> int:
    """How many of `grams` occur in the sorted, unique source hashes: a binary search per n-gram. np.isin
    sorted the whole source index again for every record (2,000 records of 2,000 sources: 157 s, now 1.5 s)."""
    if not grams.size or not sorted_hashes.size:
        return 0
    at = np.minimum(np.searchsorted(sorted_hashes, grams), sorted_hashes.size - 1)
    return int((sorted_hashes[at] == grams).sum())


def audit(source_texts: Sequence[str], generated: Sequence[tuple[str, ...]], *, names: Iterable[str] = (),
          n: int = 8) -> tuple[dict[str, Any], list[RecordAudit]]:
    """Audit generated (id, text) pairs, or (id, text, prompt) triples of continuations, against the source
    texts; returns (summary, per-record audits)."""
    idx = SourceIndex.build(source_texts, names=names, n=n)
    records = [audit_record(idx, *g) for g in generated]
    summary: dict[str, Any] = {"n_source_records": len(source_texts), "n_generated_records": len(records),
                               "ngram_n": n, "pii": {}}
    for kind in KINDS:
        in_source = len(getattr(idx, kind))
        reproduced = len({v for r in records for v in getattr(r, kind)})
        summary["pii"][kind] = {"in_source": in_source, "reproduced": reproduced,
                                "fraction": reproduced / in_source if in_source else 0.0,
                                "records_with_any": sum(1 for r in records if getattr(r, kind))}
    total = sum(r.n_ngrams for r in records)
    hits = sum(r.ngrams for r in records)
    summary["records_with_any_pii"] = sum(1 for r in records if r.emails or r.phones or r.names)
    summary["verbatim"] = {"ngrams_reproduced": hits, "ngrams_total": total,
                           "fraction": hits / total if total else 0.0,
                           "records_with_any": sum(1 for r in records if r.ngrams),
                           "source_distinct_ngrams": int(idx.ngram_hashes.size)}
    return summary, records
