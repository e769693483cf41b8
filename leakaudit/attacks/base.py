"""The attack contract and registry: each attack is a small class with a typed config and one method,
`score(ctx) -> one number per text, higher => member`, computed from scoring passes shared in a context.

Why a shared context: loss, zlib, min_k and min_k_pp all read the same teacher-forced pass (with the
Min-K%++ moments), so running all of them costs one forward pass; the context computes each pass at most
once, and the scoring engine caches it on disk.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from leakaudit.errors import InputError
from leakaudit.options import numbers_are_not_booleans

if TYPE_CHECKING:  # the registry (names, papers, summaries) is read by the report, which needs no torch
    from leakaudit.models import LoadedModel
    from leakaudit.scoring import TokenScores


class AttackConfig(BaseModel):
    """Options of one attack; unknown options are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    _numbers_are_not_booleans = field_validator("*", mode="before")(numbers_are_not_booleans)


class TooShortError(InputError):
    """A text with no scored token (a single token without a BOS): no score can be defined. `index` is its
    place among the scored texts; `run_mia` adds `role` ('members' or 'nonmembers') and `row` (its index in
    that input list) so a front end can name the file and line."""

    why = "has fewer than 2 tokens, so no token can be scored"

    def __init__(self, index: int, why: str | None = None):
        if why is not None:  # another reason the text cannot be scored (the instance's, not the class's)
            self.why = why
        self.index = index
        self.role: str | None = None
        self.row: int | None = None
        super().__init__(f"text #{index + 1} {self.why}")

    @classmethod
    def under(cls, index: int, model: str) -> TooShortError:
        """A text the target scores but a reference model's own tokenizer makes one token: which model, since
        the same text scored under the target ('has fewer than 2 tokens' alone read as false)."""
        return cls(index, f"has fewer than 2 tokens under the tokenizer of {model} (under the target's it has "
                          "more), so that model scores no token of it")


class UnrenderableChatError(TooShortError):
    """A conversation a model's chat template refuses (Gemma's "System role not supported") or renders other
    than turn by turn: its reply cannot be scored as the fine-tune trained on it. Named as a too-short text is."""

    def __init__(self, index: int, model: str, reason: str):
        super().__init__(index, f"cannot be scored with {model}: {reason}")


@dataclass
class ScoringContext:
    """The texts under attack, the models, and scoring passes computed once and shared by all attacks."""

    target: LoadedModel
    texts: list[str]
    reference: LoadedModel | None = None
    moments: bool = True
    score_options: dict[str, Any] = field(default_factory=dict)  # batch_size, max_length, stride, cache, progress
    #: the conversations under attack (format chat), or None for plain texts: `texts` are then their replies'
    #: contents (`reply_text`), and each reply is scored as the fine-tune trained on it, in its conversation
    #: (`chat_rows`)
    chats: list[list[dict[str, str]]] | None = None
    #: loads a model an attack's options name (lira's references) as the run loads its own (device, dtype,
    #: pickle rule); None: `load_model` on the target's device and dtype
    load: Callable[[str], LoadedModel] | None = None
    _passes: dict[tuple, list[TokenScores]] = field(default_factory=dict, repr=False)
    #: spec -> fingerprint of each model `reference_scores` loaded (lira tells the target and copies apart)
    reference_fingerprints: dict[str, str] = field(default_factory=dict, repr=False)

    def scores(self, model: str = "target", change: Callable[[str], str] | None = None,
               prefix: str | Sequence[list[dict[str, str]]] | None = None,
               moments: bool | None = None) -> list[TokenScores]:
        """Token scores of the texts under attack under the target or reference model, each text first passed
        through `change` (a variant: `str.lower`); with conversations, each reply's content is, and the replies
        are scored in context. `prefix`: a text before each text, or with conversations, conversations put before
        each as its earlier turns (`scoring_pass`)."""
        lm = self.target if model == "target" else self.reference
        if lm is None:
            raise InputError("this attack needs a reference model", field="--reference")
        want = self.moments if moments is None else moments
        key = (model, change, _prefix_key(prefix))
        have = self._passes.get(key)
        if have is None or (want and have and have[0].mu is None):
            have = self._pass(lm, change, prefix, want, model)
            self._passes[key] = have
        return have

    def _pass(self, lm: LoadedModel, change: Callable[[str], str] | None,
              prefix: str | Sequence[list[dict[str, str]]] | None, moments: bool, name: str) -> list[TokenScores]:
        if self.chats is not None:
            from leakaudit.data.chat import with_replies

            return scoring_pass(lm, chats=[with_replies(c, change) for c in self.chats], prefix=prefix,
                                moments=moments, name=name, **self.score_options)
        texts = self.texts if change is None else [change(t) for t in self.texts]
        return scoring_pass(lm, texts, prefix=prefix, moments=moments, name=name, **self.score_options)

    def scored_ids(self) -> list[list[int]]:
        """The token ids of what the target's shared pass scored, as the engine encodes them (a text alone with
        its BOS; a conversation's replies, one after another, without their contexts): an attack that weighs
        tokens by id reads the scores' last n_tokens of each."""
        from leakaudit.models.tokens import encode

        tok = self.target.tokenizer
        if self.chats is None:
            return encode(tok, self.texts)
        _, replies, owners = chat_rows(tok, self.chats)
        return [[t for j in spans for t in replies[j]] for spans in conversation_spans(owners, len(self.chats))]

    def reference_scores(self, spec: str, name: str) -> list[TokenScores]:
        """Token scores of the texts under attack under the model `spec` (no moments), through the same cached,
        batched and sharded engine: the model is loaded for this pass and released after it, so an attack that
        reads several (lira) never holds more than one of them. `name` labels the progress bar."""
        import gc

        key = (f"spec:{spec}", None, None)
        if key not in self._passes:
            if self.load is None:
                from leakaudit.models import load_model

                lm = load_model(spec, device=str(self.target.device), dtype=self.target.dtype)
            else:
                lm = self.load(spec)
            self._passes[key] = self._pass(lm, None, None, False, name)
            self.reference_fingerprints[spec] = lm.current_fingerprint()
            del lm
            gc.collect()  # its weights go now, before the next one loads
        return self._passes[key]

    @property
    def target_scores(self) -> list[TokenScores]:
        """The one shared pass of the target model over the texts (with moments when any attack needs them)."""
        return self.scores("target")


def _prefix_key(prefix: str | Sequence[list[dict[str, str]]] | None) -> str | tuple | None:
    """A pass's prefix as a key of `ScoringContext._passes`: a text, or its conversations' (role, content)s."""
    if prefix is None or isinstance(prefix, str):
        return prefix
    return tuple(tuple((m["role"], m["content"]) for m in chat) for chat in prefix)


def scoring_pass(lm: LoadedModel, texts: Sequence[str] | None = None,
                 chats: Sequence[list[dict[str, str]]] | None = None, *,
                 prefix: str | Sequence[list[dict[str, str]]] | None = None,
                 moments: bool = False, name: str = "target", local: bool = False,
                 **score_options: Any) -> list[TokenScores]:
    """One cached, batched (and, under a launcher, sharded) scoring pass of `lm`: over the texts, or over the
    conversations (`chats`, which then carry their own contents: `texts` is not read) at their replies, each in
    its context as a chat fine-tune tokenised it (`chat_rows`), one TokenScores per conversation (its replies'
    tokens in order). The one place both kinds of row go through, for every attack and user inference.

    `prefix`: for texts, a text before each (or one per text); for conversations, conversations put before each
    as its earlier turns (`after_prefix`, ReCaLL's P), its replies' tokens still the ones scored: the prefix's
    replies are context. The score cache keys a row by its token ids, so a prefixed row never reads a plain one.

    A conversation is one row of the engine: everything after the context of its first reply, scored in one
    pass (each token after all before it, as in training), of which the replies' tokens are kept; scoring each
    reply as a row of its own costs a pass over the conversation so far per reply (1.7x the time in fp32, 2.5x
    in bf16 for three replies on the default model; bench/chat_rows.py, BENCHMARKS.md).

    `local`: this process's rows alone, not sharded across launched processes: rows each process made for its own
    shard (the neighbourhood's neighbours), which the others do not hold."""
    from leakaudit.distributed import score_ids_distributed, score_texts_distributed
    from leakaudit.scoring import TokenScores, score_ids, score_texts

    score_texts_pass, score_ids_pass = (score_texts, score_ids) if local else (score_texts_distributed,
                                                                               score_ids_distributed)
    if chats is None:
        if texts is None:
            raise ValueError("scoring_pass needs texts or chats")
        return score_texts_pass(lm, list(texts), prefixes=prefix, moments=moments, description=f"scoring ({name})",
                                **score_options)
    if isinstance(prefix, str):  # a text cannot be put in a conversation: its prefix is conversations
        raise InputError("a conversation's prefix is conversations (its earlier turns), not a text", field="prefix")
    contexts, replies, owners = chat_rows(lm.tokenizer, chats, model=lm.spec, prefix=prefix)
    spans = conversation_spans(owners, len(chats))
    rows = [i for i in range(len(chats)) if spans[i]]
    firsts = [contexts[spans[i][0]] for i in rows]
    rests = [(contexts[spans[i][-1]] + replies[spans[i][-1]])[len(first):] for i, first in zip(rows, firsts,
                                                                                              strict=True)]
    # with a prefix it is the prefix and the conversation together that may not fit: said so, not that the
    # conversations are longer than the window
    what = "conversations" if not prefix else "conversations with the prefix conversations before them"
    scored = score_ids_pass(lm, firsts, rests, moments=moments, description=f"scoring ({name})", rows=what,
                            **score_options)
    empty = np.zeros(0, np.float32)
    out = [TokenScores(empty, empty if moments else None, empty if moments else None) for _ in chats]
    for i, first, s in zip(rows, firsts, scored, strict=True):
        start = max(len(first), 1)  # the engine scores the tokens from here on (the first has no context)
        keep = np.array([p - start for j in spans[i] for p in range(len(contexts[j]), len(contexts[j]) +
                                                                      len(replies[j])) if p >= start], dtype=int)
        out[i] = TokenScores(s.logp[keep], None if s.mu is None else s.mu[keep], None if s.var is None else
                             s.var[keep])
    return out


def chat_training_notes(target: LoadedModel, chats: Sequence[list[dict[str, str]]]) -> list[str]:
    """What a run on a chat fine-tune's folder (its finetune_config.json) says where the scored tokens are not
    the tokens it trained on: conversations longer than its max_length (`finetune` cut each, so the later
    replies of a longer one were cut or not trained on at all, yet are scored whole: a member that reads as a
    non-member), and a fine-tune with loss on every turn (`--loss-on all`: its user turns were trained on too,
    and only the replies are scored)."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(target.spec) / "finetune_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not a fine-tune's folder (a hub id, a merged or copied model): unknown
        return []
    if not isinstance(config, dict) or config.get("format") != "chat":
        return []
    notes = []
    if config.get("loss_on") == "all":
        notes.append("the chat fine-tune trained on every turn (loss_on all); the scores read its assistant replies "
                     "only, a part of what it trained on")
    limit = config.get("max_length")
    if isinstance(limit, int):
        contexts, replies, owners = chat_rows(target.tokenizer, chats, model=target.spec)
        if over := sum(n > limit for n in conversation_lengths(contexts, replies, owners, len(chats))):
            notes.append(f"{over} of {len(chats)} conversations are longer than the {limit} tokens the chat "
                         "fine-tune trained on (its max_length): their later replies were cut or not trained on, "
                         "and are scored whole")
    return notes


def conversation_spans(owners: Sequence[int], n: int) -> list[list[int]]:
    """For each of `n` conversations, the indices of its replies in `chat_rows`' lists, in order."""
    spans: list[list[int]] = [[] for _ in range(n)]
    for j, owner in enumerate(owners):
        spans[owner].append(j)
    return spans


def conversation_lengths(contexts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]],
                         owners: Sequence[int], n: int) -> list[int]:
    """Each conversation's tokens up to the end of its last reply (its last reply's context holds all before):
    what a fine-tune's max_length or a scoring window is compared with. 0 for one with no reply to score."""
    return [len(contexts[s[-1]]) + len(replies[s[-1]]) if s else 0 for s in conversation_spans(owners, n)]


def chat_rows(tokenizer: Any, chats: Sequence[list[dict[str, str]]], model: str = "the target",
              prefix: Sequence[list[dict[str, str]]] | None = None,
              ) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """(context ids, reply ids, conversation index) of every reply to score, conversation by conversation: each
    rendered by this model's chat template and tokenised as a chat fine-tune does (each model its own: a
    reference's template may differ), a reply's trained tokens after all that comes before them. A conversation
    the template refuses is named (`UnrenderableChatError`), not a traceback.

    With `prefix` (conversations), each conversation is rendered after them as one conversation (`after_prefix`)
    and only its own replies are kept, their contexts holding the prefix: their ids must be the ids of the
    conversation rendered alone (a template that renders a turn by its place, or merges tokens across the
    boundary, is named as one that refuses it), so that both passes score the same tokens."""
    from leakaudit.data.chat import after_prefix, with_replies
    from leakaudit.train.examples import replies_in_context

    contexts: list[list[int]] = []
    replies: list[list[int]] = []
    owners: list[int] = []
    for i, chat in enumerate(chats):
        try:
            spans = replies_in_context(tokenizer, with_replies(chat))
            if prefix is not None:
                joined = replies_in_context(tokenizer, after_prefix(list(prefix), with_replies(chat)))
                mine = joined[len(joined) - len(spans):] if len(joined) >= len(spans) else []
                if [r for _, r in mine] != [r for _, r in spans]:
                    raise ValueError("its replies are tokenised otherwise after the prefix conversations")
                spans = mine
        except ValueError as exc:  # the template refused it, or does not render turns as prefixes
            raise UnrenderableChatError(i, model, str(exc)) from None
        for context, reply in spans:
            contexts.append(context)
            replies.append(reply)
            owners.append(i)
    return contexts, replies, owners


class Attack:
    """Base class: subclasses set `name`, `paper`, `summary`, optionally `Config`, `needs_reference` and
    `needs_moments`, implement `score` (one float per text of `ctx.texts`, higher => member, read from the
    context's shared passes) and register with `@register`. docs/architecture.md, "Adding a membership-inference
    score", lists the docs and tests a new attack takes."""

    name: ClassVar[str]
    paper: ClassVar[str]
    summary: ClassVar[str] = ""  # one plain line for the report's reader: what the score measures (higher => member)
    needs_reference: ClassVar[bool] = False
    needs_moments: ClassVar[bool] = False
    #: whether it scores conversations (format chat) through the context's passes; False for an attack that
    #: scores texts its own way (a prefix of its own, its own forward passes), refused with conversations (every
    #: attack here scores them)
    scores_chats: ClassVar[bool] = True
    Config: ClassVar[type[AttackConfig]] = AttackConfig

    def __init__(self, config: AttackConfig | None = None):
        self.config = config if config is not None else self.Config()

    def score(self, ctx: ScoringContext) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


ATTACKS: dict[str, type[Attack]] = {}


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator adding an attack to the registry under its `name`."""
    if cls.name in ATTACKS:
        raise RuntimeError(f"attack '{cls.name}' registered twice")
    ATTACKS[cls.name] = cls
    return cls


def unknown_attack_message(name: str) -> str:
    """"unknown attack 'mink'; did you mean 'min_k'? valid attacks: ..." (every front end says the same)."""
    close = difflib.get_close_matches(name, list(ATTACKS), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ";"
    return f"unknown attack '{name}'{hint} valid attacks: {', '.join(ATTACKS)}"


def get_attack(name: str, **config: Any) -> Attack:
    """An attack by name with validated options; unknown names and bad options are InputErrors (field: the
    option's name inside the attack's config). The registry is filled by importing `leakaudit.attacks`,
    which every import of this module does first."""
    if name not in ATTACKS:
        raise InputError(unknown_attack_message(name), field="attacks")
    cls = ATTACKS[name]
    try:
        return cls(cls.Config(**config))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or name
        raise InputError(f"attack '{name}': {err['msg'].removeprefix('Value error, ')}", field=loc) from None
