"""Perplexity of a model on texts or conversations, and of every checkpoint of a fine-tuning run.

Definitions, over the tokens the scoring pass scores (`attacks.base.scoring_pass`):
  corpus ppl  = exp(total NLL / total scored tokens)      (`ppl`; the standard token-weighted number)
  mean ppl    = mean over rows of exp(mean NLL of the row)  (`mean_text_ppl`; weights each row equally)
A text's scored tokens are all but its first (which has no context; with a BOS, all). A conversation's (`chats`,
a chat fine-tune's rows) are its assistant replies' tokens, each reply after all that comes before it, as
`finetune --format chat` tokenises and trains on them (every token its loss is on, and no other): the corpus
ppl of held-out conversations is exp of the chat fine-tune's eval loss over them, token-weighted; the prompts,
system turns and the turns after the last assistant turn are context or dropped, never counted.
Lower ppl = the model fits the rows better (for members, a lower ppl hints at memorisation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leakaudit.errors import InputError
from leakaudit.models import LoadedModel

Conversation = list[dict[str, str]]


@dataclass
class ModelPerplexity:
    """Perplexity of one model on a set of texts or conversations (`n_texts` counts the rows: conversations
    where they are)."""

    model: str
    ppl: float
    mean_text_ppl: float
    nll_per_token: float
    n_texts: int
    n_tokens: int


def _rows(texts: Sequence[str] | None, chats: Sequence[Conversation] | None
          ) -> tuple[list[str] | None, list[Conversation] | None]:
    """The texts, or the conversations, checked once (a generator read here, once): one of them, not both. A
    conversation needs a reply to score (`data.chat.last_reply`); a bad one is named by its index."""
    from leakaudit.errors import check_texts

    if (texts is None) == (chats is None):
        raise TypeError("perplexity: give texts or chats (conversations), one of them")
    if chats is None:
        return check_texts(texts), None  # one string was read as its characters: "no text has a token to score"
    from leakaudit.data.chat import last_reply, validate_messages

    if isinstance(chats, (str, bytes, dict)):
        raise TypeError("chats: expected a list of conversations (lists of {role, content})")
    checked = []
    for i, chat in enumerate(chats):
        messages = validate_messages(chat, None, None, f"chats[{i}]")
        last_reply(messages, None, None, f"chats[{i}]")
        checked.append(messages)
    return None, checked


def perplexity(lm: LoadedModel, texts: Sequence[str] | None = None, *, chats: Sequence[Conversation] | None = None,
               batch_size: int | str = "auto", max_length: int | None = None, stride: int | None = None,
               progress: bool = True, cache: bool = True) -> ModelPerplexity:
    """Corpus and mean per-row perplexity of the texts, or of the conversations (`chats`: over their assistant
    replies in context), from one batched scoring pass (served from the score cache unless `cache=False`);
    data-parallel under a launcher (each process scores a shard, every process gets all). A conversation the
    model's chat template refuses raises `UnrenderableChatError` (its `index` in `chats`)."""
    from leakaudit.errors import check_model

    check_model(lm)
    texts, chats = _rows(texts, chats)
    return _perplexity(lm, texts, chats, {"batch_size": batch_size, "max_length": max_length, "stride": stride,
                                          "progress": progress, "cache": cache})


def _perplexity(lm: LoadedModel, texts: list[str] | None, chats: list[Conversation] | None,
                score_options: dict[str, Any]) -> ModelPerplexity:
    from leakaudit.attacks.base import TooShortError, UnrenderableChatError, chat_training_notes, scoring_pass
    from leakaudit.warn import warn_once

    try:
        scored = scoring_pass(lm, texts, chats=chats, name="perplexity", **score_options)
    except UnrenderableChatError as exc:  # "text #2": the caller's list is `chats`, counted from 0
        exc.message = f"chats[{exc.index}] {exc.why}"
        exc.args = (exc.format(),)
        raise
    for i, s in enumerate(scored):  # a NaN row made the perplexity nan, said as a number
        if not math.isfinite(s.sum_logp):
            raise TooShortError(i, f"gets NaN or infinite log-probabilities from {lm.spec} (weights that hold NaN "
                                   "or inf, or an overflow in its dtype), so no perplexity is a number")
    scores = [s for s in scored if s.n_tokens]
    n_rows = len(scored)
    if not scores:
        raise InputError("no text has a token to score (texts need at least 2 tokens)", field="--data")
    if len(scores) < n_rows:  # n_texts said fewer than were given, and nothing said why
        warn_once(f"{n_rows - len(scores)} of {n_rows} texts have no scored token (fewer than 2 tokens "
                  "and no BOS) and are left out of the perplexity (n_texts counts the others)")
    for note in chat_training_notes(lm, chats) if chats is not None else []:  # scored other than trained
        warn_once(note)
    total_nll = -sum(s.sum_logp for s in scores)
    n_tokens = sum(s.n_tokens for s in scores)
    per_text = [math.exp(-s.mean_logp) for s in scores]
    return ModelPerplexity(model=lm.spec, ppl=math.exp(total_nll / n_tokens),
                           mean_text_ppl=float(np.mean(per_text)), nll_per_token=total_nll / n_tokens,
                           n_texts=len(scores), n_tokens=n_tokens)


def model_dirs(run_dir: str | Path) -> list[Path]:
    """Every loadable model in a fine-tuning run dir: each checkpoint (in step order), then the final one."""
    from leakaudit.train.artifacts import checkpoint_dirs

    run = Path(run_dir).expanduser()  # `~/run`, as --model reads it without --all-checkpoints
    found = []
    for ckpt in checkpoint_dirs(run):
        loadable = ckpt / "adapter" if (ckpt / "adapter" / "adapter_config.json").exists() else ckpt
        if (loadable / "config.json").exists() or (loadable / "adapter_config.json").exists():
            found.append(loadable)
    if (run / "config.json").exists() or (run / "adapter_config.json").exists():
        found.append(run)
    return found


def perplexity_per_checkpoint(run_dir: str | Path, texts: Sequence[str] | None = None, *,
                              chats: Sequence[Conversation] | None = None, device: str | None = None,
                              dtype: str | None = None, batch_size: int | str = "auto",
                              max_length: int | None = None, stride: int | None = None,
                              progress: bool = True) -> list[ModelPerplexity]:
    """Perplexity of every checkpoint and the final model of a run (one model in memory at a time), on the
    texts or on the conversations (`chats`), as `perplexity` measures it."""
    from leakaudit.models import load_model

    # read once: a generator was read up by the first checkpoint, and the next had no texts
    texts, chats = _rows(texts, chats)
    dirs = model_dirs(run_dir)
    if not dirs:
        raise InputError("no model or checkpoint found in this dir", file=run_dir, field="--model")
    results = []
    for d in dirs:
        lm = load_model(str(d), device=device, dtype=dtype)
        results.append(_perplexity(lm, texts, chats, {"batch_size": batch_size, "max_length": max_length,
                                                      "stride": stride, "progress": progress, "cache": True}))
        del lm
    return results
