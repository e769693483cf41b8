"""Chat rows: a conversation's `messages` checked by one rule for every reader (fine-tuning with format chat,
membership scoring of a chat fine-tune), and which reply a membership score reads.

Why the last assistant turn: a chat fine-tune's loss is on the assistant turns (docs/finetune.md), so that is
where a member differs from a non-member; the turns before it are what the model saw when it produced it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from leakaudit.errors import InputError

ROLES = ("system", "user", "assistant")


def validate_messages(value: Any, file: Path | str | None, line: int | None, field: str) -> list[dict[str, str]]:
    """Check a `messages` value is a non-empty list of {role, content} strings."""
    if not isinstance(value, list) or not value:
        raise InputError("must be a non-empty list of {role, content}", file=file, line=line, field=field)
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise InputError("every message needs string 'role' and 'content'", file=file, line=line, field=field)
        if m["role"] not in ROLES:
            raise InputError(f"unknown role '{m['role']}' (use system, user, assistant)", file=file, line=line,
                             field=field)
    return [{"role": m["role"], "content": m["content"]} for m in value]


def last_reply(messages: list[dict[str, str]], file: Path | str | None, line: int | None, field: str) -> int:
    """The index of the conversation's last assistant turn with content: the reply a membership score reads."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant" and messages[i]["content"].strip():
            return i
    raise InputError("has no assistant turn with content: a chat fine-tune trains on the assistant's replies, "
                     "so there is nothing of it to score", file=file, line=line, field=field)


def with_reply(messages: list[dict[str, str]], content: str) -> list[dict[str, str]]:
    """The conversation up to its last reply, that reply's content replaced (an attack's variant of the reply,
    e.g. lowercased); the turns after it are dropped (nothing of them is scored)."""
    k = last_reply(messages, None, None, "messages")
    return [*messages[:k], {"role": "assistant", "content": content}]
