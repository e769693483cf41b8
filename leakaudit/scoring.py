"""The performance core: teacher-forced token statistics for many texts from batched forward passes.

For each text x = (x_1..x_T) (tokenised with the tokenizer's own special-token policy) it returns
  logp[t] = log p(x_t | x_<t)                   for every scored token,
and on request the Min-K%++ moments of the next-token distribution at the same positions,
  mu[t]  = E_{v~p(.|x_<t)} log p(v | x_<t),     var[t] = Var_{v~p(.|x_<t)} log p(v | x_<t).
Without a prefix the first token has no context and is not scored (T-1 scores); with a prefix
(ReCaLL, prompt/response) every text token is scored, conditioned on the prefix.

Why it is fast and lean:
- texts are sorted by length and packed into batches under a token budget (little padding);
- the backbone runs once per batch; the LM head runs only on real (non-padding) positions, in
  chunks, so the full T x V logits tensor never exists and nothing vocabulary-sized leaves the device;
- sequences that begin with the same tokens (an extraction template's 5-shot demonstrations, a ReCaLL
  prefix) run that prefix once: its keys and values are reused by every row of the group;
- results are cached on disk (SQLite), content-addressed by model fingerprint, options and text, so
  a rerun does no forward pass.
Texts longer than the window (`max_length`, default and at most the model's context) are scored with a
strided window: each window of `max_length` tokens advances by `stride` (default max_length // 2) and scores
only the tokens not scored before, each with at least max_length - stride tokens of context.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import inspect
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leakaudit.allocator import freed_memory_kept
from leakaudit.errors import InputError, check_model, check_texts
from leakaudit.models import (
    LoadedModel,
    attention_kernels,
    cache_dir,
    model_lock,
    scoring_attention,
    text_config,
)
from leakaudit.options import parse_batch_size
from leakaudit.warn import warn_once

# 2: rows after a shared prefix run on its cached keys/values; in bf16 that rounds differently (same numbers in
# fp32), so scores cached by version 1 are not mixed with new ones in one paired comparison. 3: on a CPU with 2+
# torch threads batches run on a share of the threads each (_batch_workers), which rounds differently in bf16. 4: in
# bf16 on a CPU attention runs in causal blocks on bf16 matmuls (models.cpu_attention), which rounds differently.
# 5: those blocks scale the queries, not the scores (bit for bit the same at head size 64, a power of two; other
# head sizes round differently). 6: soft-capped (Gemma 2/3) and logit-scaled (Cohere) models had their forward's
# transform applied to the hidden states and again to the logits: wrong log-probabilities; and a tokenizer that
# appends EOS itself had it scored as part of every text (models/tokens.py). Other models' numbers are unchanged,
# scored once more
SCORING_VERSION = 6
CPU_TOKEN_BUDGET = 8192
PROGRESS_MIN_TOKENS = 20000  # a pass scoring fewer tokens shows no progress (seconds of work)
MIN_CPU_TOKEN_BUDGET = 1024  # smaller batches when splitting work between batch workers, down to this
MAX_PADDING = 0.1  # padded positions per real token an auto-sized batch may carry (BENCHMARKS.md)
HEAD_CHUNK_ELEMENTS = 1 << 25  # logits elements per LM-head chunk (128 MiB in fp32)
# A bf16 head on a CPU writes its chunk at the bf16 matmul's speed, and a 64 MiB chunk outgrew the cache before the
# slices below read it: chunks of 16 MiB ran the head 1.4x faster (1 and 2 threads), with the same numbers.
# fp32 heads are compute-bound and keep the larger chunk (BENCHMARKS.md).
CPU_BF16_HEAD_CHUNK_ELEMENTS = 1 << 23
# On a CPU, log-softmax and the moments run over slices of a chunk's logits this size (4 MiB in fp32), which stay in
# cache across their several vocabulary-wide passes: same numbers, 4-6x faster than over the whole chunk (BENCHMARKS.md)
CPU_SOFTMAX_SLICE_ELEMENTS = 1 << 20
MIN_SHARED_PREFIX = 16  # tokens; a shorter shared prefix saves less than its own forward pass costs
CPU_BATCH_WORKERS = 2  # batches scored at once on a CPU, each on its share of the torch threads (BENCHMARKS.md)
#: seconds between the cache writes of a long pass: a kill loses at most this much scoring (it lost it all)
CACHE_SAVE_S = 30.0
#: batches per chunk of texts scored before the next (`_batches`): texts finish, and are stored, as the pass goes
CHUNK_BATCHES = 64


@dataclass
class TokenScores:
    """Teacher-forced statistics of one text (arrays are float32, one entry per scored token)."""

    logp: np.ndarray
    mu: np.ndarray | None = None
    var: np.ndarray | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.logp.shape[0])

    @property
    def sum_logp(self) -> float:
        return float(self.logp.astype(np.float64).sum())

    @property
    def mean_logp(self) -> float:
        """Mean token log-likelihood (= -NLL); NaN for a text with no scored token."""
        return float(self.logp.astype(np.float64).mean()) if self.n_tokens else float("nan")


@dataclass(frozen=True)
class ScoreOptions:
    """Everything besides model and text that changes the numbers (part of the cache key)."""

    max_length: int
    stride: int
    moments: bool
    dtype: str
    device: str = "cpu"  # the device type: a GPU's kernels round otherwise than a CPU's at the same dtype

    def key(self) -> str:
        parts = {"v": SCORING_VERSION, "L": self.max_length, "s": self.stride, "dtype": self.dtype}
        if self.device != "cpu":  # CPU keys stay as they were, so the caches users have stay valid
            parts["device"] = self.device
        return json.dumps(parts, sort_keys=True)


# ----------------------------------------------------------------------------------------- cache
class ScoreCache:
    """SQLite store of TokenScores keyed by sha256(model fingerprint, options, prefix, text).

    A cache is only an accelerator: a file that is not a readable database (cut short, overwritten) is moved
    aside to `scores.sqlite.corrupt` and rebuilt, and a row whose values cannot be scores (a cut blob,
    moments of another length, a positive or non-finite log p) is a miss, scored again and overwritten."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else cache_dir() / "scores.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            self._rebuild(exc)

    def _open(self) -> None:
        self._conn = sqlite3.connect(str(self.path), timeout=120)
        try:
            with contextlib.suppress(sqlite3.OperationalError):
                self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, logp BLOB NOT NULL,"
                               " mu BLOB, var BLOB)")
            self._conn.commit()
        except sqlite3.DatabaseError:
            self._conn.close()
            raise

    def _rebuild(self, exc: sqlite3.DatabaseError) -> None:
        """Move a broken file aside and start an empty one; re-raise an error that is not the file's content
        (OperationalError: locked, no disk space), which a new file would not mend."""
        if isinstance(exc, sqlite3.OperationalError):
            raise exc
        with contextlib.suppress(sqlite3.Error, AttributeError):
            self._conn.close()
        aside = self.path.with_name(self.path.name + ".corrupt")
        os.replace(self.path, aside)
        for extra in ("-wal", "-shm"):  # the write-ahead log of the broken file belongs to it
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path.with_name(self.path.name + extra))
        warn_once(f"score cache {self.path} was unreadable ({exc}): moved to {aside.name}, scoring again")
        self._open()

    @staticmethod
    def make_key(fingerprint: str, options: ScoreOptions, prefix: str | None, text: str) -> str:
        h = hashlib.sha256()
        for part in (fingerprint, options.key(), "\x00" if prefix is None else "P" + prefix, text):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))  # length-prefixed: no two (prefix, text) pairs share a key
            h.update(data)
        return h.hexdigest()

    def get_many(self, keys: Sequence[str], need_moments: bool) -> dict[str, TokenScores]:
        found: dict[str, TokenScores] = {}
        try:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start:start + 500])
                marks = ",".join("?" * len(chunk))
                for key, lp, mu, var in self._conn.execute(
                        f"SELECT key, logp, mu, var FROM scores WHERE key IN ({marks})", chunk):
                    if need_moments and mu is None:
                        continue
                    scores = _stored_scores(lp, mu, var)
                    if scores is None:
                        warn_once(f"score cache {self.path}: a row holds no valid scores; scoring its text again")
                        continue
                    found[key] = scores
        except sqlite3.DatabaseError as exc:
            self._rebuild(exc)
            return {}
        return found

    def put_many(self, items: Sequence[tuple[str, TokenScores]]) -> None:
        rows = [(k, s.logp.astype(np.float32).tobytes(),
                 None if s.mu is None else s.mu.astype(np.float32).tobytes(),
                 None if s.var is None else s.var.astype(np.float32).tobytes()) for k, s in items]
        try:
            self._conn.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)", rows)
            self._conn.commit()
        except sqlite3.DatabaseError as exc:
            self._rebuild(exc)
            self._conn.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)", rows)
            self._conn.commit()

    def close(self) -> None:
        self._conn.close()


def _stored_scores(lp: Any, mu: Any, var: Any) -> TokenScores | None:
    """A cache row's blobs as TokenScores, or None when they cannot be scores: bytes that are not whole
    float32s, moments of another length than log p (or only one of them), a log p above 0 or not finite, a
    negative variance."""
    if not isinstance(lp, bytes) or len(lp) % 4 or (mu is None) != (var is None):
        return None
    if mu is not None and not (isinstance(mu, bytes) and isinstance(var, bytes) and len(mu) == len(var) == len(lp)):
        return None
    logp = np.frombuffer(lp, dtype=np.float32).copy()
    m = None if mu is None else np.frombuffer(mu, dtype=np.float32).copy()
    v = None if var is None else np.frombuffer(var, dtype=np.float32).copy()
    if not np.isfinite(logp).all() or (logp > 1e-4).any() or (v is not None and (v < -1e-4).any()):
        return None
    return TokenScores(logp, m, v)


# ----------------------------------------------------------------------------------------- segments
@dataclass
class _Segment:
    text_index: int
    order: int  # window number within the text
    ids: list[int]
    first_scored: int  # index (in ids) of the first token to score; tokens first_scored..len-1 are scored


def _segments(index: int, ctx: list[int], ids: list[int], window: int, stride: int) -> list[_Segment]:
    """Split context+text into windows; each token of the text is scored exactly once."""
    seq = ctx + ids
    start_score = max(len(ctx), 1)
    if start_score >= len(seq):  # nothing to score (an empty or one-token text): no forward pass at all
        return []
    if len(seq) <= window:
        return [_Segment(index, 0, seq, start_score)]
    segs: list[_Segment] = []
    prev_end = 0
    begin = 0
    while True:
        end = min(begin + window, len(seq))
        first = max(prev_end, start_score)  # absolute position of the first new token to score
        if first < end:  # numbered by window, not by segment kept: a window after a context that did not fit
            segs.append(_Segment(index, begin // stride, seq[begin:end], first - begin))  # is a later one
        prev_end = end
        if end == len(seq):
            return segs
        begin += stride


def _batches(segs: list[_Segment], batch_size: int | None, token_budget: int) -> list[list[_Segment]]:
    """Length-sorted batches: a fixed number of sequences, or as many as fit the token budget (a row after a
    shared prefix counts it too: its attention spans it and its cache holds it) while padding stays within
    MAX_PADDING of the real tokens. Why the padding cap: on texts of mixed lengths a budget-only batch pads
    short rows to the longest one, and those positions cost as much as real ones (1.65x the real tokens on
    20-400-token texts at 8192).

    Texts go in chunks of about CHUNK_BATCHES batches, longest texts first, each chunk length-sorted within:
    a text is stored once all its windows are scored, and one length sort over every window put each long
    text's last, shorter window after all the full ones (a pass killed at 80% had stored 25 of 200 long texts)."""
    per_text: dict[int, list[_Segment]] = collections.defaultdict(list)
    for seg in segs:
        per_text[seg.text_index].append(seg)
    texts = sorted(per_text.values(), key=lambda t: (max(len(s.ids) for s in t), sum(len(s.ids) for s in t)),
                   reverse=True)
    widest = max((len(s.ids) for s in segs), default=1)
    chunk_tokens = CHUNK_BATCHES * (batch_size * widest if batch_size else token_budget)
    out: list[list[_Segment]] = []
    chunk: list[_Segment] = []
    tokens = 0  # in `chunk`, kept as it grows: summed anew per text it was quadratic in a chunk's texts
    for text in texts:
        chunk.extend(text)
        tokens += sum(len(s.ids) for s in text)
        if tokens >= chunk_tokens:
            out.extend(_length_sorted_batches(chunk, batch_size, token_budget))
            chunk, tokens = [], 0
    out.extend(_length_sorted_batches(chunk, batch_size, token_budget))
    return out


def _length_sorted_batches(segs: list[_Segment], batch_size: int | None, token_budget: int) -> list[list[_Segment]]:
    order = sorted(segs, key=lambda s: len(s.ids), reverse=True)
    out: list[list[_Segment]] = []
    cur: list[_Segment] = []
    real = 0
    for seg in order:
        if cur:
            padded = (len(cur) + 1) * len(cur[0].ids)
            full = (len(cur) >= batch_size if batch_size else
                    padded > token_budget or padded > (1 + MAX_PADDING) * (real + len(seg.ids)))
            if full:
                out.append(cur)
                cur, real = [], 0
        cur.append(seg)
        real += len(seg.ids)
    if cur:
        out.append(cur)
    return out


def shared_prefixes(segs: Sequence[Any]) -> list[tuple[int, list[Any]]]:
    """Group token sequences (anything with `.ids`: segments to score, prompts to sample) whose first tokens
    agree, at least MIN_SHARED_PREFIX of them: (common length, members) groups, and the rest in one group
    with common length 0."""
    groups: list[tuple[list[int], list[Any]]] = []
    common: list[int] = []
    members: list[Any] = []
    for seg in sorted(segs, key=lambda s: s.ids):  # sequences with a common start become neighbours
        if members:
            n = common_length(common, seg.ids)
            # join when the group's saving, (rows - 1) x common tokens, does not shrink
            if n >= MIN_SHARED_PREFIX and len(members) * n >= (len(members) - 1) * len(common):
                common = common[:n]
                members.append(seg)
                continue
            groups.append((common, members))
        common, members = seg.ids, [seg]
    if members:
        groups.append((common, members))

    def shared(c: list[int], m: list[Any]) -> bool:
        return len(m) > 1 and len(c) >= MIN_SHARED_PREFIX
    rest = [s for c, m in groups if not shared(c, m) for s in m]
    return [(len(c), m) for c, m in groups if shared(c, m)] + ([(0, rest)] if rest else [])


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many first tokens two sequences share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# ----------------------------------------------------------------------------------------- forward
@dataclass
class _Head:
    """The model's LM head, run by the engine on real positions only, and the soft-cap the model's forward
    puts on the head's output (`final_logit_softcapping`, Gemma 2/3), which the engine applies itself."""

    module: torch.nn.Module
    softcap: float | None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.module(hidden)

    @property
    def vocab(self) -> int | None:
        weight = getattr(self.module, "weight", None)
        return weight.shape[0] if weight is not None else None

    def fp32_logits(self, raw: torch.Tensor) -> torch.Tensor:
        """The head's output in fp32, soft-capped as the model's forward caps it."""
        logits = raw.float()
        return self.softcap * torch.tanh(logits / self.softcap) if self.softcap else logits


@contextlib.contextmanager
def _hidden_state_head(model):
    """Temporarily replace the LM head by identity so the forward returns final hidden states (one swap per
    scoring pass: its batches, on any worker, get the head passed in). What the forward does after its head
    then meets the hidden states: a scaling (Cohere's logit_scale, Granite's logits_scaling) gives there what
    it gives on the logits (a bias-free head is linear), but a soft-cap does not (tanh): the model's own cap is
    turned off for the pass and the engine caps the logits (`_Head`). Applying it twice scored Gemma 2 and
    Cohere models with wrong log-probabilities; `_check_head_path` compares with the model's own logits."""
    head = model.get_output_embeddings()
    owner, attr = None, None
    for mod in model.modules():
        for name, child in mod.named_children():
            if child is head:
                owner, attr = mod, name
                break
        if owner is not None:
            break
    if owner is None:
        raise RuntimeError("cannot locate the LM head of this model")
    config = text_config(model)  # a multimodal wrapper (Gemma 3n) reads its text model's config
    cap = getattr(config, "final_logit_softcapping", None)
    setattr(owner, attr, torch.nn.Identity())
    if cap:
        config.final_logit_softcapping = None
    try:
        yield _Head(head, cap or None)
    finally:
        setattr(owner, attr, head)
        if cap:
            config.final_logit_softcapping = cap


#: models whose head path `_check_head_path` has compared with their own logits in this process
_HEAD_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.inference_mode()
def _check_head_path(lm: LoadedModel) -> None:
    """Once per model: the engine's logits (hidden states, then the head and `_Head.fp32_logits`) against the
    model's own forward on a few tokens. An architecture whose forward treats its logits in a way the engine
    does not reproduce is refused in one line, never scored wrongly. In bf16 the model caps (or scales) its
    logits in bf16 and the engine in fp32: the two differ by the rounding of logits that large (0.09-0.16 nats
    for Gemma 2's cap of 30 at logits of 15-28), so the tolerance grows with them; the transform applied twice
    is off by more than a nat."""
    model = lm.model
    if model in _HEAD_CHECKED:
        return
    vocab = model.get_input_embeddings().num_embeddings  # test ids any embedding table holds
    ids = (torch.arange(1, 9) * 7919 % vocab)[None].to(lm.device)
    with attention_kernels(lm.device):
        logits = model(input_ids=ids, use_cache=False).logits.float()
        with _hidden_state_head(model) as head:
            got = torch.log_softmax(head.fp32_logits(head(model(input_ids=ids, use_cache=False).logits)), dim=-1)
    if not bool(torch.isfinite(logits).all()):  # not a head the engine misreads: "nan nats apart" said that
        raise InputError(f"{lm.spec}: its own forward gives NaN or infinite logits on a test input (weights that hold "
                         f"NaN or inf, or an overflow in {str(lm.dtype).removeprefix('torch.')}), so no score of it "
                         "would be a number", field="--model")
    gap = float((got - torch.log_softmax(logits, dim=-1)).abs().max())
    rounding = 2 * torch.finfo(lm.dtype).eps * float(logits.abs().max()) if lm.dtype != torch.float32 else 0.0
    if not gap <= max(1e-3 if lm.dtype == torch.float32 else 5e-2, rounding):
        raise InputError(f"{lm.spec}: its forward changes the logits after the LM head in a way the scoring engine "
                         f"does not reproduce (log-probabilities {gap:.3g} nats apart on a test input), so its scores "
                         "would be wrong", field="--model")
    _HEAD_CHECKED[model] = True


def cache_keyword(model) -> str:
    """The keyword of forward/generate for a key/value cache: `cache` (later transformers 5.x releases) or
    `past_key_values` (earlier ones)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def returned_cache(output):
    """The key/value cache a forward returned: `cache` (later transformers 5.x) or `past_key_values`."""
    return output.cache if hasattr(output, "cache") else output.past_key_values


@dataclass
class _Prefix:
    """A group's shared first tokens, run once: the keys and values of ids[:length] and the scores of tokens
    1..length (predicted at positions 0..length-1, the same in every row of the group)."""

    length: int
    cache: object
    scores: TokenScores

    def cut(self, seg: _Segment) -> tuple[_Segment, TokenScores | None]:
        """The row the batch runs (tokens from `length` on) and the prefix's part of the segment's scores."""
        row = _Segment(seg.text_index, seg.order, seg.ids[self.length:], max(seg.first_scored - self.length, 1))
        if seg.first_scored > self.length:
            return row, None
        s = self.scores
        part = slice(seg.first_scored - 1, self.length)
        return row, TokenScores(s.logp[part], None if s.mu is None else s.mu[part],
                                None if s.var is None else s.var[part])


@torch.inference_mode()
def _run_prefix(lm: LoadedModel, common: list[int], moments: bool, head) -> _Prefix:
    """One forward pass over a group's shared tokens. The cache holds all but the last common token, so every
    row still feeds at least one token (a row's first prediction then comes from its own pass)."""
    length = len(common) - 1
    ids = torch.tensor([common[:length]], dtype=torch.long, device=lm.device)
    positions = torch.arange(length, device=lm.device)[None]
    with attention_kernels(lm.device):
        out = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions,
                       use_cache=True)
        targets = torch.tensor(common[1:length + 1], dtype=torch.long, device=lm.device)
        lp, mu, var = _head_scores(head, out.logits[0], targets, moments)
    return _Prefix(length, returned_cache(out), TokenScores(lp, mu, var))


@torch.inference_mode()
def _score_batch(lm: LoadedModel, batch: list[_Segment], moments: bool, padding_side: str, prefix: _Prefix | None,
                 head) -> list[TokenScores]:
    """Scores of one batch through the LM `head` (swapped out of the model by `_hidden_state_head`); with
    `prefix`, the rows are cut to what follows it and run on its cache."""
    parts = [prefix.cut(seg) for seg in batch] if prefix else [(seg, None) for seg in batch]
    batch = [row for row, _ in parts]
    model, dev = lm.model, lm.device
    pad = lm.tokenizer.pad_token_id or 0
    width = max(len(s.ids) for s in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    offsets = []
    for row, seg in enumerate(batch):
        off = width - len(seg.ids) if padding_side == "left" else 0
        ids[row, off:off + len(seg.ids)] = torch.tensor(seg.ids)
        mask[row, off:off + len(seg.ids)] = 1
        offsets.append(off)
    # Explicit positions make left padding equivalent to right padding (each text starts at position 0,
    # or right after the shared prefix).
    start = prefix.length if prefix else 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0) + start
    past: dict[str, object] = {"use_cache": False}
    if prefix:
        cache = copy.deepcopy(prefix.cache)  # the forward appends the rows' keys and values to it
        cache.batch_repeat_interleave(len(batch))
        past = {cache_keyword(model): cache, "use_cache": True}
        mask = torch.cat([torch.ones((len(batch), start), dtype=torch.long), mask], dim=1)
    ids, mask, positions = ids.to(dev), mask.to(dev), positions.to(dev)
    with attention_kernels(dev):
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=positions, **past).logits
        # Position p predicts token p+1: take predicting positions first_scored-1 .. len-2.
        rows, cols = [], []
        for row, seg in enumerate(batch):
            off = offsets[row]
            span = range(off + seg.first_scored - 1, off + len(seg.ids) - 1)
            rows.extend([row] * len(span))
            cols.extend(span)
        r = torch.tensor(rows, dtype=torch.long, device=dev)
        c = torch.tensor(cols, dtype=torch.long, device=dev)
        h = hidden[r, c]  # (N, H): real positions only
        lp, mu_all, var_all = _head_scores(head, h, ids[r, c + 1], moments)
    out: list[TokenScores] = []
    pos = 0
    for seg, (_, before) in zip(batch, parts, strict=True):
        n = len(seg.ids) - seg.first_scored
        mine = TokenScores(lp[pos:pos + n], None if mu_all is None else mu_all[pos:pos + n],
                           None if var_all is None else var_all[pos:pos + n])
        out.append(mine if before is None else _concat([before, mine], moments))
        pos += n
    return out


def _head_scores(head: _Head, h: torch.Tensor, targets: torch.Tensor,
                 moments: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """log p(target) (and the Min-K%++ moments) from final hidden states `h` (N, H), through the LM head in
    chunks so the N x V logits never exist at once."""
    vocab = head.vocab or h.shape[-1]
    cpu = h.device.type == "cpu"
    size = CPU_BF16_HEAD_CHUNK_ELEMENTS if cpu and h.dtype == torch.bfloat16 else HEAD_CHUNK_ELEMENTS
    chunk = max(1, size // max(vocab, 1))
    # The matmul runs per chunk (the head's weights are read once per chunk); the memory-bound passes per slice.
    piece = max(1, CPU_SOFTMAX_SLICE_ELEMENTS // max(vocab, 1)) if cpu else chunk
    lp_parts, mu_parts, var_parts = [], [], []
    for first in range(0, h.shape[0], chunk):
        raw = head(h[first:first + chunk])
        for start in range(0, raw.shape[0], piece):
            logprobs = torch.log_softmax(head.fp32_logits(raw[start:start + piece]), dim=-1)
            at = first + start
            lp_parts.append(logprobs.gather(1, targets[at:at + logprobs.shape[0], None])[:, 0])
            if moments:  # in place where possible: these vocabulary-wide passes are memory-bound
                probs = logprobs.exp()
                mu = (probs * logprobs).sum(-1)
                # Two-pass variance: E[(lp - mu)^2] is stable where E[lp^2] - mu^2 cancels in fp32.
                centred = logprobs.sub_(mu[:, None])
                mu_parts.append(mu)
                var_parts.append(probs.mul_(centred).mul_(centred).sum(-1))
    empty = np.zeros(0, np.float32)

    def joined(parts: list[torch.Tensor]) -> np.ndarray:
        return torch.cat(parts).float().cpu().numpy() if parts else empty

    return joined(lp_parts), joined(mu_parts) if moments else None, joined(var_parts) if moments else None


def _env_token_budget() -> int | None:
    """LEAKAUDIT_TOKEN_BUDGET, checked before any scoring (also when every text is cached): int("abc") was a
    traceback, and 0 made every batch one text."""
    env = os.environ.get("LEAKAUDIT_TOKEN_BUDGET", "").strip()
    if not env:
        return None
    if not (env.isascii() and env.isdecimal()) or int(env) < 1:
        raise InputError(f"must be a whole number of tokens of at least 1, got {env!r}", field="LEAKAUDIT_TOKEN_BUDGET")
    return int(env)


def _token_budget(lm: LoadedModel, total: int, cached: bool = False) -> int:
    """Tokens per batch for `--batch-size auto`: sized to free memory on GPU (with each token's keys and values
    when the rows run on a shared prefix's cache: `cached`); on CPU a fixed budget, cut for batch workers so
    that `total` tokens make at least two batches per worker (not below MIN_CPU_TOKEN_BUDGET).
    Why: with fewer, uneven batches one worker runs the last, largest one alone on its share of the threads:
    the demo's 64 MIA texts made 3 batches of 1,853, 3,854 and 450 padded tokens at 8,192, and two workers
    scored them 0.87x as fast as one (fp32); at a budget of 1,400, 1.10x (BENCHMARKS.md)."""
    env = _env_token_budget()
    if env is not None:
        return env
    if lm.device.type == "cuda":
        from leakaudit.models import gpu_free_bytes, kv_cache_bytes_per_token

        free = gpu_free_bytes(lm.device)
        cfg = text_config(lm.model)
        hidden = getattr(cfg, "hidden_size", None) or 1024
        layers = getattr(cfg, "num_hidden_layers", None) or 24
        per_token = hidden * 4 * 24 + layers * 64  # activations of one layer at a time, generous
        if cached:  # the rows' cache holds every layer's keys and values of the prefix and of the rows
            per_token += kv_cache_bytes_per_token(lm.model, lm.dtype)
        return int(max(1024, min(262144, free * 0.5 // per_token)))
    workers = _cpu_workers(lm)
    if workers < 2:
        return CPU_TOKEN_BUDGET
    return min(CPU_TOKEN_BUDGET, max(MIN_CPU_TOKEN_BUDGET, -(-total // (2 * workers))))


def _tokenize(lm: LoadedModel, texts: Sequence[str], prefixes: Sequence[str | None]):
    from leakaudit.models.tokens import encode

    tok = lm.tokenizer
    if all(p is None for p in prefixes):
        return [[] for _ in texts], encode(tok, texts)
    ctx = [encode(tok, [p])[0] if p is not None else [] for p in prefixes]
    ids = [encode(tok, [t], special=p is None)[0] for t, p in zip(texts, prefixes, strict=True)]
    return ctx, ids


def fit_window(lm: LoadedModel, max_length: int | None) -> int:
    """The scoring window: `max_length`, default the model's context; a longer one is clamped to the context
    (one warning) since positions past it do not exist (OPT) or were never trained (RoPE). Long texts still
    get every token scored, by the strided window."""
    if max_length is None:
        return lm.max_length
    if max_length < 2:
        raise InputError("max length must be at least 2 tokens", field="--max-length")
    if max_length > lm.max_length:
        warn_once(f"--max-length {max_length} is longer than the context of {lm.spec} ({lm.max_length} tokens); "
                  f"scoring with windows of {lm.max_length}")
        return lm.max_length
    return max_length


def score_texts(
    lm: LoadedModel,
    texts: Sequence[str],
    *,
    prefixes: str | Sequence[str | None] | None = None,
    moments: bool = False,
    batch_size: int | str = "auto",
    max_length: int | None = None,
    stride: int | None = None,
    cache: bool | ScoreCache = True,
    progress: bool = True,
    description: str = "scoring",
    padding_side: str = "right",
) -> list[TokenScores]:
    """Score every text (optionally conditioned on a prefix) in batched, cached forward passes.

    `batch_size`: "auto" (token budget; env LEAKAUDIT_TOKEN_BUDGET overrides) or a number of sequences.
    `moments=True` also returns mu/var for Min-K%++. Results come back in input order.
    `padding_side` only matters for testing: both sides give the same numbers (explicit position ids).
    """
    check_model(lm)
    texts = check_texts(texts)
    if isinstance(prefixes, str) or prefixes is None:
        prefix_list: list[str | None] = [prefixes] * len(texts)
    else:
        prefix_list = list(prefixes)
        if len(prefix_list) != len(texts):
            raise ValueError("prefixes must match texts in length")
    batch_size = checked_batch_size(batch_size)
    options = _score_options(lm, max_length, stride, moments)

    fingerprint = lm.current_fingerprint()  # once: it walks every weight's version
    keys = [ScoreCache.make_key(fingerprint, options, p, t) for t, p in zip(texts, prefix_list, strict=True)]
    prefixed = any(p is not None for p in prefix_list)
    # a cached text's length, for the window warning: its scored tokens and the first; unknown after a prefix
    length = (lambda i, scores: None) if prefixed else (lambda i, scores: scores.n_tokens + 1)
    return _score_keyed(lm, keys, lambda todo: _tokenize(lm, [texts[i] for i in todo], [prefix_list[i] for i in todo]),
                        options, batch_size, cache, progress, description, padding_side, length, contexts=prefixed)


def _score_options(lm: LoadedModel, max_length: int | None, stride: int | None, moments: bool) -> ScoreOptions:
    """The window (default the model's context), its step (default half of it) and the rest of what changes
    the numbers, checked."""
    window = fit_window(lm, max_length)
    step = stride or max(1, window // 2)
    if step >= window and window == lm.max_length and window > 1:
        # the window is this model's whole context: the stride was meant for a longer one (a target's, when this
        # is a reference with a shorter context), and refusing it here would come after the target's pass
        warn_once(f"--stride {step} does not fit the {window}-token context of {lm.spec}: scoring it with "
                  f"stride {window // 2}")
        step = window // 2
    if not 0 < step < window:
        raise InputError(f"stride must be between 1 and max length - 1 ({window - 1})", field="--stride")
    return ScoreOptions(window, step, moments, str(lm.dtype).replace("torch.", ""), device=lm.device.type)


def checked_batch_size(batch_size: int | str) -> int | str:
    """`auto` or a positive number of sequences (options.parse_batch_size, the one rule), an InputError on
    `--batch-size` otherwise: for the scoring and sampling APIs, which are called with values no option model
    checked."""
    try:
        return parse_batch_size(batch_size)
    except ValueError as exc:
        raise InputError(str(exc), field="--batch-size") from None


#: where `_say_strided` leaves its counts instead of saying them: set by distributed's wrappers while this
#: process scores its shard; they say the warning once with every process's counts (`window_warning_of_all`)
_strided_counts: list[tuple] | None = None


def _say_strided(lm: LoadedModel, long: int, n_texts: int, window: int, step: int, contexts: bool = False,
                 counted: str | None = None) -> None:
    """Say once that `long` of `n_texts` texts did not fit the window: their later tokens are scored with a
    shorter context than the model could use on a shorter text, which a membership score of a long text then
    reflects. With `contexts` (a prompt or prefix before each text) it may be the context that did not fit.
    `counted` names what is counted where it is not texts (conversations)."""
    if _strided_counts is not None:
        _strided_counts.append((long, n_texts, window, step, contexts, counted))
        return
    if long:
        what = counted or ("texts with the context before them" if contexts else "texts")
        warn_once(f"{long} of {n_texts} {what} are longer than the {window}-token window of {lm.spec}: each is "
                  f"scored in windows advancing by {step} tokens (every token scored once, after at least "
                  f"{window - step} earlier tokens)", key=f"strided {window} {step} {what}")  # once per window


def score_ids(
    lm: LoadedModel,
    contexts: Sequence[Sequence[int]],
    ids: Sequence[Sequence[int]],
    *,
    moments: bool = False,
    batch_size: int | str = "auto",
    max_length: int | None = None,
    stride: int | None = None,
    cache: bool | ScoreCache = True,
    progress: bool = True,
    description: str = "scoring",
    rows: str | None = None,
) -> list[TokenScores]:
    """`score_texts` for sequences already tokenised: every token of `ids[i]` scored after `contexts[i]`
    (no special tokens added). Why: a prompt and a continuation tokenised apart (the continuation a sampler
    would emit after the prompt's tokens, a chat reply after its turns as the fine-tune tokenised them) can
    differ from the two texts tokenised together, where BPE merges across the boundary. `rows` names the
    sequences in the window warning where they are not texts ("conversations")."""
    if len(contexts) != len(ids):
        raise ValueError("contexts must match ids in length")
    batch_size = checked_batch_size(batch_size)
    options = _score_options(lm, max_length, stride, moments)
    space = lm.current_fingerprint() + "\x00ids"  # never a text key: a fingerprint holds no NUL
    keys = [ScoreCache.make_key(space, options, ",".join(map(str, c)), ",".join(map(str, x)))
            for c, x in zip(contexts, ids, strict=True)]
    return _score_keyed(lm, keys, lambda todo: ([list(contexts[i]) for i in todo], [list(ids[i]) for i in todo]),
                        options, batch_size, cache, progress, description, "right",
                        lambda i, scores: len(contexts[i]) + len(ids[i]), contexts=any(map(len, contexts)),
                        counted=rows)


def _score_keyed(lm: LoadedModel, keys: list[str], tokenized, options: ScoreOptions, batch_size: int | str,
                 cache: bool | ScoreCache, progress: bool, description: str,
                 padding_side: str, cached_length=lambda i, scores: None, contexts: bool = False,
                 counted: str | None = None) -> list[TokenScores]:
    """The cached, batched pass shared by `score_texts` and `score_ids`: `tokenized(indices)` gives the
    (context ids, ids) of the sequences not in the cache; `cached_length(i, scores)` the length (context and
    text) of a cached one where it is known, so that the window warning counts it as a rerun's first run did."""
    moments, window, step = options.moments, options.max_length, options.stride
    _env_token_budget()
    store: ScoreCache | None = None
    if cache is True:
        store = _open_cache()
    elif isinstance(cache, ScoreCache):
        store = cache
    results: dict[int, TokenScores] = {}
    if store is not None:
        hits = store.get_many(list(dict.fromkeys(keys)), moments)
        for i, k in enumerate(keys):
            if k in hits:
                results[i] = hits[k]
    todo_keys: dict[str, int] = {}
    for i, k in enumerate(keys):
        if i not in results and k not in todo_keys:
            todo_keys[k] = i  # identical (prefix, text) pairs are scored once
    todo = list(todo_keys.values())
    cached_lengths = [n for n in (cached_length(i, results[i]) for i in {k: i for i, k in enumerate(keys)
                                                                         if i in results}.values()) if n is not None]
    long_cached = sum(n > window for n in cached_lengths)
    if not todo:
        _say_strided(lm, long_cached, len(cached_lengths), window, step, contexts, counted)
    if todo:
        ctx, ids = tokenized(todo)
        segs: list[_Segment] = []
        for j, (c, x) in enumerate(zip(ctx, ids, strict=True)):
            segs.extend(_segments(j, c, x, window, step))
        _say_strided(lm, len({s.text_index for s in segs if s.order > 0}) + long_cached,
                     len(todo) + len(cached_lengths), window, step, contexts or any(ctx), counted)
        rows = batch_size if isinstance(batch_size, int) else None
        total = sum(len(s.ids) for s in segs)
        budgets = {cached: _token_budget(lm, total, cached) for cached in (False, True)}
        pieces: dict[int, list[tuple[int, TokenScores]]] = {j: [] for j in range(len(todo))}
        expected = collections.Counter(s.text_index for s in segs)  # a text longer than the window has several
        merged: dict[int, TokenScores] = {}
        unsaved: list[int] = []

        def finish(j: int) -> None:
            merged[j] = _concat([r for _, r in sorted(pieces[j], key=lambda x: x[0])], moments)
            unsaved.append(j)

        def save() -> None:
            if store is not None and unsaved:
                store.put_many([(keys[todo[j]], merged[j]) for j in unsaved])
            unsaved.clear()

        def save_on_the_way() -> None:
            """A save while scoring goes on is a kill's insurance, not the result: a cache that cannot be
            written now (locked, disk full) is said once, and the pass goes on (its end saves again)."""
            try:
                save()
            except sqlite3.Error as exc:
                warn_once(f"the score cache could not be written while scoring ({exc}); trying again at the end")

        plan = [(common, group, _batches(group, rows, budgets[common > 0])) for common, group in shared_prefixes(segs)]

        def jobs() -> Iterator[tuple[list[_Segment], _Prefix | None]]:
            for common, group, batches in plan:
                prefix = _run_prefix(lm, group[0].ids[:common], moments, head) if common else None
                for batch in batches:
                    yield batch, prefix

        def run(job: tuple[list[_Segment], _Prefix | None]) -> list[TokenScores]:
            return _score_batch(lm, job[0], moments, padding_side, job[1], head)

        pass_lock = model_lock(lm.model)
        pass_lock.acquire()  # the pass swaps the model's head, attention and mode: one pass at a time
        was_training = lm.model.training  # read under the lock: not another pass's eval mode
        lm.model.eval()
        try:
            _check_head_path(lm)
            # the bar counts the tokens scored, as the pass's result does (n_tokens); windows' context tokens,
            # which the budget counts, made a total of 1,189,736 for a pass that said "707000 tokens" at its end
            scored_total = sum(len(s.ids) - s.first_scored for s in segs)
            with (_progress(progress, description, scored_total) as advance, _hidden_state_head(lm.model) as head,
                  scoring_attention(lm.model, lm.device), freed_memory_kept(),
                  _batch_workers(lm, sum(len(b) for _, _, b in plan)) as (pool, workers)):
                saved_at = time.monotonic()
                for (batch, _), scored in _as_finished(pool, workers, run, jobs()):
                    for seg, res in zip(batch, scored, strict=True):
                        pieces[seg.text_index].append((seg.order, res))
                        if len(pieces[seg.text_index]) == expected[seg.text_index]:
                            finish(seg.text_index)
                    advance(sum(len(s.ids) - s.first_scored for s in batch))
                    if time.monotonic() - saved_at >= CACHE_SAVE_S:  # what a kill would otherwise lose
                        save_on_the_way()
                        saved_at = time.monotonic()
        except BaseException:
            save_on_the_way()  # Ctrl-C, SIGTERM or a failure: the texts finished since the last save are kept
            raise
        finally:
            lm.model.train(was_training)
            pass_lock.release()
        for j, i in enumerate(todo):
            if j not in merged:  # no segment at all
                finish(j)
            results[i] = merged[j]
        try:
            save()
        except sqlite3.OperationalError as exc:  # read-only, full, locked: the scores are computed, not kept
            warn_once(f"the score cache could not be written ({exc}); these scores are not cached")
    for i, k in enumerate(keys):  # duplicates of a text scored in this call
        if i not in results:
            results[i] = results[todo_keys[k]]
    if cache is True and store is not None:
        store.close()
    return [results[i] for i in range(len(keys))]


def _open_cache() -> ScoreCache | None:
    """The score cache, or None (with a warning) where it cannot be opened: a read-only or full cache dir (a
    team's shared one) made every scoring command fail with a traceback, though the cache only saves time."""
    try:
        return ScoreCache()
    except (OSError, sqlite3.OperationalError) as exc:
        warn_once(f"the score cache in {cache_dir()} cannot be used ({exc}): scoring without it")
        return None


@contextlib.contextmanager
def _batch_workers(lm: LoadedModel, n_batches: int):
    """(pool, workers): a pool that scores CPU_BATCH_WORKERS batches at once, each on its share of torch's
    threads; or (None, 1), one batch at a time on all of them, on an accelerator, with one thread or one batch.
    Why: on a 2-core CPU two batches on one thread each scored 1.07-1.29x faster than one batch on two threads
    (bench/batch_workers.py): a small model's pass is many small matmuls, attention and elementwise kernels
    that split poorly across threads. The last batch may run alone on its share; with many batches that costs
    little, and a single batch keeps every thread."""
    workers = min(_cpu_workers(lm), n_batches)
    if workers < 2:
        yield None, 1
        return
    # torch's thread count is the process's: passes in several threads lower it from one saved count, and the
    # last to end restores it (each restoring what it found left a count another pass had lowered)
    with _LOWERED_LOCK:
        if not _LOWERED["passes"]:
            _LOWERED["threads"] = torch.get_num_threads()
        _LOWERED["passes"] += 1
        share = max(1, _LOWERED["threads"] // workers)
        torch.set_num_threads(share)
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(share,)) as pool:
            yield pool, workers
    finally:
        with _LOWERED_LOCK:
            _LOWERED["passes"] -= 1
            if not _LOWERED["passes"]:
                torch.set_num_threads(_LOWERED["threads"])


_LOWERED_LOCK = threading.Lock()
_LOWERED = {"passes": 0, "threads": 0}  # passes holding torch's threads lowered; the count before the first


def _cpu_workers(lm: LoadedModel) -> int:
    """How many batches `_batch_workers` may score at once: CPU_BATCH_WORKERS on a CPU, up to one per thread."""
    threads = _LOWERED["threads"] if _LOWERED["passes"] else torch.get_num_threads()  # not another pass's share
    return min(CPU_BATCH_WORKERS, threads) if lm.device.type == "cpu" else 1


def _as_finished(pool: ThreadPoolExecutor | None, workers: int, fn, items: Iterable) -> Iterator[tuple[Any, Any]]:
    """(item, fn(item)) for every item, in order without a pool; with one, as they finish, drawing the next
    item only when one of the `workers` is free (so at most one batch per worker exists at a time)."""
    if pool is None:
        for item in items:
            yield item, fn(item)
        return
    running: dict[Any, Any] = {}
    for item in items:
        running[pool.submit(fn, item)] = item
        if len(running) >= workers:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield running.pop(future), future.result()
    for future in list(running):
        yield running.pop(future), future.result()


def _concat(parts: list[TokenScores], moments: bool) -> TokenScores:
    if not parts:
        return TokenScores(np.zeros(0, np.float32), np.zeros(0, np.float32) if moments else None,
                           np.zeros(0, np.float32) if moments else None)
    if len(parts) == 1:
        return parts[0]
    return TokenScores(np.concatenate([p.logp for p in parts]),
                       np.concatenate([p.mu for p in parts]) if moments else None,
                       np.concatenate([p.var for p in parts]) if moments else None)


@contextlib.contextmanager
def _progress(enabled: bool, description: str, total: int):
    """A rich progress bar over the tokens a pass scores (shown on stderr only for long work)."""
    if not enabled or total < PROGRESS_MIN_TOKENS:
        yield lambda n: None
        return
    from rich.progress import BarColumn, TextColumn, TimeRemainingColumn

    from leakaudit.progress import progress_bar

    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} tok"),
               TimeRemainingColumn()]
    with progress_bar(*columns, unit="tok") as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.update(task, advance=n)
