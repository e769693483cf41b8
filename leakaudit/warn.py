"""One-line warnings for input the tool adjusts instead of refusing (e.g. a window clamped to the model's
context), where a library called in a loop would otherwise repeat itself. Kept apart from errors.py: a warning
names specs, ids and files, so it is PII-masked as error lines are, and masking sits above errors."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

_WARNED: set[str] = set()
_COLLECTING: list[list[str]] = []  # the open collecting() blocks, innermost last


def warn_once(message: str, key: str | None = None, *, collect: bool = True) -> None:
    """Print `warning: message` (PII masked) as one stderr line, once per process and only on rank 0. `key`:
    what makes two warnings the same where the message also holds counts or a model's name (a window warning
    said once per scoring pass was said 13 times by one experiment, once per stage and model). `collect`
    False: not for collecting() (a kind's own result warnings, which its report section shows already)."""
    for sink in _COLLECTING if collect else ():  # before the once-per-process check: a second stage is told
        if message not in sink:                      # what the first was
            sink.append(message)
    said = message if key is None else f"\0{key}"
    if said in _WARNED or int(os.environ.get("RANK", "0")) != 0:
        return
    _WARNED.add(said)
    from leakaudit.data.pii_mask import mask_message  # phonenumbers loads only when something is said

    print(f"warning: {mask_message(message)}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def collecting() -> Iterator[list[str]]:
    """Every warning warn_once is given inside the block (said or not: each once), in order. An experiment
    stage keeps them in its result: said on stderr only, the report showed a number beside no word of what
    the run had adjusted (a text cut to the masked LM's window, a cell too short for any address)."""
    sink: list[str] = []
    _COLLECTING.append(sink)
    try:
        yield sink
    finally:
        _COLLECTING.remove(sink)


NO_NAMES = "{path}: holds no names, so none of its names can be found, replaced or masked (an empty list)"


def warn_if_no_names(names: list[str], path: object) -> list[str]:
    """`names` as read from the list at `path`, said once when it is empty: a blank list looked like a list of
    one's own and silently left every name in place. Called wherever a list is read (replace-pii, audit-data,
    report.mask_names); not in pii_find's reader, which the masker this module imports (pii_mask) imports."""
    if not names:
        warn_once(NO_NAMES.format(path=path))
    return names


def say_lookalike_users(users: list[tuple[str, object]], path: object, field: str) -> None:
    """Warn when two user ids (with their lines) differ only in Unicode form ("José" with é as one code point
    or as e + U+0301): they print alike and are two users, each with part of the person's rows (and, under a
    per-user cap, a cap each). Kept apart, as given. `path` None: each line is already `FILE:LINE` (users
    read from two files)."""
    import unicodedata

    forms: dict[str, set[str]] = {}
    for user, _ in users:
        forms.setdefault(unicodedata.normalize("NFC", user), set()).add(user)
    alike = [ids for ids in forms.values() if len(ids) > 1]
    if alike:
        user, line = next((u, n) for u, n in users if u in alike[0])
        where = line if path is None else f"{path}:{line}"
        warn_once(f"{where}: field '{field}': {len(alike)} user id(s) are written in more than one Unicode "
                  f"form (e.g. '{user}'): they print alike and count as different users; write each user's id one "
                  "way (NFC) to join them")
