"""The neighbourhood attack: a text's loss against the loss of texts a masked language model makes from it by
swapping one word (or a piece of one); a conversation's, against the conversations with one word of one of its
assistant replies swapped.

Why: a low loss alone says the text is easy, not that it was trained on. Its neighbours are as easy (same
topic, same style, one word different), but only the text itself was fitted, so a member's loss sits below its
neighbours' and a non-member's does not. The neighbours calibrate the score without a reference model trained
on the same distribution (which `ref` needs and a user often lacks).

Mattern et al., "Membership Inference Attacks against Language Models via Neighbourhood Comparison", Findings
of ACL 2023: swaps proposed by a BERT-style masked LM with dropout on the swapped word's embedding (the word
stays in view, so the proposals fit it), each scored p(swap) / (1 - p(word)), the best n kept. As in their
code, a swap replaces one token; here it is spliced into the original text (decoding an uncased BERT's tokens
lowercased the whole neighbour) and keeps the token's kind (a word for a word, a piece for a piece).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import numpy as np
from pydantic import AfterValidator, Field

from leakaudit.attacks.base import Attack, AttackConfig, register
from leakaudit.attacks.mia import TooShortError, _need_tokens
from leakaudit.errors import InputError, first_line
from leakaudit.warn import warn_once

if TYPE_CHECKING:
    import torch


def _masked_lm_spec(spec: str | None) -> str:
    """A local model folder or hub id of a masked LM that loads without its own code or pickles."""
    from leakaudit.models.spec import check_masked_lm_spec

    if spec is None:  # nothing ships: none is small enough to carry, and a causal LM cannot propose in context
        raise ValueError("the neighbourhood attack needs a masked language model to propose its word swaps (e.g. "
                         "bert-base-uncased, the paper's, or a local model folder)")
    try:
        _fast_tokenizer(check_masked_lm_spec(spec))
    except InputError as exc:
        raise ValueError(f"{exc.file + ': ' if exc.file else ''}{exc.message}") from None
    return spec


def _fast_tokenizer(where: Path | str) -> Any:
    """The masked LM's tokenizer, a fast one: its character offsets place each swap in the original text."""
    from transformers import AutoTokenizer

    try:  # the tokenizers library raises a bare Exception for a tokenizer.json it cannot read
        tokenizer = AutoTokenizer.from_pretrained(str(where), trust_remote_code=False)
    except Exception as exc:
        raise InputError(f"cannot load the masked LM's tokenizer: {first_line(exc)}", file=str(where)) from None
    if not tokenizer.is_fast:
        raise InputError("the masked LM's tokenizer gives no character offsets (a slow tokenizer); save a fast one "
                         "(tokenizer.json) beside it", file=str(where))
    return tokenizer


class NeighbourhoodConfig(AttackConfig):
    model: Annotated[str | None, AfterValidator(_masked_lm_spec)] = Field(
        None, validate_default=True,
        description="masked language model that proposes the swaps: a local model folder or a hub id (e.g. "
                    "bert-base-uncased, the paper's)")
    n_neighbours: int = Field(25, ge=1, description="neighbours per text (the paper's best: 25 to 100)")
    per_position: int = Field(10, ge=1, description="swaps proposed at each word, before the best n are kept")
    dropout: float = Field(0.7, gt=0, lt=1, description="dropout on the swapped word's embedding (the paper's)")
    seed: int = Field(0, ge=0, description="seeds the dropout; the same for every text")
    max_length: int = Field(512, ge=2, description="masked-LM tokens per text: words past them are not swapped")


@dataclass
class MaskedLM:
    model: Any
    tokenizer: Any
    device: torch.device


#: (spec, device, folder's fingerprint) -> the loaded masked LM: every mia stage of a study loads the same one
_LOADED: dict[tuple[str, str, str], MaskedLM] = {}


def load_masked_lm(spec: str, device: torch.device) -> MaskedLM:
    """The masked LM in float32 (its proposals must not depend on the machine's bf16), safetensors only, without
    the model's own code."""
    import torch
    from transformers import AutoModelForMaskedLM

    from leakaudit.models import dir_fingerprint
    from leakaudit.models.load import _load_errors
    from leakaudit.models.spec import ENCODER_DECODER, check_masked_lm_spec

    where = check_masked_lm_spec(spec)
    key = (spec, str(device), dir_fingerprint(where) if isinstance(where, Path) else "")  # a folder saved again
    if key not in _LOADED:
        tokenizer = _fast_tokenizer(where)
        try:
            model = AutoModelForMaskedLM.from_pretrained(str(where), dtype=torch.float32, trust_remote_code=False,
                                                         use_safetensors=True)
        except _load_errors() as exc:
            raise InputError(f"cannot load the masked LM: {first_line(exc)}", file=str(where)) from None
        if model.config.is_encoder_decoder:  # a hub id: a folder's config was checked before loading
            raise InputError(ENCODER_DECODER.format(model.config.model_type), file=str(where))
        _LOADED[key] = MaskedLM(model.to(device).eval(), tokenizer, device)
    return _LOADED[key]


#: letters and digits (and `_`) of any script: what a swap may replace and replace it with
_WORD = re.compile(r"\w+")


def window(mlm: MaskedLM, max_length: int) -> int:
    """Tokens of a text the masked LM sees: `max_length`, at most what its positions hold (two kept free:
    RoBERTa's positions start after its padding index) and its tokenizer's limit."""
    positions = getattr(mlm.model.config, "max_position_embeddings", None) or max_length + 2
    return max(2, min(max_length, positions - 2, mlm.tokenizer.model_max_length))


def _swappable_span(text: str, start: int, end: int) -> tuple[int, int] | None:
    """The token's characters without the space a byte-level tokenizer counts in them ("Ġword"), if they are
    letters or digits: a word or a piece of one (the paper's code swaps any token), not punctuation."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if _WORD.fullmatch(text[start:end]) else None


def _cased(word: str, like: str, around: str) -> str:
    """`word` with the letter case of the word it replaces: an uncased BERT proposes "paris" for "London", a
    cased one "The" for "the" mid-sentence; a swap that also changes case changes the loss for two reasons.
    `around` is the whole word the replaced token is in: a piece of an all-caps word is upper case too ("DU|E"
    swapped at "E" or at "D" was "DUAmes" and "SomeUE")."""
    if (len(like) > 1 and like.isupper()) or (len(around) > 1 and around.isupper()):
        return word.upper()
    first = word[:1].upper() if like[:1].isupper() else word[:1].lower()
    return first + word[1:]


#: how tokenizers mark a token that starts a word after a space (byte-level BPE: "Ġword"; SentencePiece:
#: "▁word") and one that goes on a word (WordPiece: "##ing"): a swap keeps the token's kind, so a word stays a
#: word and a piece a piece ("quart|erly" does not become "quart erly")
_MARKS = ("Ġ", "▁", "##")


class Swap(NamedTuple):
    """One swap: `replacement` for the text's characters start:end (a word or a piece of one), scored p(swap) /
    (1 - p(token)) at the masked-LM token `position`. A span, not the new text, so that a conversation's
    neighbour can put it in the one reply it falls in."""

    score: float
    position: int
    start: int
    end: int
    replacement: str

    def apply(self, text: str) -> str:
        return text[:self.start] + self.replacement + text[self.end:]


def swaps(mlm: MaskedLM, text: str, *, n: int = 25, per_position: int = 10, dropout: float = 0.7, seed: int = 0,
          max_length: int = 512, batch_size: int = 32) -> list[Swap]:
    """Up to `n` swaps that each make a distinct text differing from `text` in one token, best first: at each
    token that is a word or a piece of one, the masked LM sees the text with dropout on that token's embedding;
    its `per_position` likeliest other tokens w of the same kind are each scored p(w) / (1 - p(token)); the `n`
    best over all tokens are kept (ties: the earlier token first)."""
    import torch

    tok = mlm.tokenizer
    ids, spans = _swappable_tokens(mlm, text, max_length)
    special = set(tok.all_special_ids)
    positions = list(spans)
    if not positions:
        return []
    embed = mlm.model.get_input_embeddings()
    generator = torch.Generator().manual_seed(seed)  # per text: its neighbours do not depend on the other texts
    with torch.no_grad():
        base = embed(torch.tensor([ids], device=mlm.device))[0]
        keep = (torch.rand(len(positions), base.shape[-1], generator=generator) >= dropout).to(base)
        keep = keep.to(mlm.device) / (1 - dropout)
        found: list[Swap] = []
        for lo in range(0, len(positions), batch_size):
            chunk = positions[lo:lo + batch_size]
            rows = base.unsqueeze(0).repeat(len(chunk), 1, 1)
            at = torch.arange(len(chunk), device=mlm.device)
            rows[at, chunk] = rows[at, chunk] * keep[lo:lo + len(chunk)]
            with _head_at(mlm.model, at, chunk):
                logits = mlm.model(inputs_embeds=rows, attention_mask=torch.ones(
                    rows.shape[:2], dtype=torch.long, device=mlm.device)).logits
            probs = torch.softmax((logits if logits.dim() == 2 else logits[at, chunk]).float(), dim=-1).cpu()
            for j, p in enumerate(chunk):
                found += _swaps(tok, text, spans[p], ids[p], probs[j], per_position, special, p)
    found.sort(key=lambda f: (-f.score, f.position))
    out: list[Swap] = []
    made: set[str] = set()
    for swap in found:
        new = swap.apply(text)
        if new not in made and new != text:
            made.add(new)
            out.append(swap)
            if len(out) == n:
                break
    return out


def neighbours(mlm: MaskedLM, text: str, **options: Any) -> list[str]:
    """The texts the best `swaps` (same options) make from `text`, best first."""
    return [swap.apply(text) for swap in swaps(mlm, text, **options)]


def chat_neighbours(mlm: MaskedLM, chat: list[dict[str, str]], **options: Any) -> list[list[dict[str, str]]]:
    """The conversations the best `swaps` (same options) make from `chat`, best first, each with one word (or
    piece) of one assistant reply swapped: proposed over the replies' text (`reply_text`, one per line), so the
    masked LM sees every reply around the word as it sees a text, then put in the reply it falls in. A swap is
    letters and digits, so it never takes the line break between two replies; the other turns are never swapped
    (the fine-tune had no loss on them: a neighbour differs from the conversation in what it fitted)."""
    from leakaudit.data.chat import reply_starts, reply_text

    starts = reply_starts(chat)
    out = []
    for swap in swaps(mlm, reply_text(chat), **options):
        k, at = next((k, at) for k, at in reversed(starts) if at <= swap.start)
        content = chat[k]["content"]
        new = content[:swap.start - at] + swap.replacement + content[swap.end - at:]
        out.append([{**m, "content": new} if i == k else m for i, m in enumerate(chat)])
    return out


def _swappable_tokens(mlm: MaskedLM, text: str, max_length: int) -> tuple[list[int], dict[int, tuple[int, int]]]:
    """The text's masked-LM token ids, and the characters of each token a swap may replace, by its position."""
    tok = mlm.tokenizer
    enc = tok(text, return_offsets_mapping=True, truncation=True, max_length=window(mlm, max_length))
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tok.all_special_ids)
    # a bare mark is a space, not a word: SentencePiece's "▁" before a text's first character ("▁", "東", "京")
    # has that character's offsets, and a word swapped there replaced "東"
    skip = {i for i, piece in enumerate(tok.convert_ids_to_tokens(ids)) if ids[i] in special or piece in _MARKS}
    shared = _sharing(offsets, skip)
    return ids, {i: span for i, (a, b) in enumerate(offsets) if i not in skip and i not in shared
                 and (span := _swappable_span(text, a, b)) is not None}


def _sharing(offsets: list[tuple[int, int]], skip: set[int]) -> set[int]:
    """Tokens that share a character with the token beside them: the bytes of a character a byte-level BPE
    vocabulary lacks ("鬱" is three tokens, each with the character's offsets). A swap there replaced the whole
    character, two or three tokens, for the masked LM's guess at one byte."""
    real = [i for i, (a, b) in enumerate(offsets) if b > a and i not in skip]
    return {k for i, j in pairwise(real) if offsets[j][0] < offsets[i][1] for k in (i, j)}


@contextmanager
def _head_at(model: Any, at: torch.Tensor, chunk: list[int]) -> Iterator[None]:
    """Row j's vocabulary logits at its position chunk[j] only: the masked LM's output layer (BERT's, RoBERTa's,
    DistilBERT's: `get_output_embeddings`) gets those rows' hidden states alone, so the model returns (rows,
    vocabulary) logits. Over every position it was a third of the masked LM's work (a 30k-50k-word vocabulary
    for each of a text's tokens, in each of its rows), for one position's use."""
    head = model.get_output_embeddings()
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _, args: (args[0][at, chunk], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _swaps(tok, text: str, span: tuple[int, int], original: int, probs, per_position: int, special: set[int],
           position: int) -> list[Swap]:
    """The `per_position` likeliest tokens of the original's kind other than it, each a swap of its span."""
    a, b = span
    word = text[a:b]
    lo, hi = a, b
    while lo > 0 and _WORD.fullmatch(text[lo - 1]):
        lo -= 1
    while hi < len(text) and _WORD.fullmatch(text[hi]):
        hi += 1
    p_original = float(probs[original])
    kind = _mark(tok.convert_ids_to_tokens(original))
    out: list[Swap] = []
    for p, cid in zip(*(x.tolist() for x in probs.topk(min(len(probs), per_position * 4 + len(special) + 1))),
                      strict=True):
        piece = tok.convert_ids_to_tokens(cid)
        if cid == original or cid in special or _mark(piece) != kind:
            continue
        new = piece[2:] if kind == "##" else tok.decode([cid]).strip()
        if not _WORD.fullmatch(new) or new.lower() == word.lower():
            continue
        out.append(Swap(p / max(1.0 - p_original, 1e-12), position, a, b, _cased(new, word, text[lo:hi])))
        if len(out) == per_position:
            break
    return out


def _mark(piece: str) -> str | None:
    return next((m for m in _MARKS if piece.startswith(m)), None)


class NoNeighbourError(TooShortError):
    """A text with no word the masked LM can swap: no neighbour, no score (named as a too-short text is)."""

    why = "has no word the masked LM can swap, so it has no neighbour to compare with"
    #: a conversation's words are its replies' alone: one whose user turns have words is still named
    chat_why = "has no word in its assistant replies the masked LM can swap, so it has no neighbour to compare with"


class UnscoredNeighboursError(TooShortError):
    """A text whose every neighbour is too short for the target to score a token of (one token, no BOS: a swap
    that merged its two tokens into one): the mean over no neighbour is no score."""

    why = "has only one-token neighbours, of which the target scores no token, so no neighbour's loss to compare with"


@register
class NeighbourhoodAttack(Attack):
    """neighbourhood = mean_j NLL(x̃_j) - NLL(x), over the n neighbours x̃_j of x (one word or word piece swapped
    each, proposed by a masked LM). A member was fitted and its neighbours were not, so its NLL sits below
    theirs: higher => member. One masked-LM row per word piece of a text, and one target pass over all
    neighbours (cached).

    On a conversation (format chat), NLL is over its assistant replies' tokens, each in its context (the shared
    pass), and each x̃_j is the conversation with one word of one reply swapped, proposed over the replies' text
    (one per line, the masked LM's context) and scored in its conversation alike: the fine-tune fitted the
    replies as they were, after the turns before them, and the user and system turns are never swapped.

    Mattern et al., "Membership Inference Attacks against Language Models via Neighbourhood Comparison",
    Findings of ACL 2023.
    """

    name = "neighbourhood"
    summary = ("how far the text's loss sits below the loss of texts one word away from it, which the model was "
               "not trained on")
    paper = "Mattern et al. 2023, Neighbourhood Comparison"
    Config = NeighbourhoodConfig

    def score(self, ctx):
        from leakaudit.attacks.base import scoring_pass
        from leakaudit.distributed import gather_floats, shard, world

        _need_tokens(ctx)
        cfg = self.config
        mlm = load_masked_lm(cfg.model, ctx.target.device)
        # a conversation's text is its replies' (`reply_text`, one per line): the masked LM proposes over it
        texts = ctx.texts
        why = None if ctx.chats is None else NoNeighbourError.chat_why
        mine = shard(len(texts))
        seen = window(mlm, cfg.max_length)
        # verbose=False: a text past the tokenizer's 512 is counted here, not run ("will result in indexing errors")
        over = sum(len(ids) > seen for ids in mlm.tokenizer(texts, truncation=False, verbose=False)["input_ids"])
        if over and ctx.chats is None:
            warn_once(f"neighbourhood: {over} of {len(texts)} texts are longer than the masked LM's {seen}-token "
                      "window; only their first tokens are swapped (their loss is still the whole text's)")
        elif over:
            warn_once(f"neighbourhood: {over} of {len(texts)} conversations have replies longer together (one per "
                      f"line) than the masked LM's {seen}-token window; only their first tokens are swapped (their "
                      "loss is still every reply's)")
        # every process checks every text, before any proposes: a process raising on a text of its shard while
        # the others waited in the gather below left them to the launcher's kill, and a single process met the
        # text only after proposing for all before it (hours for a thousand texts on a CPU)
        for i, text in enumerate(texts):
            if not _swappable_tokens(mlm, text, cfg.max_length)[1]:
                raise NoNeighbourError(i, why)
        options = {**ctx.score_options}
        progress = options.pop("progress", True) and world()[0] == 0
        found = (_propose(mlm, neighbours, texts, mine, cfg, progress, "texts") if ctx.chats is None else
                 _propose(mlm, chat_neighbours, ctx.chats, mine, cfg, progress, "conversations"))
        # a text with swappable words the masked LM proposed nothing for: every process raises the same error
        none = gather_floats([float(not made) for made in found], len(texts))
        if none.any():
            raise NoNeighbourError(int(np.flatnonzero(none)[0]), why)
        flat = [t for made in found for t in made]
        # this process's neighbours alone (`local`): each process proposed for its own shard
        rows = {"texts": flat} if ctx.chats is None else {"chats": flat}
        scored = scoring_pass(ctx.target, **rows, name="neighbours", local=True, progress=progress, **options)
        local, pos = [], 0
        for i, made in zip(mine, found, strict=True):
            # a neighbour of which the target scores no token says nothing of its loss and is left out; a text
            # with no other (NaN here: the mean of nothing) is named after the gather, by every process alike
            nll = [-s.mean_logp for s in scored[pos:pos + len(made)] if s.n_tokens]
            pos += len(made)
            local.append(float(np.mean(nll)) + ctx.target_scores[i].mean_logp if nll else float("nan"))
        scores = gather_floats(local, len(texts))
        if np.isnan(scores).any():
            raise UnscoredNeighboursError(int(np.flatnonzero(np.isnan(scores))[0]))
        return scores


def _propose(mlm: MaskedLM, make: Callable[..., list], items: list, mine: list[int], cfg: NeighbourhoodConfig,
             progress: bool, unit: str) -> list[list]:
    """`make`'s neighbours of items[i] for each i in `mine` (texts, or conversations: `chat_neighbours`), with a bar:
    one masked-LM pass per token of each is minutes for a thousand texts on a CPU (a killed run proposes again,
    the same; their scores are cached)."""
    from leakaudit.progress import counting

    found: list[list] = []
    with counting(progress, "proposing neighbours", len(mine), unit=unit) as advance:
        for i in mine:
            found.append(make(mlm, items[i], n=cfg.n_neighbours, per_position=cfg.per_position, dropout=cfg.dropout,
                              seed=cfg.seed, max_length=cfg.max_length))
            advance(1)
    return found
