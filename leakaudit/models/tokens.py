"""Token ids of a text with the tokenizer's own special tokens at its start only, the one way every part of
leakaudit tokenises a whole text (scoring, sampling prompts, fine-tuning rows, ReCaLL prefixes).

Why: a tokenizer that appends EOS itself (Llama's `add_eos_token=True`, a `$A </s>` post-processor) ended
every scored text, prompt and prefix in EOS: the EOS was scored as part of the text (and of Min-K%), a prompt
asked the model to continue after end-of-text, ReCaLL's passes no longer covered the same tokens, and a
fine-tuning row got two. And a chat template that writes the BOS itself (Llama 3, Mistral, Gemma) gave a
rendered prompt two BOS tokens where training had one.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

_TAILS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def added_tail(tokenizer: Any) -> list[int]:
    """The ids the tokenizer appends after a text of its own accord (e.g. [eos]); [] for most tokenizers."""
    try:
        return _TAILS[tokenizer]
    except (KeyError, TypeError):
        pass
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    tail: list[int] = []
    for start in range(len(full) - len(plain) + 1):
        if list(full[start:start + len(plain)]) == list(plain):
            tail = list(full[start + len(plain):])
            break
    try:
        _TAILS[tokenizer] = tail
    except TypeError:  # a tokenizer that cannot be weakly referenced: asked again next time
        pass
    return tail


def encode(tokenizer: Any, texts: Sequence[str], special: bool = True) -> list[list[int]]:
    """Ids of each text; with `special`, the tokenizer's special tokens at the start (a BOS) but not those it
    appends at the end, and no second BOS where the text already begins with the BOS token's own text."""
    if not special:
        return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    tail = added_tail(tokenizer)
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    out = []
    for text, ids in zip(texts, tokenizer(list(texts), add_special_tokens=True)["input_ids"], strict=True):
        ids = list(ids)
        if tail and ids[len(ids) - len(tail):] == tail:
            ids = ids[:len(ids) - len(tail)]
        if bos and bos_id is not None and text.startswith(bos) and ids[:2] == [bos_id, bos_id]:
            ids = ids[1:]
        out.append(ids)
    return out
