"""One error type for bad user input, so the CLI can print one line and exit 2 (never a traceback)."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input from the user: a file, a line, a field or an option. Printed as `error: ...`."""

    def __init__(self, message: str, *, file: str | Path | None = None, line: int | None = None,
                 field: str | None = None):
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        super().__init__(self.format())

    def format(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file if self.line is None else f"{self.file}:{self.line}"
            where += ": "
        field = f"field '{self.field}': " if self.field else ""
        # a quoted value's line break (an id or label "a\nb" of a data file) split the one error line in two,
        # and the masker, which reads quotes within a line, left a phone number in it unmasked
        return f"{where}{field}{self.message}".translate(_LINE_BREAKS)


_LINE_BREAKS = str.maketrans({"\n": "\\n", "\r": "\\r"})


class OptionError(Exception):
    """A bad option value at a key path inside a kind's options, e.g. ('attacks', 1).

    Why separate from InputError: the same check serves the CLI (which names the flag) and an experiment
    file (which names FILE:LINE and the key path); each front end turns it into its own InputError.
    """

    def __init__(self, loc: tuple, message: str):
        self.loc = tuple(loc)
        self.message = message
        super().__init__(message)


def first_line(exc: BaseException) -> str:
    """A library's message fit for one line: its first line (and the next, when the first ends in ':')."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    for more in lines[1:]:
        if not text.endswith(":"):
            break
        text += " " + more
    return f"missing key {text}" if isinstance(exc, KeyError) else text


def one_line(exc: BaseException, limit: int = 200) -> str:
    """`first_line`, cut to `limit` characters (some messages quote the offending input at length) and
    without Python's advice to call sys.set_int_max_str_digits, which is not for a CLI user."""
    text = first_line(exc).split("; use sys.")[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_texts(texts: object, name: str = "texts") -> list[str]:
    """A Python caller's texts as a list (a generator is read once, here): one string is a sequence of
    characters, and each was scored as a text (score_texts(lm, "hello world") gave 11 results); a None among
    them failed deep inside the tokenizer."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{name}: expected a list of texts, got one string (write [{name}])")
    texts = list(texts)  # type: ignore[call-overload]
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}]: expected a string, got {type(text).__name__}")
    return texts


def check_model(lm: object, name: str = "lm") -> None:
    """A loaded model, not its spec: run_mia("tiny-gpt-neox", ...) failed with "'str' object has no attribute
    'max_length'" inside the scoring engine."""
    if not (hasattr(lm, "model") and hasattr(lm, "tokenizer")):
        raise TypeError(f"{name}: expected a loaded model (leakaudit.models.load_model(spec)), got "
                        f"{type(lm).__name__}")
