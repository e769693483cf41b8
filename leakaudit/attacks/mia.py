"""Membership inference attacks on text and `run_mia`, which scores members and non-members with each.

Every score is oriented so that higher => member. Notation for a text x tokenised as x_1..x_T:
log p(x_t | x_<t) is the target's token log-probability over the scored tokens (all but an unconditioned
first token), NLL(x) = -mean_t log p(x_t | x_<t).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from leakaudit.attacks.base import (
    ATTACKS,
    Attack,
    AttackConfig,
    ScoringContext,
    TooShortError,
    chat_rows,
    chat_training_notes,
    conversation_lengths,
    conversation_spans,
    get_attack,
    register,
)
from leakaudit.errors import InputError
from leakaudit.metrics import RocMetrics, roc_metrics
from leakaudit.models.tokens import encode
from leakaudit.warn import warn_once

if TYPE_CHECKING:
    from leakaudit.models import LoadedModel

REFERENCE_FREE = ("loss", "zlib", "min_k", "min_k_pp")


def _lowest_k_mean(values: np.ndarray, k: float) -> float:
    """Mean of the max(1, floor(k*T)) smallest of T values (floor of the product as written: 0.29 * 100 is
    28.999999999999996 in floating point, and int() of it took 28 values, not 29)."""
    n = max(1, math.floor(k * len(values) + 1e-9))
    return float(np.sort(values.astype(np.float64))[:n].mean())


def _need_tokens(ctx: ScoringContext) -> None:
    for i, s in enumerate(ctx.target_scores):
        if s.n_tokens == 0:
            raise TooShortError(i)


@register
class LossAttack(Attack):
    """loss = -NLL(x) = mean_t log p(x_t | x_<t). Members were fit, so their loss is lower (score higher).

    Yeom et al., "Privacy Risk in Machine Learning", CSF 2018.
    """

    name = "loss"
    summary = "the text's mean token log-probability: members were fit, so it is higher"
    paper = "Yeom et al. 2018, Privacy Risk in Machine Learning"

    def score(self, ctx):
        _need_tokens(ctx)
        return np.array([s.mean_logp for s in ctx.target_scores])


@register
class ZlibAttack(Attack):
    """zlib = -NLL(x) / len(zlib.compress(utf-8 bytes of x)): loss calibrated by how compressible the text is,
    so trivially predictable (repetitive) text does not look like a member. Higher => member.

    Carlini et al., "Extracting Training Data from Large Language Models", USENIX Security 2021.
    """

    name = "zlib"
    summary = ("the mean token log-probability per byte of the zlib-compressed text: loss calibrated by how "
               "compressible the text is")
    paper = "Carlini et al. 2021, Extracting Training Data from Large Language Models"

    def score(self, ctx):
        _need_tokens(ctx)
        return np.array([s.mean_logp / len(zlib.compress(t.encode("utf-8")))
                         for s, t in zip(ctx.target_scores, ctx.texts, strict=True)])


class MinKConfig(AttackConfig):
    k: float = Field(0.2, gt=0, le=1, description="fraction of lowest-scoring tokens averaged")


@register
class MinKAttack(Attack):
    """min_k = mean of the max(1, floor(k*T)) lowest token log-probs log p(x_t | x_<t) (k = 0.2).
    Non-members contain a few very unlikely tokens; members rarely do. Higher => member.

    Shi et al., "Detecting Pretraining Data from Large Language Models", ICLR 2024.
    """

    name = "min_k"
    summary = ("the mean log-probability of the text's least likely tokens (the lowest k = 20% by default): a member "
               "has few very unlikely tokens")
    paper = "Shi et al. 2024, Detecting Pretraining Data from Large Language Models (Min-K%)"
    Config = MinKConfig

    def score(self, ctx):
        _need_tokens(ctx)
        return np.array([_lowest_k_mean(s.logp, self.config.k) for s in ctx.target_scores])


@register
class MinKPlusPlusAttack(Attack):
    """min_k_pp = mean of the lowest max(1, floor(k*T)) values of z_t = (log p(x_t|x_<t) - mu_t) / sigma_t,
    where mu_t and sigma_t^2 are the mean and variance of log p(v|x_<t) for v ~ p(.|x_<t). Members sit at
    local maxima of the likelihood, so their tokens score high relative to the model's own distribution.
    Higher => member. (sigma_t is floored at 1e-6.)

    Zhang et al., "Min-K%++: Improved Baseline for Detecting Pre-Training Data from LLMs", ICLR 2025.
    """

    name = "min_k_pp"
    summary = ("min_k over each token's log-probability standardised by the mean and spread of the model's own "
               "predictions at that position")
    paper = "Zhang et al. 2025, Min-K%++"
    needs_moments = True
    Config = MinKConfig

    def score(self, ctx):
        _need_tokens(ctx)
        out = []
        for s in ctx.target_scores:
            if s.mu is None or s.var is None:
                raise RuntimeError("min_k_pp needs the scoring pass with moments")
            sigma = np.sqrt(np.maximum(s.var.astype(np.float64), 1e-12))
            out.append(_lowest_k_mean((s.logp - s.mu) / sigma, self.config.k))
        return np.array(out)


@register
class ReferenceAttack(Attack):
    """ref = NLL_ref(x) - NLL_target(x): how much more the target likes x than a reference model that did not
    see it, which removes the intrinsic difficulty of x. Each model scores the text with its own tokenizer
    (per-token means), so target and reference may differ in vocabulary. Higher => member.

    Carlini et al. 2021 (reference-model comparison); Mireshghallah et al., "Quantifying Privacy Risks of
    Masked Language Models Using Membership Inference Attacks", EMNLP 2022.
    """

    name = "ref"
    summary = ("how much more likely the target finds the text than a reference model that did not train on "
               "it")
    paper = "Carlini et al. 2021; Mireshghallah et al. 2022 (reference model calibration)"
    needs_reference = True

    def score(self, ctx):
        _need_tokens(ctx)
        ref = ctx.scores("reference", moments=False)
        for i, s in enumerate(ref):
            if s.n_tokens == 0:
                raise TooShortError.under(i, f"the reference {ctx.reference.spec}")
        return np.array([t.mean_logp - r.mean_logp for t, r in zip(ctx.target_scores, ref, strict=True)])


@register
class LowercaseAttack(Attack):
    """lowercase = NLL(lower(x)) / NLL(x): a member's exact casing was memorised, so lowercasing it costs
    relatively more likelihood than it does for unseen text. Texts without capitals score 1. Higher => member.

    Carlini et al., "Extracting Training Data from Large Language Models", USENIX Security 2021.
    """

    name = "lowercase"
    summary = "how much likelihood the text loses when lowercased: a member's exact casing was memorised"
    paper = "Carlini et al. 2021, Extracting Training Data from Large Language Models"

    def score(self, ctx):
        _need_tokens(ctx)
        lower = ctx.scores("target", change=str.lower, moments=False)
        out = []
        for orig, low in zip(ctx.target_scores, lower, strict=True):
            # both floored: a text predicted exactly (mean log p 0, a memorised one) and without capitals scored
            # 0 / 1e-8 = 0, the least member-like score, where such a text scores 1
            nll_orig = max(-orig.mean_logp, 1e-8)
            nll_low = max(-low.mean_logp, 1e-8) if low.n_tokens else nll_orig
            out.append(nll_low / nll_orig)
        return np.array(out)


class RecallConfig(AttackConfig):
    prefix: tuple[str, ...] = Field((), description="non-member texts that form the prefix P (texts only: with "
                                                     "conversations P is the first `shots` non-members)")
    shots: int = Field(3, ge=1, description="non-members taken for P when no prefix is given")
    separator: str = "\n\n"

    @field_validator("shots")
    @classmethod
    def _shots_without_prefix(cls, shots: int, info: ValidationInfo) -> int:
        """`shots` is read only where no prefix texts are given: beside them it was ignored in silence."""
        if info.data.get("prefix"):
            raise ValueError("is read only without prefix texts (the first `shots` non-members form P); give "
                             "prefix texts or shots, not both")
        return shots


@register
class RecallAttack(Attack):
    """recall = LL(x|P) / LL(x) = NLL(x|P) / NLL(x), the paper's ratio, with LL(x|P) = mean_t log p(x_t | P, x_<t)
    over the same tokens as LL(x) and P a concatenation of known non-member texts. Conditioning on non-members
    lowers the likelihood of members more than that of non-members (ReCaLL's finding), so the ratio is higher
    for members: higher => member, as in the authors' code. Both NLLs are floored at 1e-8 (a text predicted
    exactly with and without P scores 1). The difference LL(x) - LL(x|P), used before, ranks texts differently:
    it leaves out the division by NLL(x) that makes the drop relative.

    On conversations (format chat) P is non-member conversations put before each as its earlier turns, the whole
    rendered by the chat template as one conversation (`after_prefix`: the conversation's system turn first, then
    P's turns without theirs, then its other turns), and x is its replies' tokens: NLL(x|P) is the NLL of those
    tokens after P and its own earlier turns, NLL(x) the ordinary chat pass's (the same tokens, without P). P's
    replies are context, not scored. `prefix_chats` holds P (run_mia sets it: the first `shots` non-members);
    prefix texts are refused for conversations (a text is not a turn of one).

    Xie et al., "ReCaLL: Membership Inference via Relative Conditional Log-Likelihoods", EMNLP 2024.
    """

    name = "recall"
    summary = "by what factor the text's loss grows when non-member texts are put before it (ReCaLL)"
    paper = "Xie et al. 2024, ReCaLL"
    Config = RecallConfig

    def __init__(self, config: AttackConfig | None = None,
                 prefix_chats: Sequence[list[dict[str, str]]] | None = None):
        super().__init__(config)
        self.prefix_chats = None if prefix_chats is None else [list(c) for c in prefix_chats]

    def prefix_text(self) -> str:
        if not self.config.prefix:
            raise InputError("recall needs non-member prefix texts", field="prefix")
        sep = self.config.separator
        return sep.join(self.config.prefix) + sep

    def score(self, ctx):
        from leakaudit.scoring import fit_window

        _need_tokens(ctx)
        window = fit_window(ctx.target, ctx.score_options.get("max_length"))
        # a text the window cannot hold after the prefix is scored in strided windows, and the later ones start
        # past the prefix: those tokens are scored without it in view, so the score mixes both conditions
        if ctx.chats is None:
            prefix = self.prefix_text()
            cond = ctx.scores("target", prefix=prefix, moments=False)
            n_prefix = len(encode(ctx.target.tokenizer, [prefix])[0])
            over = sum(n_prefix + c.n_tokens > window for c in cond)
            what = f"texts do not fit the {window}-token window after the {n_prefix}-token prefix"
        else:
            if self.config.prefix or not self.prefix_chats:
                raise InputError("recall on conversations puts non-member conversations before each (the first "
                                 "`shots` non-members), not prefix texts", field="prefix")
            cond = ctx.scores("target", prefix=self.prefix_chats, moments=False)
            contexts, replies, owners = chat_rows(ctx.target.tokenizer, ctx.chats, model=ctx.target.spec,
                                                  prefix=self.prefix_chats)
            over = sum(n > window for n in conversation_lengths(contexts, replies, owners, len(ctx.chats)))
            what = f"conversations do not fit the {window}-token window after the prefix conversations"
        if over:
            warn_once(f"recall: {over} of {len(cond)} {what}; their tokens past it are scored without the prefix "
                      "in view (fewer or shorter prefix texts, or a longer window, avoid it)")
        out = []
        for plain, c in zip(ctx.target_scores, cond, strict=True):
            # Without a prefix the first token may be unscored; compare over the same (last n) tokens.
            n = plain.n_tokens
            nll = max(-plain.mean_logp, 1e-8)
            nll_cond = max(-float(c.logp[-n:].astype(np.float64).mean()), 1e-8)
            out.append(nll_cond / nll)
        return np.array(out)


def corpus_file(corpus: str) -> Path | None:
    """The file dc_pdd's `corpus` reads: the path it names, or for `enron` the corpus LEAKAUDIT_ENRON_MESSAGES
    points at; None for the other built-ins (shipped in the package)."""
    from leakaudit.data.builtin import BUILTIN_NAMES, enron_messages_path

    if corpus in BUILTIN_NAMES:
        return enron_messages_path() if corpus == "enron" else None
    return Path(corpus).expanduser()


def _corpus(value: str) -> str:
    from leakaudit.data.builtin import BUILTIN_NAMES

    if value not in BUILTIN_NAMES and not corpus_file(value).is_file():
        raise ValueError(f"'{value}' is neither a built-in dataset ({', '.join(BUILTIN_NAMES)}) nor a file")
    return value


class DcPddConfig(AttackConfig):
    a: float = Field(0.01, gt=0, description="upper bound each token's term is clipped to")
    corpus: Annotated[str, AfterValidator(_corpus)] = Field(
        "dolly", description="reference corpus for the token frequencies: a built-in dataset name or a data file "
                             "(JSONL/JSON/CSV/Parquet with a `text` field)")
    max_tokens: int = Field(1024, ge=1, description="tokens counted per corpus text (its first)")


@register
class DcPddAttack(Attack):
    """dc_pdd = mean over the first occurrences t of each distinct token in x of min(p(x_t | x_<t) * -log f(x_t),
    a), with f the token's Laplace-smoothed frequency in a reference corpus, f(v) = (count(v) + 1) / (N + |V|)
    (N tokens counted, |V| the tokenizer's size), and a = 0.01. A token the model predicts with a probability far
    above its frequency in ordinary text is evidence of training; first occurrences only, so repeats do not
    count twice; the clip keeps a few rare tokens from deciding. Over the scored tokens (without a BOS, all but
    the first). Higher => member. Built for pre-training data (study 1's question); the frequencies come from
    the reference corpus, never from the texts under attack (counting the non-members would mark their tokens
    common and push their scores down).

    Zhang et al., "Pretraining Data Detection for Large Language Models: A Divergence-based Calibration
    Method", EMNLP 2024 (the paper counts C4; the default here is the shipped Dolly set, general English).
    """

    name = "dc_pdd"
    summary = ("how far the model's token probabilities rise above the tokens' everyday frequency in a "
               "reference corpus")
    paper = "Zhang et al. 2024, DC-PDD (divergence-based calibration)"
    Config = DcPddConfig

    def score(self, ctx):
        _need_tokens(ctx)
        tok = ctx.target.tokenizer
        neg_log_f = -np.log(_smoothed_frequencies(tok, self.config.corpus, self.config.max_tokens))
        if shared := _in_corpus(self.config.corpus, ctx.texts):
            warn_once(f"dc_pdd: {shared} of {len(ctx.texts)} texts under attack are in its reference corpus "
                      f"'{self.config.corpus}': their tokens count as common there, which lowers their scores (the "
                      "AUC then measures which texts were counted); use a corpus without them")
        out = []
        for scored, s in zip(ctx.scored_ids(), ctx.target_scores, strict=True):
            ids = np.asarray(scored[-s.n_tokens:])  # the tokens the engine scored
            first = np.sort(np.unique(ids, return_index=True)[1])
            alpha = np.exp(s.logp[first].astype(np.float64)) * neg_log_f[ids[first]]
            out.append(float(np.minimum(alpha, self.config.a).mean()))
        return np.array(out)


#: token frequencies per (tokenizer, corpus version, max_tokens): the seven mia stages of a study count the
#: same corpus with the same tokenizer (1-2 s each), every adapter of one base loading its own copy of it
_FREQUENCIES: dict[tuple, np.ndarray] = {}


def _smoothed_frequencies(tokenizer, corpus: str, max_tokens: int) -> np.ndarray:
    """(count(v) + 1) / (N + |V|) over the corpus's texts, each cut to its first `max_tokens` tokens."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: not kept
        return _count_frequencies(tokenizer, corpus, max_tokens)
    from leakaudit.models import file_sha256

    where = corpus_file(corpus)  # a file by content: an edit that keeps its size and mtime is still seen
    version = None if where is None else file_sha256(where)
    key = (hashlib.sha256(backend.to_str().encode()).hexdigest(), len(tokenizer), corpus, version, max_tokens)
    if key not in _FREQUENCIES:
        _FREQUENCIES.clear()  # one corpus at a time is what a study uses
        _FREQUENCIES[key] = _count_frequencies(tokenizer, corpus, max_tokens)
    return _FREQUENCIES[key]


def _corpus_texts(corpus: str) -> list[str]:
    from leakaudit.data.builtin import BUILTIN_NAMES, builtin_dataset
    from leakaudit.data.io import load_records

    if corpus in BUILTIN_NAMES:
        return [r["text"] for r in builtin_dataset(corpus, 0, None)]
    return [r.text for r in load_records(corpus_file(corpus))]


def _in_corpus(corpus: str, texts: Sequence[str]) -> int:
    """How many of `texts` (whitespace aside) dc_pdd's corpus holds: counted there, a text's own tokens look
    common and its score drops, so a corpus holding the non-members (their file given as the corpus) makes an
    AUC of the split, not of the model (docs/attacks.md)."""
    counted = {" ".join(t.split()) for t in _corpus_texts(corpus)}
    return sum(" ".join(t.split()) in counted for t in texts)


def _count_frequencies(tokenizer, corpus: str, max_tokens: int) -> np.ndarray:
    texts = _corpus_texts(corpus)
    counts = np.zeros(len(tokenizer), dtype=np.float64)
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        np.add.at(counts, ids[:max_tokens], 1)
    return (counts + 1) / (counts.sum() + len(counts))


class GradNormConfig(AttackConfig):
    max_length: int | None = Field(None, ge=2, description="tokens per text (default: the model's window)")


@register
class GradNormAttack(Attack):
    """gradnorm = -||grad_theta NLL(x)||_2 over all parameters (white-box). Training drove the loss gradient
    of members towards zero, so members have smaller gradient norms; the negative norm makes higher => member.
    One text per backward pass; texts longer than the window are cut to the first window. A conversation's NLL
    is its chat fine-tune's loss on it: the mean over its replies' tokens, in one pass over the conversation.

    Nasr, Shokri, Houmansadr, "Comprehensive Privacy Analysis of Deep Learning: Passive and Active White-box
    Inference Attacks", IEEE S&P 2019 (gradient norms as the white-box membership signal).
    """

    name = "gradnorm"
    summary = ("minus the size of the loss gradient over all parameters (white-box): training flattened it "
               "at members")
    paper = "Nasr et al. 2019, Comprehensive Privacy Analysis of Deep Learning (white-box gradients)"
    Config = GradNormConfig

    def score(self, ctx):
        from leakaudit.distributed import gather_floats, shard
        from leakaudit.scoring import fit_window

        _need_tokens(ctx)
        window = fit_window(ctx.target, self.config.max_length)
        if ctx.chats is None:
            lengths = [s.n_tokens + 1 for s in ctx.target_scores]  # n_tokens: the text's tokens after the first
        else:  # checked on every process before the work is sharded: a refusal is every process's
            contexts, replies, owners = chat_rows(ctx.target.tokenizer, ctx.chats, model=ctx.target.spec)
            spans = conversation_spans(owners, len(ctx.chats))
            for i, s in enumerate(spans):
                if s and len(contexts[s[0]]) >= window:  # its first reply has no token in the window
                    raise TooShortError(i, f"has no reply token in gradnorm's first {window} tokens (its first "
                                           f"reply starts at token {len(contexts[s[0]]) + 1}; gradnorm's max_length)")
            lengths = conversation_lengths(contexts, replies, owners, len(ctx.chats))
        mine = shard(len(ctx.texts))
        if ctx.chats is None:
            local = [gradient_norm(ctx.target, ctx.texts[i], self.config.max_length) for i in mine]
        else:  # the rows tokenised above, not again per conversation
            local = [_gradient_norm(ctx.target, *_trained_mask([contexts[j] for j in spans[i]],
                                                               [replies[j] for j in spans[i]], window))
                     for i in mine]
        over = sum(n > window for n in lengths)
        if over:  # the other attacks score such texts whole (strided windows): say where gradnorm differs
            what = "texts" if ctx.chats is None else "conversations"
            warn_once(f"gradnorm: {over} of {len(ctx.texts)} {what} are longer than the {window}-token window; "
                      "their gradient is taken over the first window only")
        return -gather_floats(local, len(ctx.texts))


def gradient_norm(lm: LoadedModel, text: str, max_length: int | None = None) -> float:
    """L2 norm of d NLL(x) / d theta over all parameters, in eval mode (no dropout)."""
    from leakaudit.scoring import fit_window

    ids = encode(lm.tokenizer, [text])[0][: fit_window(lm, max_length)]
    return _gradient_norm(lm, ids, [False] + [True] * (len(ids) - 1))


def _trained_mask(contexts: list[list[int]], replies: list[list[int]], window: int) -> tuple[list[int], list[bool]]:
    """One conversation's ids (its last reply's context holds every turn and reply before it) and which of them
    its replies are, cut to the first `window` tokens: gradnorm's NLL of a conversation is the mean over every
    reply's tokens, each predicted from all before it (the chat fine-tune's loss on it; `chat_rows`)."""
    ids = contexts[-1] + replies[-1]
    scored = [False] * len(ids)
    for context, reply in zip(contexts, replies, strict=True):
        scored[len(context):len(context) + len(reply)] = [True] * len(reply)
    scored[0] = False  # the first token has nothing before it
    return ids[:window], scored[:window]


def _gradient_norm(lm: LoadedModel, ids: list[int], scored: list[bool]) -> float:
    """L2 norm over all parameters of the gradient of the mean NLL of the tokens of `ids` marked `scored`, each
    given all before it; in eval mode (no dropout)."""
    import torch

    model = lm.model
    x = torch.tensor([ids], device=lm.device)
    targets = torch.tensor([t if s else -100 for t, s in zip(ids[1:], scored[1:], strict=True)], device=lm.device)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
            grads = torch.autograd.grad(nll, params, allow_unused=True)
        total = sum(float(g.double().square().sum()) for g in grads if g is not None)
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    return math.sqrt(total)


# ----------------------------------------------------------------------------------------- running
@dataclass
class MiaReport:
    """Per-attack ROC metrics and per-sample scores (members first, then non-members, in input order)."""

    metrics: dict[str, RocMetrics]
    scores: dict[str, np.ndarray]
    labels: np.ndarray
    member_index: list[int]
    nonmember_index: list[int]
    warnings: list[str] = field(default_factory=list)
    recall_prefix_index: list[int] = field(default_factory=list)  # non-members used as ReCaLL prefix, not scored
    options: dict[str, dict] = field(default_factory=dict)  # each attack's options, as it ran

    def to_json(self) -> dict:
        """The `mia.json` shape of docs/attacks.md (plus advantage, warnings)."""
        return {"attacks": {name: {**m.to_json(), "options": self.options.get(name, {})}
                            for name, m in self.metrics.items()},
                "warnings": list(self.warnings),
                "recall_prefix_nonmembers": list(self.recall_prefix_index)}

    def rows(self, member_ids: Sequence[str] | None = None, nonmember_ids: Sequence[str] | None = None) -> list[dict]:
        """One row per scored sample: id, label, a score per attack (for scores.jsonl)."""
        mids = list(member_ids) if member_ids is not None else [f"member:{i}" for i in range(max(self.member_index,
                                                                                                  default=-1) + 1)]
        nids = list(nonmember_ids) if nonmember_ids is not None else [
            f"nonmember:{i}" for i in range(max(self.nonmember_index, default=-1) + 1)]
        ids = [mids[i] for i in self.member_index] + [nids[i] for i in self.nonmember_index]
        out = []
        for j, rid in enumerate(ids):
            row = {"id": rid, "label": int(self.labels[j])}
            row.update({name: float(s[j]) for name, s in self.scores.items()})
            out.append(row)
        return out


def split_warnings(members: Sequence[str], nonmembers: Sequence[str], threshold: float = 0.6) -> list[str]:
    """Warn when the two sets share texts, or when text length alone separates them (AUC of length far
    from 0.5): then an attack may measure how the split was made rather than what the model learned."""
    from sklearn.metrics import roc_auc_score

    out = []
    distinct_in = {" ".join(t.split()) for t in members}  # whitespace aside; each text normalised once
    norm_out = [" ".join(t.split()) for t in nonmembers]
    shared = sum(1 for t in norm_out if t in distinct_in)
    if shared:
        out.append(f"{shared} non-member texts also appear among the members; remove them for a clean measurement")
    for name, texts, distinct in (("member", members, distinct_in), ("non-member", nonmembers, set(norm_out))):
        # each copy is an item of the AUC and its bootstrap: n looks larger than the texts behind it, and the
        # interval narrower than they support
        repeats = len(texts) - len(distinct)
        if repeats:
            out.append(f"{repeats} of {len(texts)} {name} texts repeat another {name} text; each copy counts as a "
                       "text, so the intervals are narrower than the distinct texts support — deduplicate them")
    lengths = [len(t) for t in members] + [len(t) for t in nonmembers]
    labels = [1] * len(members) + [0] * len(nonmembers)
    if len(set(labels)) == 2 and len(set(lengths)) > 1:
        auc = float(roc_auc_score(labels, lengths))
        if max(auc, 1 - auc) >= threshold:
            out.append(f"text length alone separates members from non-members (AUC {auc:.2f}); the attacks may "
                       "measure the split rather than the model — match the length distributions")
    return out


def _resolve(attacks: Sequence[str | Attack], attack_options: dict[str, dict] | None) -> list[Attack]:
    opts = attack_options or {}
    unknown = set(opts) - {a if isinstance(a, str) else a.name for a in attacks}
    if unknown:
        raise InputError(f"options given for attacks not run: {', '.join(sorted(unknown))}", field="attack_options")
    out = [a if isinstance(a, Attack) else get_attack(a, **opts.get(a, {})) for a in attacks]
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise InputError(f"an attack is listed twice: {', '.join(names)}", field="attacks")
    if not out:
        raise InputError("no attack given", field="attacks")
    return out


Conversation = list[dict[str, str]]


def run_mia(target: LoadedModel, members: Sequence[str] | Sequence[Conversation],
            nonmembers: Sequence[str] | Sequence[Conversation], attacks: Sequence[str | Attack],
            reference: LoadedModel | None = None, *, attack_options: dict[str, dict] | None = None,
            n_bootstrap: int = 1000, seed: int = 0, batch_size: int | str = "auto", max_length: int | None = None,
            stride: int | None = None, cache: bool = True, progress: bool = True,
            load: Callable[[str], LoadedModel] | None = None) -> MiaReport:
    """Score members and non-members with each attack and summarise each attack's ROC. `load` loads the models
    an attack's options name (lira's references; default: on the target's device and dtype).

    All reference-free attacks read one shared scoring pass of the target. For `recall` without explicit
    prefix texts, the first `shots` non-members become the prefix and are left out of every attack's evaluation
    (so all attacks are compared on the same samples).

    Members and non-members may be conversations (lists of {role, content}, a chat fine-tune's rows): each is
    then scored at its assistant replies, the tokens a chat fine-tune's loss is on, each in the conversation before
    it, rendered by each model's chat template as `finetune --format chat` renders it.
    """
    from leakaudit.errors import check_model, check_texts

    check_model(target, "target")
    if reference is not None:
        check_model(reference, "reference")
    if isinstance(attacks, str):  # "loss" was read as the attacks l, o, s, s
        raise TypeError(f"attacks: expected a list of attack names, got one string (write [{attacks!r}])")
    members, nonmembers = (side if isinstance(side, (str, bytes)) else list(side) for side in (members, nonmembers))
    chats = _conversations(members, nonmembers)
    if chats is None:
        members, nonmembers = check_texts(members, "members"), check_texts(nonmembers, "nonmembers")
    else:
        from leakaudit.data.chat import reply_text

        members, nonmembers = ([reply_text(chat) for chat in side]
                               for side in (chats[:len(members)], chats[len(members):]))
    classes = [ATTACKS.get(a) if isinstance(a, str) else type(a) for a in attacks]  # unknown names: _resolve
    if chats is not None and (plain := [c.name for c in classes if c is not None and not c.scores_chats]):
        raise InputError(f"{', '.join(plain)}: scores plain texts only, not conversations (the attacks for them: "
                         f"{', '.join(n for n, a in ATTACKS.items() if a.scores_chats)})", field="attacks")
    chosen = _resolve(attacks, attack_options)  # after: a refused attack's masked LM need not be found
    if chats is not None and any(isinstance(a, RecallAttack) and a.config.prefix for a in chosen):
        raise InputError("recall: prefix texts cannot be put before a conversation; without them the first "
                         "`shots` non-member conversations form the prefix", field="prefix")
    if chats is not None and any(isinstance(a, RecallAttack) and "separator" in a.config.model_fields_set
                                 for a in chosen):  # it joins prefix texts: conversations are joined as turns
        raise InputError("recall: the separator joins prefix texts; conversations are put before each as its "
                         "earlier turns, and nothing reads it", field="separator")
    if any(a.needs_reference for a in chosen) and reference is None:
        need = [a.name for a in chosen if a.needs_reference]
        raise InputError(f"attack(s) {', '.join(need)} need a reference model", field="reference")
    nonmember_index = list(range(len(nonmembers)))
    prefix_index: list[int] = []
    for i, a in enumerate(chosen):
        if isinstance(a, RecallAttack) and not a.config.prefix:
            shots = a.config.shots
            if len(nonmembers) <= shots + 1:
                raise InputError(f"recall takes {shots} non-members as its prefix; need more than {shots + 1}",
                                 field="nonmembers")
            prefix_index = list(range(shots))
            if chats is None:
                chosen[i] = RecallAttack(a.config.model_copy(update={"prefix": tuple(nonmembers[:shots])}))
            else:  # the conversations, as earlier turns of each (their replies' texts are not a conversation)
                chosen[i] = RecallAttack(a.config, prefix_chats=chats[len(members):len(members) + shots])
            nonmember_index = nonmember_index[shots:]
    if not members or not nonmember_index:
        raise InputError("need at least one member and one non-member", field="members")
    evaluated_nonmembers = [nonmembers[i] for i in nonmember_index]
    texts = list(members) + evaluated_nonmembers
    if chats is not None:  # the conversations evaluated: recall's prefix conversations are not
        chats = chats[:len(members)] + [chats[len(members) + i] for i in nonmember_index]
    labels = np.array([1] * len(members) + [0] * len(evaluated_nonmembers))
    ctx = ScoringContext(target, texts, reference, moments=any(a.needs_moments for a in chosen),
                         score_options={"batch_size": batch_size, "max_length": max_length, "stride": stride,
                                        "cache": cache, "progress": progress}, chats=chats, load=load)
    warnings = split_warnings(members, evaluated_nonmembers)
    if chats is not None:
        warnings += chat_training_notes(target, chats)
    if prefix_index:
        warnings.append(f"recall: the first {len(prefix_index)} non-members form the prefix and are not evaluated")
    scores: dict[str, np.ndarray] = {}
    metrics: dict[str, RocMetrics] = {}
    for a in chosen:
        try:
            s = np.asarray(a.score(ctx), dtype=np.float64)
            if (bad := np.flatnonzero(~np.isfinite(s))).size:  # roc_metrics' ValueError was a traceback
                raise TooShortError(int(bad[0]), f"has a NaN or infinite {a.name} score ({bad.size} of {len(s)} "
                                    "texts): a model gives NaN or infinite log-probabilities on it (weights that "
                                    "hold NaN or inf, or an overflow in its dtype)")
        except TooShortError as exc:
            i = exc.index
            exc.role, exc.row = ("members", i) if i < len(members) else ("nonmembers",
                                                                         nonmember_index[i - len(members)])
            # a caller's own lists: "text #23" counted members and non-members together, from 1
            exc.message = f"{exc.role}[{exc.row}] {exc.why}"
            exc.args = (exc.format(),)
            raise
        scores[a.name] = s
        metrics[a.name] = roc_metrics(s, labels, n_bootstrap=n_bootstrap, seed=seed)
    # each attack's options, as it ran (k, dc_pdd's corpus, the neighbourhood's masked LM): a mia.json says what
    # it measured. Not recall's prefix texts: non-members, which may hold PII (`recall_prefix_nonmembers` names them)
    options = {a.name: a.config.model_dump(mode="json", exclude={"prefix"}) for a in chosen}
    return MiaReport(metrics, scores, labels, list(range(len(members))), nonmember_index, warnings, prefix_index,
                     options)


def _conversations(members: object, nonmembers: object) -> list[Conversation] | None:
    """Both sides' conversations in order (members first), checked, or None when they are texts."""
    from leakaudit.data.chat import validate_messages

    if not (isinstance(members, list) and isinstance(nonmembers, list)):
        return None  # one string, or texts: check_texts says what is wrong
    if not any(isinstance(x, list) for x in [*members, *nonmembers]):
        return None
    return [validate_messages(x, None, None, f"{role}[{i}]")
            for role, side in (("members", members), ("nonmembers", nonmembers)) for i, x in enumerate(side)]


__all__ = ["ATTACKS", "REFERENCE_FREE", "MiaReport", "run_mia", "split_warnings", "gradient_norm", "get_attack"]
