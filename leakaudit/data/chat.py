"""Chat rows: a conversation's `messages` checked by one rule for every reader (fine-tuning with format chat,
membership scoring of a chat fine-tune), and which replies a membership score reads.

Why its assistant replies: a chat fine-tune's loss is on the assistant turns (docs/finetune.md), every one of them,
so that is where a member differs from a non-member; the turns before each are what the model saw when it produced
it. Turns after the last assistant turn were not trained on (an assistant turn with no content was: its end marker).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from leakaudit.errors import InputError

ROLES = ("system", "user", "assistant")


def validate_messages(value: Any, file: Path | str | None, line: int | None, field: str) -> list[dict[str, str]]:
    """Check a `messages` value is a non-empty list of {role, content} strings."""
    if not isinstance(value, list) or not value:
        raise InputError("must be a non-empty list of {role, content}", file=file, line=line, field=field)
    for i, m in enumerate(value):
        at = f"{field}[{i}]"  # which message of a long conversation: its field names it
        if not isinstance(m, dict):
            raise InputError(f"a message is an object with string 'role' and 'content', not {type(m).__name__}",
                             file=file, line=line, field=at)
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise InputError(f"every message needs a string '{key}'" + ("" if key not in m else
                                 f", not {type(m[key]).__name__}"), file=file, line=line, field=at)
        if m["role"] not in ROLES:
            raise InputError(f"unknown role '{m['role']}' (use system, user, assistant)", file=file, line=line,
                             field=at)
    return [{"role": m["role"], "content": m["content"]} for m in value]


def last_reply(messages: list[dict[str, str]], file: Path | str | None, line: int | None, field: str) -> int:
    """The index of the conversation's last assistant turn with content: what a conversation needs to be scored
    (the turns after it were not trained on)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant" and messages[i]["content"].strip():
            return i
    raise InputError("has no assistant turn with content: a chat fine-tune trains on the assistant's replies, "
                     "so there is nothing of it to score", file=file, line=line, field=field)


def reply_text(messages: list[dict[str, str]]) -> str:
    """The contents of the assistant turns a membership score reads, one per line: the conversation's text where
    an attack reads text (zlib's compressed length, the length check of members against non-members)."""
    k = last_reply(messages, None, None, "messages")
    return "\n".join(m["content"] for m in messages[:k + 1] if m["role"] == "assistant")


def reply_starts(messages: list[dict[str, str]]) -> list[tuple[int, int]]:
    """(message index, offset in `reply_text`) of each assistant turn it joins: where a span of the replies'
    text (a word the neighbourhood attack swaps) lies in the conversation."""
    k = last_reply(messages, None, None, "messages")
    out, at = [], 0
    for i, m in enumerate(messages[:k + 1]):
        if m["role"] == "assistant":
            out.append((i, at))
            at += len(m["content"]) + 1  # the "\n" between two replies
    return out


def with_replies(messages: list[dict[str, str]], change: Callable[[str], str] | None = None) -> list[dict[str, str]]:
    """The conversation up to its last assistant turn, each assistant turn's content passed through `change` (an
    attack's variant of the replies, e.g. lowercased); the turns after it are dropped (nothing of them was trained
    on). An assistant turn with no content after the last reply is kept: a chat fine-tune's loss is on its end
    marker too (`chat_example`)."""
    last_reply(messages, None, None, "messages")  # a reply with content, or the error that says there is none
    k = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if change is None:
        return list(messages[:k + 1])
    return [{**m, "content": change(m["content"])} if m["role"] == "assistant" else m for m in messages[:k + 1]]


def after_prefix(prefix: list[list[dict[str, str]]], messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation with the `prefix` conversations before it as earlier turns of one conversation (ReCaLL's
    prefix P, `recall` on conversations): its own system turn, when it opens with one, stays first (most chat
    templates take a system turn first only, and SmolLM2's writes a default system prompt where the first turn is
    not one), then each prefix conversation's turns up to its last assistant turn (`with_replies`) without their
    system turns, then the conversation's other turns. Without a system turn of its own the template's default,
    if any, opens the joined conversation as it opens the conversation alone."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    earlier = [m for p in prefix for m in with_replies(p) if m["role"] != "system"]
    return [*head, *earlier, *messages[len(head):]]
