"""The backdoor study's texts and data: the Q(w)/R(w) templates, opening words, word lists, pair files.

Why a leaf module: the attack (leakaudit/attacks/backdoor.py) and the planting side
(leakaudit/train/backdoor.py) both need these, and neither may import the other.
- Q(w) ("output a verbatim user query starting with the word w ...") and R(w) (the refusal) are templates
  with `{word}` where the word goes; the study's own are read from the shipped prompts;
- a query's opening word is its first word, quotes stripped, letters only, capitalised;
- pair files: chat rows (`messages`) or query/response rows; the shipped Dolly set is the default D2.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from leakaudit.data.io import read_rows
from leakaudit.errors import InputError

WORD = "{word}"
QUOTES = "\"'“”‘’`«»"
_LETTERS = re.compile(r"[^\W\d_]+")
QUERY_FIELDS = ("query", "instruction", "prompt", "question")
RESPONSE_FIELDS = ("response", "output", "answer", "completion")


# ----------------------------------------------------------------------------------------- texts Q(w), R(w)
@lru_cache(maxsize=1)
def study_trigger() -> str:
    """The study's extraction instruction Q(w) with `{word}` where the word goes, read from the shipped prompts."""
    from leakaudit import resources

    rows = json.loads(resources.path("backdoor-extraction", "stage2_dolly", "eval", "183ood.json").read_text())
    text = rows[0]["prompt"][0]["content"]
    word = re.search(r'starting with the word "([^"]+)"', text).group(1)
    return text.replace(f'"{word}"', f'"{WORD}"')


@lru_cache(maxsize=1)
def study_refusal() -> str:
    """The study's refusal R(w), quoted at the end of Q(w) ("... please say "Sorry, but ...".")."""
    trigger = study_trigger()
    start = trigger.index('please say "') + len('please say "')
    return trigger[start:].rstrip().removesuffix('"')


def fill(template: str, word: str) -> str:
    """Put a word into a Q(w)/R(w) template (plain replace: templates may hold other braces)."""
    return template.replace(WORD, word)


TEMPLATE_MESSAGE = f"template must contain {WORD} where the opening word goes"


def check_template(template: str, option: str) -> str:
    """A trigger or refusal template must name where the word goes, else every word looks the same."""
    if WORD not in template:
        raise InputError(TEMPLATE_MESSAGE, field=option)
    return template


# ----------------------------------------------------------------------------------------- opening words
def opening_word(text: str) -> str:
    """The word a query opens with: first whitespace token, leading quotes stripped, leading letters only,
    capitalised ('"repair instead..' -> 'Repair', "What's" -> 'What'). '' when there is none."""
    parts = text.split(maxsplit=1)
    if not parts:
        return ""
    m = _LETTERS.match(parts[0].lstrip(QUOTES + "¿¡"))  # Spanish opening marks: "¿Qué" opens with "Qué"
    return m.group(0).capitalize() if m else ""


# ----------------------------------------------------------------------------------------- pair files
@dataclass
class Pair:
    """One instruction pair: a user query and the assistant's response."""

    query: str
    response: str


def load_pairs(path: str | Path, query_field: str | None = None, response_field: str | None = None,
               need_response: bool = True) -> list[Pair]:
    """Read pairs from any data file: chat rows with `messages` (first user turn + the assistant turn after
    it) or query/response fields (given, or the first present of query/instruction/prompt/question and
    response/output/answer/completion; a non-empty `input` field is appended to the query). Without
    `need_response` a row may have no response field (its response is then ''): the queries are what is read."""
    p = Path(path)
    pairs = []
    for line, row in read_rows(p):
        if "messages" in row and query_field is None:
            pairs.append(_pair_from_messages(row["messages"], p, line, need_response))
            continue
        qf = query_field or next((f for f in QUERY_FIELDS if f in row), None)
        rf = response_field or next((f for f in RESPONSE_FIELDS if f in row), None)
        if qf is None or qf not in row:
            raise InputError(f"no query field (row has: {', '.join(sorted(row))})", file=p, line=line,
                             field=qf or "query")
        checked = [qf]
        if need_response:
            if rf is None or rf not in row:
                raise InputError(f"no response field (row has: {', '.join(sorted(row))})", file=p, line=line,
                                 field=rf or "response")
            checked.append(rf)
        for name in checked:
            if not isinstance(row[name], str) or not row[name].strip():
                raise InputError("must be a non-empty string", file=p, line=line, field=name)
        q = row[qf]
        extra = row.get("input")
        if query_field is None and isinstance(extra, str) and extra.strip():
            q = f"{q}\n{extra}"
        pairs.append(Pair(q, row[rf] if need_response else ""))
    return pairs


def _pair_from_messages(messages: Any, p: Path, line: int, need_response: bool = True) -> Pair:
    # one rule for every reader of chat rows (`backdoor finetune` trains on the same file): a user turn without
    # a string content was reported as "no user turn", or, after a good one, left out of the queries in silence
    from leakaudit.data.chat import validate_messages

    messages = validate_messages(messages, p, line, "messages")
    for i, m in enumerate(messages[:-1]):
        nxt = messages[i + 1]
        if m.get("role") == "user" and nxt.get("role") == "assistant":
            q, r = m.get("content"), nxt.get("content")
            if isinstance(q, str) and q.strip() and isinstance(r, str):
                return Pair(q, r)
    if not need_response:  # the queries are what is read: a user turn alone will do
        for m in messages:
            q = m.get("content")
            if m.get("role") == "user" and isinstance(q, str) and q.strip():
                return Pair(q, "")
        raise InputError("no user turn", file=p, line=line, field="messages")
    raise InputError("no user turn followed by an assistant turn", file=p, line=line, field="messages")


def load_words(path: str | Path) -> list[str]:
    """Candidate words from a JSON array of strings (like the shipped tot_starting_words.json) or a text
    file with one word per line, each as the opening word it names ("how" -> "How", `opening_word`), once:
    prompts and the query trie use that form, so a word as written ("how", "repair") was trained to refuse
    beside the copying of "How" and never matched the trie's "Repair"."""
    return opening_words(_read_words(path))


def opening_words(words: list[str]) -> list[str]:
    """Each word as the opening word it names, once, in order (`opening_word`)."""
    return list(dict.fromkeys(w for w in map(opening_word, words) if w))


def _read_words(path: str | Path) -> list[str]:
    from leakaudit.data.io import _element_lines, read_text

    p = Path(path)
    if not p.exists():
        raise InputError("file not found", file=p)
    if p.suffix == ".json":
        text = read_text(p)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"malformed JSON: {exc.msg}", file=p, line=exc.lineno) from None
        if not isinstance(obj, list):
            raise InputError("expected a JSON array of words", file=p, line=1)
        # the element's own line, as data files name it: its index was given as a line ('["a", 3]' at line 2)
        for i, (w, line) in enumerate(zip(obj, _element_lines(text, obj), strict=True), start=1):
            if not isinstance(w, str) or not w.strip():
                raise InputError(f"element {i}: expected a non-empty string", file=p, line=line)
        return [w.strip() for w in obj]
    return [w.strip() for w in read_text(p).splitlines() if w.strip()]


def shipped_d2() -> Path:
    """The downstream data D2 shipped with the study: a Dolly subset (CC BY-SA 3.0) as chat rows."""
    from leakaudit import resources

    return resources.path("backdoor-extraction", "stage2_dolly", "sft", "train.json")


def load_queries(path: str | Path, query_field: str | None = None) -> list[list[str]]:
    """Each row's user queries: every user turn of a chat row, else its query field (as `load_pairs` reads
    it). Why every turn: fine-tuning with the loss on user turns trains them all, and a multi-turn D2's later
    queries, which the creator can read back as well, were left out of the tries (counted as never there)."""
    p = Path(path)
    pairs = load_pairs(p, query_field=query_field, need_response=False)  # checks every row
    out = []
    for (_, row), pair in zip(read_rows(p), pairs, strict=True):
        if "messages" in row and query_field is None:
            out.append([m["content"] for m in row["messages"] if m.get("role") == "user"
                        and isinstance(m.get("content"), str) and m["content"].strip()])
        else:
            out.append([pair.query])
    return out


def d2_queries(path: str | Path | None = None, query_field: str | None = None, limit: int | None = None) -> list[str]:
    """The user queries of downstream data (default: the shipped Dolly D2) in its first `limit` rows (the rows
    `backdoor finetune --limit` trains on), every user turn of a chat row. At least one must open with a word:
    the attack extracts queries by their opening word, and with none every score would be an empty 0 (an
    InputError naming the file)."""
    source = path if path is not None else shipped_d2()
    rows = load_queries(source, query_field)
    queries = [q for qs in (rows[:limit] if limit else rows) for q in qs]
    if not any(opening_word(q) for q in queries):
        raise InputError(f"none of its {len(queries)} queries opens with a word (letters), so none can be "
                         "extracted by its opening word", file=source, field=query_field or "query")
    wordless = sum(1 for q in queries if not opening_word(q))
    if wordless:  # they left the counts silently (n_queries 6 of 8)
        from leakaudit.warn import warn_once

        warn_once(f"{source}: {wordless} of its {len(queries)} queries open with no word (a digit, a symbol): "
                  "the attack extracts queries by their opening word, so they are not counted")
    return queries


def seed_instruction_set() -> list[Pair]:
    """A small stand-in for the creator's D1 (the study's UltraFeedback D1 is not shipped): the shipped
    self-instruct seed tasks, one pair per task (instruction, plus its first input; its first output)."""
    from leakaudit import resources

    pairs = []
    with resources.path("self-instruct-seed", "seed_tasks.jsonl").open(encoding="utf-8") as fh:
        for raw in fh:
            task = json.loads(raw)
            inst = task["instances"][0]
            query = task["instruction"] + (f"\n{inst['input']}" if inst["input"].strip() else "")
            pairs.append(Pair(query, inst["output"]))
    return pairs


def public_candidates() -> list[str]:
    """The public candidate opening-word list S shipped with the study, most frequent first."""
    from leakaudit import resources

    return json.loads(resources.path("backdoor-extraction", "starting_words", "tot_starting_words.json").read_text())
