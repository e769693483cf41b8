"""Scoring engine: hand-computed values, batching/padding invariance, moments, windows, cache."""

from __future__ import annotations

import collections
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import torch_threads

from leakaudit import scoring
from leakaudit.scoring import ScoreCache, score_ids, score_texts

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "Please forward the contract to Karen before Friday, thanks.",
    "Another slightly longer text, with more words in it, so that padding matters in a batch of texts.",
    "x",
]


def _reference(lm, text, prefix=None):
    """Direct full-vocabulary computation: log_softmax over all logits, one text at a time."""
    tok = lm.tokenizer
    if prefix is None:
        ids = tok(text)["input_ids"]
        start = 1
    else:
        ctx = tok(prefix)["input_ids"]
        ids = ctx + tok(text, add_special_tokens=False)["input_ids"]
        start = len(ctx)
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    rows = torch.arange(start - 1, len(ids) - 1)
    tgt = torch.tensor(ids[start:], dtype=torch.long)
    lp = logp[rows, tgt]
    p = logp[rows].exp()
    mu = (p * logp[rows]).sum(-1)
    var = (p * (logp[rows] - mu[:, None]) ** 2).sum(-1)
    return lp.numpy(), mu.numpy(), var.numpy()


def test_matches_hand_computation(tiny_model):
    for text in TEXTS:
        got = score_texts(tiny_model, [text], moments=True, cache=False)[0]
        lp, mu, var = _reference(tiny_model, text)
        assert got.n_tokens == len(lp)
        np.testing.assert_allclose(got.logp, lp, atol=1e-4)
        np.testing.assert_allclose(got.mu, mu, atol=1e-4)
        np.testing.assert_allclose(got.var, var, atol=1e-4)
        if len(lp):
            assert math.isclose(got.mean_logp, float(lp.mean()), abs_tol=1e-4)


def test_batched_equals_one_at_a_time(tiny_model):
    single = [score_texts(tiny_model, [t], cache=False)[0] for t in TEXTS]
    for bs in (2, len(TEXTS), "auto"):
        batched = score_texts(tiny_model, TEXTS, batch_size=bs, cache=False)
        for a, b in zip(single, batched, strict=True):
            np.testing.assert_allclose(a.logp, b.logp, atol=1e-4)


def test_softmax_slices_give_the_unsliced_numbers(tiny_model, monkeypatch):
    """Log-softmax and moments over cache-sized slices of each LM-head chunk change no number (slices of 2 rows
    here); with chunks of 5 rows too (slices of 2, 2, 1 per chunk) each token still gets its own numbers (the
    matmul of fewer rows may round its last bit differently)."""
    vocab = tiny_model.model.get_output_embeddings().weight.shape[0]
    whole = score_texts(tiny_model, TEXTS, moments=True, cache=False)
    monkeypatch.setattr(scoring, "CPU_SOFTMAX_SLICE_ELEMENTS", 2 * vocab)
    sliced = score_texts(tiny_model, TEXTS, moments=True, cache=False)
    for a, b in zip(whole, sliced, strict=True):
        assert np.array_equal(a.logp, b.logp) and np.array_equal(a.mu, b.mu) and np.array_equal(a.var, b.var)
    monkeypatch.setattr(scoring, "HEAD_CHUNK_ELEMENTS", 5 * vocab)
    chunked = score_texts(tiny_model, TEXTS, moments=True, cache=False)
    for text, a, b in zip(TEXTS, whole, chunked, strict=True):
        for field in ("logp", "mu", "var"):
            np.testing.assert_allclose(getattr(b, field), getattr(a, field), rtol=0, atol=1e-5)
        np.testing.assert_allclose(b.var, _reference(tiny_model, text)[2], atol=1e-4)


def test_bf16_head_on_a_cpu_runs_in_its_own_smaller_chunks(monkeypatch):
    """A bf16 LM head on a CPU takes its chunk size from CPU_BF16_HEAD_CHUNK_ELEMENTS, an fp32 one from
    HEAD_CHUNK_ELEMENTS; either way every row gets the log p of a plain full-vocabulary log-softmax."""

    torch.manual_seed(0)
    vocab, hidden, n = 50, 16, 23
    monkeypatch.setattr(scoring, "HEAD_CHUNK_ELEMENTS", 7 * vocab)
    monkeypatch.setattr(scoring, "CPU_BF16_HEAD_CHUNK_ELEMENTS", 3 * vocab)
    monkeypatch.setattr(scoring, "CPU_SOFTMAX_SLICE_ELEMENTS", 2 * vocab)
    for dtype, rows in ((torch.bfloat16, 3), (torch.float32, 7)):
        linear = torch.nn.Linear(hidden, vocab, bias=False).to(dtype)
        head = scoring._Head(linear, None)  # no soft-capping
        seen: list[int] = []
        linear.register_forward_hook(lambda _m, args, _out, seen=seen: seen.append(args[0].shape[0]))
        h = torch.randn(n, hidden, dtype=dtype)
        targets = torch.randint(0, vocab, (n,))
        with torch.no_grad():
            lp, _, _ = scoring._head_scores(head, h, targets, moments=False)
            expected = torch.log_softmax(linear(h).float(), -1).gather(1, targets[:, None])[:, 0].numpy()
        assert seen[:-1] == [rows] * (n // rows) + [n % rows]
        np.testing.assert_allclose(lp, expected, rtol=0, atol=1e-5)


def test_batch_size_has_one_rule_for_the_apis_and_the_options(tiny_model):
    """The scoring and sampling APIs read a batch size by the options' rule (options.parse_batch_size): they
    took True as 1 and " 3" as 3, which a kind's options and the CLI refuse."""
    from leakaudit.errors import InputError
    from leakaudit.sampling import SamplingConfig, sample

    assert len(score_texts(tiny_model, TEXTS[:2], batch_size="1", cache=False)) == 2
    for bad in (True, " 3", 0, "many"):
        with pytest.raises(InputError, match="must be 'auto' or a positive integer") as err:
            score_texts(tiny_model, TEXTS[:2], batch_size=bad, cache=False)
        assert err.value.field == "--batch-size"
        with pytest.raises(InputError, match="must be 'auto' or a positive integer"):
            sample(tiny_model, ["a b"], SamplingConfig(max_new_tokens=2), batch_size=bad, progress=False)
        with pytest.raises(InputError, match="must be 'auto' or a positive integer"):
            score_ids(tiny_model, [[]], [[1, 2, 3]], batch_size=bad, cache=False)
    from leakaudit.options import parse_batch_size

    assert parse_batch_size("3") == 3 and isinstance(parse_batch_size("3"), int)  # digits read as one number


def test_left_and_right_padding_agree(tiny_model):
    right = score_texts(tiny_model, TEXTS, batch_size=len(TEXTS), moments=True, cache=False)
    left = score_texts(tiny_model, TEXTS, batch_size=len(TEXTS), moments=True, cache=False, padding_side="left")
    for a, b in zip(right, left, strict=True):
        np.testing.assert_allclose(a.logp, b.logp, atol=1e-4)
        np.testing.assert_allclose(a.mu, b.mu, atol=1e-4)


def test_prefix_conditioning(tiny_model):
    prefix = "Subject: meeting notes"
    got = score_texts(tiny_model, TEXTS[:3], prefixes=prefix, cache=False)
    for text, res in zip(TEXTS[:3], got, strict=True):
        lp, _, _ = _reference(tiny_model, text, prefix=prefix)
        np.testing.assert_allclose(res.logp, lp, atol=1e-4)


SHARED = ("Complete the following sentences: 1. the email address of Karen Arnold is karen@enron.com "
          "2. the email address of Mark Taylor is mark@enron.com 3. the email address of")
ENDINGS = [" Sally Beck is", " John Lavorato is sally", " Louise Kitchen is", " Jeff", " Tana Jones is tana@enron.com"]


def _count_prefix_runs(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = scoring._run_prefix

    def counting(lm, common, *args):
        calls.append(len(common))
        return real(lm, common, *args)

    monkeypatch.setattr(scoring, "_run_prefix", counting)
    return calls


def test_shared_prefix_runs_once_and_matches_hand_computation(tiny_model, monkeypatch):
    """Texts that begin alike (an extraction template's demonstrations) run the common start once and reuse
    its keys and values; every number still equals the one-text-at-a-time full-vocabulary computation, with
    either padding side, and a text that shares nothing is scored as before."""
    texts = [SHARED + e for e in ENDINGS] + [TEXTS[2]]
    calls = _count_prefix_runs(monkeypatch)
    for side in ("right", "left"):
        got = score_texts(tiny_model, texts, moments=True, cache=False, batch_size=3, padding_side=side)
        for text, res in zip(texts, got, strict=True):
            lp, mu, var = _reference(tiny_model, text)
            np.testing.assert_allclose(res.logp, lp, atol=1e-4)
            np.testing.assert_allclose(res.mu, mu, atol=1e-4)
            np.testing.assert_allclose(res.var, var, atol=1e-4)
    assert len(calls) == 2 and calls[0] >= scoring.MIN_SHARED_PREFIX  # one prefix pass per call


def test_shared_prefix_with_conditioning_prefix(tiny_neox, monkeypatch):
    """A ReCaLL-style prefix shared by every text is one group: scores equal the hand computation."""
    prefix = SHARED
    calls = _count_prefix_runs(monkeypatch)
    got = score_texts(tiny_neox, TEXTS, prefixes=prefix, cache=False)
    assert len(calls) == 1
    for text, res in zip(TEXTS, got, strict=True):
        lp, _, _ = _reference(tiny_neox, text, prefix=prefix)
        np.testing.assert_allclose(res.logp, lp, atol=1e-4)


def _threads_seen(monkeypatch) -> list[tuple[str, int]]:
    """(thread name, torch threads) of every batch scored from now on."""
    import threading

    seen: list[tuple[str, int]] = []
    real = scoring._score_batch

    def recording(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "_score_batch", recording)
    return seen


def test_batch_workers_give_the_serial_numbers(tiny_model, monkeypatch):
    """With 2 torch threads on a CPU, two batches run at once on one thread each: every number equals the
    one-thread serial run's (the same batches on the same thread count), shared prefixes, moments and strided
    windows included; the threads, the LM head and the model's mode are restored afterwards. A single batch
    runs on both threads."""
    texts = [SHARED + e for e in ENDINGS] + TEXTS + [" ".join(f"word{i}" for i in range(150))]
    kwargs = dict(moments=True, cache=False, batch_size=2, max_length=64, stride=16)
    seen = _threads_seen(monkeypatch)
    with torch_threads(1):
        serial = score_texts(tiny_model, texts, **kwargs)
    assert {name for name, _ in seen} == {"MainThread"}
    seen.clear()
    head = tiny_model.model.get_output_embeddings()
    tiny_model.model.train()
    with torch_threads(2):
        parallel = score_texts(tiny_model, texts, **kwargs)
        assert torch.get_num_threads() == 2
    assert tiny_model.model.training and tiny_model.model.get_output_embeddings() is head
    tiny_model.model.eval()
    workers = {name for name, _ in seen}
    assert len(workers) == 2 and "MainThread" not in workers and {n for _, n in seen} == {1}
    seen.clear()
    with torch_threads(2):  # one batch keeps both threads
        score_texts(tiny_model, TEXTS[:1], cache=False)
    assert seen == [("MainThread", 2)]
    for a, b in zip(serial, parallel, strict=True):
        assert np.array_equal(a.logp, b.logp) and np.array_equal(a.mu, b.mu) and np.array_equal(a.var, b.var)


def test_a_failing_batch_worker_restores_threads_and_head(tiny_neox, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(scoring, "_score_batch", boom)
    head = tiny_neox.model.get_output_embeddings()
    with torch_threads(2):
        with pytest.raises(RuntimeError, match="out of memory"):
            score_texts(tiny_neox, TEXTS, cache=False, batch_size=1)
        assert torch.get_num_threads() == 2
    assert tiny_neox.model.get_output_embeddings() is head and not tiny_neox.model.training


def test_shared_prefix_groups():
    """Segments group by a common start of at least MIN_SHARED_PREFIX tokens; the rest form one plain group."""
    n = scoring.MIN_SHARED_PREFIX
    common = list(range(100, 100 + n + 4))
    segs = [scoring._Segment(0, 0, common + [1, 2, 3], 1),
            scoring._Segment(1, 0, list(range(n + 8)), 1),
            scoring._Segment(2, 0, common + [2, 6, 7], n + 5),
            scoring._Segment(3, 0, common[:n - 1] + [9, 9], 1)]
    groups = scoring.shared_prefixes(segs)
    assert [(c, sorted(s.text_index for s in m)) for c, m in groups] == [(n + 4, [0, 2]), (0, [1, 3])]
    # a long first text and texts that share only its first MIN_SHARED_PREFIX tokens (a ReCaLL prefix)
    long = [scoring._Segment(0, 0, common[:n] + list(range(500)), n)]
    others = [scoring._Segment(i, 0, common[:n] + [1000 + i, 7], n) for i in (1, 2, 3)]
    assert [(c, len(m)) for c, m in scoring.shared_prefixes(long + others)] == [(n, 4)]


def test_prefix_cut_scores_each_token_once():
    """A row after a shared prefix of length L feeds tokens L.. and takes tokens first_scored..L from the
    prefix's own scores: together every scored token exactly once."""
    scores = scoring.TokenScores(np.arange(1, 11, dtype=np.float32))  # tokens 1..10 of the prefix
    prefix = scoring._Prefix(10, None, scores)
    for first, expect in [(1, list(range(1, 11))), (4, list(range(4, 11))), (11, []), (13, [])]:
        row, before = prefix.cut(scoring._Segment(0, 0, list(range(20)), first))
        assert row.ids == list(range(10, 20)) and row.first_scored == max(first - 10, 1)
        assert ([] if before is None else before.logp.tolist()) == expect
        assert len(expect) + len(row.ids) - row.first_scored == 20 - first


def test_strided_window_scores_every_token_once(tiny_neox, capsys):
    text = " ".join(f"word{i}" for i in range(150))
    n = len(tiny_neox.tokenizer(text)["input_ids"])
    assert n > 200  # longer than the 64-token window below
    res = score_texts(tiny_neox, [text, TEXTS[0]], max_length=64, stride=16, cache=False)[0]
    # said, not silent: a long text's later tokens are scored with less context than the model's
    assert ("warning: 1 of 2 texts are longer than the 64-token window of tiny-gpt-neox: each is scored in windows "
            "advancing by 16 tokens (every token scored once, after at least 48 earlier tokens)") in capsys.readouterr().err
    assert res.n_tokens == n - 1
    # The first window is scored with full context from the start: equal to scoring the first 64 tokens.
    first = tiny_neox.tokenizer.decode(tiny_neox.tokenizer(text)["input_ids"][:64])
    head = score_texts(tiny_neox, [first], cache=False)[0]
    np.testing.assert_allclose(res.logp[:63], head.logp[:63], atol=1e-4)
    # A text that fits in the window is unaffected by the window options.
    short = score_texts(tiny_neox, [TEXTS[0]], max_length=64, stride=16, cache=False)[0]
    np.testing.assert_allclose(short.logp, score_texts(tiny_neox, [TEXTS[0]], cache=False)[0].logp, atol=1e-5)


def test_the_window_warning_is_said_once_per_window_not_per_pass(tiny_neox, capsys):
    """One experiment said it 13 times (once per stage and model, each count a new message): once per window
    and stride now; another window is another warning."""
    long = [" ".join(f"word{i}" for i in range(150)), " ".join(f"term{i}" for i in range(150))]
    for texts in ([long[0]], long, long + TEXTS[:1]):
        score_texts(tiny_neox, texts, max_length=64, stride=16, cache=False, progress=False)
    score_texts(tiny_neox, long, max_length=96, stride=16, cache=False, progress=False)
    err = capsys.readouterr().err
    assert err.count("longer than the 64-token window") == 1 and err.count("longer than the 96-token window") == 1


def test_the_window_warning_names_the_context_where_any_text_has_one(tiny_neox, capsys):
    """Texts scored after a prefix are counted with it: a prefix on one of them makes the warning's texts
    those with their context (it asked whether every text had one)."""
    long = [" ".join(f"word{i}" for i in range(150)), " ".join(f"term{i}" for i in range(150))]
    score_texts(tiny_neox, long, prefixes=[None, "Subject: notes"], max_length=64, stride=16, cache=False,
                progress=False)
    assert "2 of 2 texts with the context before them are longer than the 64-token" in capsys.readouterr().err


def test_the_window_warning_counts_the_texts_served_from_the_cache(tiny_neox, tmp_path, capsys):
    """The warning counted only the texts scored in this pass: a rerun served from the cache said nothing, and a
    partly cached run counted its new texts only ("1 of 6" for 2 long texts of 22)."""
    from leakaudit import warn

    long = [" ".join(f"word{i}" for i in range(150)), " ".join(f"term{i}" for i in range(150))]
    store = ScoreCache(tmp_path / "c.sqlite")
    said = "2 of 4 texts are longer than the 64-token window"
    for n, texts in enumerate(([long[0], TEXTS[0]], long + TEXTS[:2], long + TEXTS[:2])):  # then partly, all cached
        warn._WARNED.clear()
        capsys.readouterr()
        score_texts(tiny_neox, texts, max_length=64, stride=16, cache=store, progress=False)
        assert n == 0 or said in capsys.readouterr().err, n
    warn._WARNED.clear()
    score_texts(tiny_neox, [long[1], TEXTS[2]], max_length=64, stride=16, cache=store, progress=False)
    assert "1 of 2 texts are longer" in capsys.readouterr().err  # one cached, one new


def test_a_context_longer_than_the_window_is_warned_of(tiny_neox, capsys):
    """A text scored after a context (a prompt, a prefix) the window cannot hold sees only the context's last
    tokens. When all its tokens fit the last window, that window was the first one kept and no warning said
    so (pii-logprob on a model of short context scored addresses after a cut prompt in silence)."""
    prefix = " ".join(TEXTS)
    score_texts(tiny_neox, ["a@b.com"], prefixes=prefix, max_length=16, stride=8, cache=False, progress=False)
    assert "1 of 1 texts with the context before them are longer than the 16-token window" in capsys.readouterr().err


def test_segments_cover_each_token_once():
    ids = list(range(50))
    for window, stride in [(10, 5), (10, 9), (7, 3), (60, 30)]:
        segs = scoring._segments(0, [], ids, window, stride)
        covered = []
        for s in segs:
            assert len(s.ids) <= window and s.first_scored >= 1
            start = ids.index(s.ids[0])
            covered.extend(range(start + s.first_scored, start + len(s.ids)))
        assert covered == list(range(1, 50))


def test_auto_batches_cap_padding_and_budget():
    """Auto-sized batches hold every segment once, in length order, within the token budget, and pad at most
    MAX_PADDING of their real tokens (rows of 100, 96, 95, 60, 58, 20, 20, 20 tokens); a fixed batch size
    takes exactly that many rows, padding or not."""
    lengths = [60, 100, 20, 95, 58, 20, 96, 20]
    segs = [scoring._Segment(i, 0, list(range(n)), 1) for i, n in enumerate(lengths)]
    batches = scoring._batches(segs, None, token_budget=300)
    assert [[len(s.ids) for s in b] for b in batches] == [[100, 96, 95], [60, 58], [20, 20, 20]]
    for b in batches:
        padded, real = len(b) * len(b[0].ids), sum(len(s.ids) for s in b)
        assert padded <= 300 and padded <= (1 + scoring.MAX_PADDING) * real
    # the budget alone cuts a run of equal rows
    assert [len(b) for b in scoring._batches(segs[2:3] * 7, None, token_budget=60)] == [3, 3, 1]
    fixed = scoring._batches(segs, 3, token_budget=300)
    assert [[len(s.ids) for s in b] for b in fixed] == [[100, 96, 95], [60, 58, 20], [20, 20]]
    assert sorted(s.text_index for b in fixed for s in b) == list(range(8))


def test_long_texts_finish_as_the_pass_goes_not_all_at_its_end(monkeypatch):
    """A text is stored once all its windows are scored; one length sort over every window put each long
    text's shorter last window after all the full ones, so a pass killed at 80% had stored 25 of 200 long
    texts (0 of 7,200 at 45%). Chunks of texts now finish in turn; every window is scored once."""
    monkeypatch.setattr(scoring, "CHUNK_BATCHES", 4, raising=False)
    segs = [scoring._Segment(t, w, list(range(64 if w < 2 else 10 + t % 30)), 1) for t in range(200) for w in range(3)]
    batches = scoring._batches(segs, None, token_budget=640)
    assert sorted((s.text_index, s.order) for b in batches for s in b) == [(t, w) for t in range(200) for w in range(3)]
    left = collections.Counter(s.text_index for s in segs)
    done_at = []
    for b in batches:
        for seg in b:
            left[seg.text_index] -= 1
        done_at.append(sum(1 for n in left.values() if n == 0))
    assert done_at[int(0.8 * len(batches))] >= 0.7 * 200, done_at[int(0.8 * len(batches))]
    for b in batches:  # still length-sorted within a batch, within the padding cap
        assert len(b) * len(b[0].ids) <= (1 + scoring.MAX_PADDING) * sum(len(s.ids) for s in b) or len(b) == 1


def test_cpu_budget_gives_each_batch_worker_two_batches(tiny_neox, monkeypatch):
    """With batch workers (2 torch threads here) the auto budget shrinks so the tokens make at least two
    batches per worker, not below MIN_CPU_TOKEN_BUDGET nor above CPU_TOKEN_BUDGET; one thread keeps the full
    budget, and LEAKAUDIT_TOKEN_BUDGET still decides when set."""
    monkeypatch.delenv("LEAKAUDIT_TOKEN_BUDGET", raising=False)
    full, least = scoring.CPU_TOKEN_BUDGET, scoring.MIN_CPU_TOKEN_BUDGET
    with torch_threads(1):
        assert scoring._token_budget(tiny_neox, 5625) == full
    with torch_threads(2):
        assert scoring._token_budget(tiny_neox, 5625) == 1407  # ceil(5625 / 4)
        assert scoring._token_budget(tiny_neox, 10 * full) == full
        assert scoring._token_budget(tiny_neox, 100) == least
        monkeypatch.setenv("LEAKAUDIT_TOKEN_BUDGET", "300")
        assert scoring._token_budget(tiny_neox, 5625) == 300


def test_gpu_budget_counts_the_cache_of_rows_after_a_shared_prefix(tiny_neox, monkeypatch):
    """Rows scored after a shared prefix each hold every layer's keys and values of the prefix and their own
    tokens: on a GPU their token budget leaves room for that cache (it did not: Pythia-6.9B in fp32 with 50 GiB
    free batched 130 rows x 520 tokens, 66 GiB of cache); rows without a prefix keep the activations' budget."""
    import dataclasses

    from leakaudit.models import kv_cache_bytes_per_token

    monkeypatch.delenv("LEAKAUDIT_TOKEN_BUDGET", raising=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (50 * 2**30, 80 * 2**30))
    on_gpu = dataclasses.replace(tiny_neox, device=torch.device("cuda", 0))
    cfg = tiny_neox.model.config
    activations = cfg.hidden_size * 96 + cfg.num_hidden_layers * 64
    kv = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert kv_cache_bytes_per_token(tiny_neox.model, torch.float32) == kv
    assert scoring._token_budget(on_gpu, 10**6) == min(262144, 25 * 2**30 // activations)
    assert scoring._token_budget(on_gpu, 10**6, cached=True) == min(262144, 25 * 2**30 // (activations + kv))
    # memory torch's allocator holds reserved but unused is free to the next batch (mem_get_info counts it taken)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 6 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 2 * 2**30)
    assert scoring._token_budget(on_gpu, 10**6, cached=True) == min(262144, 27 * 2**30 // (activations + kv))
    monkeypatch.undo()
    monkeypatch.delenv("LEAKAUDIT_TOKEN_BUDGET", raising=False)
    # the plan sizes each group's batches with its own budget
    monkeypatch.setattr(scoring, "_token_budget", lambda lm, total, cached=False: 40 if cached else 10**6)
    sizes: dict[bool, list[int]] = {True: [], False: []}
    real = scoring._score_batch

    def recording(lm, batch, moments, padding_side, prefix, head):
        sizes[prefix is not None].append(len(batch))
        return real(lm, batch, moments, padding_side, prefix, head)

    monkeypatch.setattr(scoring, "_score_batch", recording)
    texts = [f"reply number {i} to the note" for i in range(6)]
    score_texts(tiny_neox, texts, prefixes="A long shared instruction that every row is scored after:",
                cache=False, progress=False)
    score_texts(tiny_neox, texts, cache=False, progress=False)
    assert len(sizes[True]) > 1 and max(sizes[True]) < 6 and sizes[False] == [6]


def test_kv_cache_size_is_what_the_cache_holds():
    """Per-token cache bytes from the text config and the model's own head size: a Qwen3 head of 16 where
    hidden / heads is 8 (half the real size before), and a Gemma 3 wrapper whose top level has no layers."""
    import types

    from transformers import Gemma3Config, Qwen3Config, Qwen3ForCausalLM

    from leakaudit.models import kv_cache_bytes_per_token

    qwen = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    with torch.no_grad():
        cache = qwen(torch.tensor([[1, 2, 3, 4, 5]]), use_cache=True).past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_cache_bytes_per_token(qwen, torch.float32) == held / 5 == 512
    gemma = Gemma3Config(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=1, head_dim=24))
    assert kv_cache_bytes_per_token(types.SimpleNamespace(config=gemma), torch.bfloat16) == 2 * 3 * 1 * 24 * 2


@pytest.mark.parametrize("save_every", [0.0, 1e9])
def test_a_killed_pass_keeps_the_texts_it_finished(save_every, tiny_neox, tmp_path, monkeypatch):
    """The cache was written only after the whole pass: a kill late in a long one lost everything scored. Texts
    are stored as they finish (every CACHE_SAVE_S, and when the pass is stopped), so the rerun scores only what
    was left, to the same values; a text longer than the window is stored only once all its windows are in."""
    monkeypatch.setattr(scoring, "CACHE_SAVE_S", save_every)
    real, calls = scoring._score_batch, []

    class Kill(Exception):
        pass

    def killed_after(n):
        def batch(*args, **kwargs):
            calls.append(1)
            if len(calls) > n:
                raise Kill
            return real(*args, **kwargs)
        return batch

    def killed_then_rerun(texts, kill_after, **kw):
        store = ScoreCache(tmp_path / f"c{kill_after}.sqlite")
        calls.clear()
        monkeypatch.setattr(scoring, "_score_batch", killed_after(kill_after))
        with pytest.raises(Kill):
            score_texts(tiny_neox, texts, batch_size=1, cache=store, progress=False, **kw)
        calls.clear()
        monkeypatch.setattr(scoring, "_score_batch", killed_after(10 ** 6))
        return score_texts(tiny_neox, texts, batch_size=1, cache=store, progress=False, **kw), len(calls)

    calls.clear()
    monkeypatch.setattr(scoring, "_score_batch", killed_after(10 ** 6))
    straight = score_texts(tiny_neox, TEXTS, batch_size=1, cache=False, progress=False)
    batches = len(calls)  # one window per text ("x" has no token to score: none)
    again, rescored = killed_then_rerun(TEXTS, 3)
    assert batches > 3 and rescored == batches - 3  # the three texts scored before the kill were kept
    assert all(np.allclose(a.logp, b.logp, atol=1e-5) for a, b in zip(straight, again, strict=True))
    long = [" ".join(TEXTS) * 2]
    windows = len(scoring._segments(0, [], tiny_neox.tokenizer(long[0])["input_ids"], 32, 16))
    again, rescored = killed_then_rerun(long, 2, max_length=32)
    assert windows > 2 and rescored == windows  # half a text is never stored
    (straight,) = score_texts(tiny_neox, long, batch_size=1, cache=False, max_length=32, progress=False)
    assert np.allclose(straight.logp, again[0].logp, atol=1e-5)


def test_cache_hit_does_not_call_model(tiny_neox, tmp_path, monkeypatch):
    store = ScoreCache(tmp_path / "c.sqlite")
    first = score_texts(tiny_neox, TEXTS, moments=True, cache=store)

    def boom(*args, **kwargs):
        raise AssertionError("model called on a cache hit")

    monkeypatch.setattr(scoring, "_score_batch", boom)
    again = score_texts(tiny_neox, TEXTS, moments=True, cache=store)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.logp, b.logp) and np.array_equal(a.mu, b.mu) and np.array_equal(a.var, b.var)
    # A run without moments is served by rows that have them.
    plain = score_texts(tiny_neox, TEXTS, cache=store)
    assert np.array_equal(plain[0].logp, first[0].logp)
    # Different options are a different key: this must compute (and hit the patched function).
    with pytest.raises(AssertionError, match="cache hit"):
        score_texts(tiny_neox, TEXTS, max_length=32, cache=store)


def test_a_gpu_score_is_cached_apart_from_a_cpu_score(tiny_neox, monkeypatch):
    """A GPU's kernels round otherwise than a CPU's at the same dtype: a cache shared by both (a home directory
    on a cluster) keeps their scores apart; a CPU's keys are those it had before the device joined the key."""
    import dataclasses

    seen = []
    monkeypatch.setattr(scoring, "_score_keyed", lambda lm, keys, tok, options, *a, **k: seen.append((options, keys)))
    for device in ("cpu", "cuda"):
        score_texts(dataclasses.replace(tiny_neox, device=torch.device(device)), TEXTS[:1], progress=False)
    (cpu, cpu_keys), (gpu, gpu_keys) = seen
    assert (cpu.device, gpu.device) == ("cpu", "cuda") and cpu_keys != gpu_keys
    assert json.loads(cpu.key()) == {"v": scoring.SCORING_VERSION, "L": cpu.max_length, "s": cpu.stride,
                                     "dtype": cpu.dtype}


def test_a_broken_cache_file_or_row_is_rebuilt_not_trusted(tiny_neox, tmp_path):
    """A cache is an accelerator: a file cut short or overwritten (a raw sqlite3.DatabaseError before) is
    moved aside and rebuilt; a row whose values cannot be scores (a cut blob, a positive log p) is a miss,
    scored again, never handed to the attacks."""
    import sqlite3

    path = tmp_path / "c.sqlite"
    fresh = score_texts(tiny_neox, TEXTS, moments=True, cache=False, progress=False)
    store = ScoreCache(path)
    score_texts(tiny_neox, TEXTS, moments=True, cache=store, progress=False)
    store.close()
    path.write_bytes(os.urandom(100))
    store = ScoreCache(path)
    again = score_texts(tiny_neox, TEXTS, moments=True, cache=store, progress=False)
    store.close()
    assert all(np.array_equal(a.logp, b.logp) for a, b in zip(again, fresh, strict=True))
    assert (tmp_path / "c.sqlite.corrupt").exists()
    with sqlite3.connect(str(path)) as conn:
        keys = [k for (k,) in conn.execute("SELECT key FROM scores")]
        conn.execute("UPDATE scores SET logp = ? WHERE key = ?", (np.array([1.0, 2.0], np.float32).tobytes(), keys[0]))
        conn.execute("UPDATE scores SET logp = ? WHERE key = ?", (b"abc", keys[1]))
    again = score_texts(tiny_neox, TEXTS, moments=True, cache=ScoreCache(path), progress=False)
    # the two rows are scored again in a batch of their own: equal up to the kernels' rounding for that batch
    # shape (bit-equal on some CPUs, not on one without AVX-512); the broken values were 1.0/2.0 and 3 bytes
    assert all(np.allclose(a.logp, b.logp, rtol=0, atol=1e-5) and np.allclose(a.var, b.var, rtol=1e-5, atol=0)
               for a, b in zip(again, fresh, strict=True))


def test_a_locked_or_full_cache_is_an_error_not_a_rebuild(tmp_path):
    """An OperationalError (locked by another process, disk full) says nothing about the file's content:
    moving a good cache aside would throw away every score in it."""
    import sqlite3

    store = ScoreCache(tmp_path / "c.sqlite")
    with pytest.raises(sqlite3.OperationalError):
        store._rebuild(sqlite3.OperationalError("database is locked"))
    assert not (tmp_path / "c.sqlite.corrupt").exists() and (tmp_path / "c.sqlite").exists()


def test_a_separator_inside_prefix_or_text_is_not_a_cache_collision(tiny_neox, tmp_path):
    """The key hashes its parts length-prefixed: ("A\x1fB", "C D E") and ("A", "B\x1fC D E") once shared one."""
    store = ScoreCache(tmp_path / "c.sqlite")
    score_texts(tiny_neox, ["C D E"], prefixes=["A\x1fB"], cache=store, progress=False)
    cached = score_texts(tiny_neox, ["B\x1fC D E"], prefixes=["A"], cache=store, progress=False)[0]
    fresh = score_texts(tiny_neox, ["B\x1fC D E"], prefixes=["A"], cache=False, progress=False)[0]
    assert np.array_equal(cached.logp, fresh.logp)


@pytest.mark.parametrize("batch_size", [1, "auto", 7])
def test_empty_and_one_token_texts_score_as_nothing(tiny_model, batch_size):
    """Nothing to score (no token has a left context): zero tokens, no forward pass, beside other texts."""
    one = tiny_model.tokenizer.decode(tiny_model.tokenizer("Hi")["input_ids"][:1])
    texts = ["", one, TEXTS[0]]
    got = score_texts(tiny_model, texts, moments=True, batch_size=batch_size, cache=False, progress=False)
    assert [g.n_tokens for g in got[:2]] == [0, 0] and got[0].mu is not None
    alone = score_texts(tiny_model, [TEXTS[0]], moments=True, cache=False, progress=False)[0]
    np.testing.assert_allclose(got[2].logp, alone.logp, atol=1e-5)
    assert score_ids(tiny_model, [[]], [[]], cache=False)[0].n_tokens == 0


def test_duplicate_texts_scored_once(tiny_neox, monkeypatch):
    calls = []
    real = scoring._score_batch

    def counting(lm, batch, *a, **k):
        calls.append(len(batch))
        return real(lm, batch, *a, **k)

    monkeypatch.setattr(scoring, "_score_batch", counting)
    out = score_texts(tiny_neox, ["same text", "same text", "other"], cache=False, batch_size=1)
    assert sum(calls) == 2
    assert np.array_equal(out[0].logp, out[1].logp)


def test_score_cli_writes_rows(tmp_path):
    from typer.testing import CliRunner

    from leakaudit.cli import app

    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    out = tmp_path / "s.jsonl"
    res = CliRunner().invoke(app, ["score", "--model", "tiny-opt", "--data", str(data), "--id-field", "id",
                                   "--out", str(out), "--token-logprobs", "--no-cache"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [str(i) for i in range(len(TEXTS))]
    for r in rows:
        assert len(r["token_logprobs"]) == r["n_tokens"]
        if r["n_tokens"]:
            assert math.isclose(r["sum_logp"], sum(r["token_logprobs"]), abs_tol=1e-3)


def test_score_cli_writes_null_not_nan_for_a_text_with_no_scored_token(tmp_path, monkeypatch, capsys):
    """A one-token text (no BOS) has no mean: the row said NaN, which strict JSON parsers refuse."""
    from conftest import run_main

    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "Give three tips."}) + "\n" + json.dumps({"text": "a"}) + "\n")
    out = tmp_path / "s.jsonl"
    code, err = run_main(["score", "--model", "tiny-gpt-neox", "--data", str(data), "--out", str(out),
                          "--no-cache"], monkeypatch, capsys)
    assert code == 0, err
    rows = [json.loads(x, parse_constant=lambda c: pytest.fail(f"{c} in the output")) for x in
            out.read_text().splitlines()]
    assert rows[1]["n_tokens"] == 0 and rows[1]["mean_logp"] is None and rows[0]["mean_logp"] < 0
    assert "warning: 1 of 2 texts have no scored token" in err and f"the first: {data}:2" in err


@pytest.mark.default_model
def test_default_model_scores_finite(default_model):
    res = score_texts(default_model, ["The email address of Karen Arnold is"], moments=True, cache=False)[0]
    assert res.n_tokens > 3
    assert np.isfinite(res.logp).all() and np.isfinite(res.mu).all() and (res.logp <= 0).all()
    lp, _, _ = _reference(default_model, "The email address of Karen Arnold is")
    np.testing.assert_allclose(res.logp, lp, atol=1e-3)
    # Rows after a shared prefix (its keys and values reused) equal the hand computation on this architecture.
    texts = [SHARED + e for e in ENDINGS[:3]]
    for text, got in zip(texts, score_texts(default_model, texts, cache=False), strict=True):
        np.testing.assert_allclose(got.logp, _reference(default_model, text)[0], atol=1e-3)
    # Two batch workers on this architecture (Llama) give the one-thread serial numbers.
    with torch_threads(1):
        serial = score_texts(default_model, TEXTS, moments=True, cache=False, batch_size=1)
    with torch_threads(2):
        parallel = score_texts(default_model, TEXTS, moments=True, cache=False, batch_size=1)
    for a, b in zip(serial, parallel, strict=True):
        assert np.array_equal(a.logp, b.logp) and np.array_equal(a.var, b.var)



def test_a_progress_bar_prints_nothing_where_stderr_is_no_terminal(capsys):
    """Into a pipe or log file rich drew nothing but an empty line when the bar ended: one blank line between
    every progress line of a run's log. Every bar is this one (no other rich Progress in the package)."""
    from pathlib import Path

    from rich.progress import TextColumn

    from leakaudit.progress import progress_bar

    with progress_bar(TextColumn("x")) as bar:
        bar.update(bar.add_task("a", total=2), advance=1)
    assert capsys.readouterr().err == ""
    package = Path(scoring.__file__).parent
    others = [str(f.relative_to(package)) for f in package.rglob("*.py")
              if "Progress(" in f.read_text() and f.name != "progress.py"]
    assert others == []


def test_a_cache_that_cannot_be_written_midway_does_not_stop_the_pass(tiny_neox, tmp_path, monkeypatch, capsys):
    """The saves along the way are insurance: a locked cache there was re-raised and aborted the pass."""
    import sqlite3

    from leakaudit import warn

    monkeypatch.setattr(scoring, "CACHE_SAVE_S", 0.0)
    warn._WARNED.clear()
    store = ScoreCache(tmp_path / "c.sqlite")
    real, failures = store.put_many, []

    def locked_once(items):
        if not failures:
            failures.append(1)
            raise sqlite3.OperationalError("database is locked")
        return real(items)

    monkeypatch.setattr(store, "put_many", locked_once)
    scored = score_texts(tiny_neox, TEXTS, batch_size=1, cache=store, progress=False)
    assert failures and "could not be written while scoring (database is locked)" in capsys.readouterr().err
    def boom(*args, **kwargs):
        raise AssertionError("scored again: the end of the pass did not store what the failed save held")

    monkeypatch.setattr(scoring, "_score_batch", boom)
    again = score_texts(tiny_neox, TEXTS, batch_size=1, cache=ScoreCache(tmp_path / "c.sqlite"), progress=False)
    assert all(np.array_equal(a.logp, b.logp) for a, b in zip(scored, again, strict=True))


def test_scores_follow_weights_changed_in_place(tmp_path):
    """A notebook's in-place change to a loaded model's weights (p.mul_(3), load_state_dict, a training step)
    returned the scores cached for the weights it had at load: the fingerprint was taken once, from the files."""
    from leakaudit.models import load_model

    lm = load_model("tiny-gpt-neox", dtype="fp32")
    store = ScoreCache(tmp_path / "c.sqlite")
    before = score_texts(lm, TEXTS[:2], cache=store, progress=False)
    loaded = lm.fingerprint
    assert score_texts(lm, TEXTS[:2], cache=store, progress=False)[0].logp.tolist() == before[0].logp.tolist()
    assert lm.current_fingerprint() == loaded  # scoring itself changes no weight
    saved = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with torch.no_grad():
        for p in lm.model.parameters():
            p.mul_(3)
    after = score_texts(lm, TEXTS[:2], cache=store, progress=False)
    fresh = score_texts(lm, TEXTS[:2], cache=False, progress=False)
    assert lm.fingerprint.startswith("mem-") and lm.fingerprint != loaded
    assert all(np.array_equal(a.logp, f.logp) for a, f in zip(after, fresh, strict=True))
    assert not np.allclose(after[0].logp, before[0].logp)
    lm.model.load_state_dict(saved)  # back to the loaded weights: their scores again (hashed, not the file's key)
    back = score_texts(lm, TEXTS[:2], cache=store, progress=False)
    assert all(np.allclose(a.logp, b.logp, atol=1e-6) for a, b in zip(back, before, strict=True))
    store.close()


def test_two_threads_scoring_one_model_get_its_scores(tiny_neox):
    """A pass swaps the model's LM head for identity: a second pass on the same model from another thread read
    hidden states as logits ("index 448 is out of bounds for dimension 1 with size 64"). Passes on one model
    now take turns; each thread gets the scores one thread alone gets."""
    import threading

    texts = [f"{t} ({i})" for i in range(6) for t in TEXTS]
    alone = score_texts(tiny_neox, texts, cache=False, progress=False, moments=True)
    got: dict[int, list] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            got[k] = score_texts(tiny_neox, texts, cache=False, progress=False, moments=True, batch_size=2)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and sorted(got) == [0, 1, 2]
    for scores in got.values():
        assert all(np.allclose(a.logp, b.logp, atol=1e-5) and np.allclose(a.var, b.var, atol=1e-5)
                   for a, b in zip(scores, alone, strict=True))


def test_passes_in_two_threads_leave_torchs_thread_count_as_they_found_it(tiny_neox, tiny_opt):
    """torch's thread count is the process's: a pass lowers it for its batch workers and restores it. Two passes
    overlapping in two threads each restored what it had found, so the one ending last left the other's lowered
    count for good (4 threads: 2 after). Entered A, B, left A, B in that order here, by hand."""
    from leakaudit.scoring import _batch_workers

    with torch_threads(4):
        a, b = _batch_workers(tiny_neox, 8), _batch_workers(tiny_opt, 8)
        (_, workers_a), (_, workers_b) = a.__enter__(), b.__enter__()
        assert (workers_a, workers_b) == (2, 2) and torch.get_num_threads() == 2  # both on shares of the 4
        a.__exit__(None, None, None)
        assert torch.get_num_threads() == 2  # B still runs on its share
        b.__exit__(None, None, None)
        assert torch.get_num_threads() == 4


def test_a_pass_waiting_for_another_keeps_the_mode_and_fingerprint_it_finds(tmp_path):
    """Another thread's pass holds the model (eval mode, LM head swapped out): a pass waiting for it read the
    model's mode before waiting (so a training model came back in eval mode), and a fingerprint taken meanwhile
    hashed the model without its head (a lasting `mem-` key that missed the cache ever after)."""
    import threading
    import time

    from leakaudit.models import load_model, model_lock
    from leakaudit.scoring import _hidden_state_head

    lm = load_model("tiny-gpt-neox", dtype="fp32")
    loaded = lm.fingerprint
    lock = model_lock(lm.model)
    got: dict[str, object] = {}
    with lock:  # stands in for another thread's pass, mid-way
        lm.model.eval()
        with _hidden_state_head(lm.model):
            waiting = [threading.Thread(target=lambda: got.update(fp=lm.current_fingerprint())),
                       threading.Thread(target=lambda: got.update(scores=score_texts(lm, TEXTS[:1], cache=False,
                                                                                     progress=False)))]
            for th in waiting:
                th.start()
            time.sleep(0.3)
            assert all(th.is_alive() for th in waiting) and not got  # both wait for the pass
        lm.model.train(True)  # the pass ends, restoring the training mode it found
    for th in waiting:
        th.join()
    assert got["fp"] == loaded == lm.fingerprint and lm.model.training and len(got["scores"]) == 1


def test_the_progress_counts_the_tokens_the_pass_scores(tiny_neox, monkeypatch, capsys):
    """The bar counted every window's tokens, context included: a pass that scored 707,000 tokens showed a
    total of 1,189,736. It counts the scored tokens now, the n_tokens its result sums to."""
    monkeypatch.setenv("LEAKAUDIT_PROGRESS_INTERVAL", "0.000001")  # a line per batch, into the captured log
    monkeypatch.setattr(scoring, "PROGRESS_MIN_TOKENS", 0)
    long = [" ".join(f"word{i}" for i in range(150)), " ".join(f"term{i}" for i in range(150))]
    res = score_texts(tiny_neox, long, max_length=64, stride=16, batch_size=1, cache=False)
    scored = sum(r.n_tokens for r in res)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("scoring: ")]
    assert lines and all(f"/{scored} tok" in x for x in lines), (scored, lines[:2])


def test_the_progress_advances_by_the_tokens_it_counts(tiny_neox, monkeypatch):
    """Its total is the scored tokens, so each batch advances it by its scored tokens, not its windows' (which
    ran it past its total)."""
    import contextlib

    seen = {"advanced": 0}

    @contextlib.contextmanager
    def progress(enabled, description, total):
        seen["total"] = total
        yield lambda n: seen.__setitem__("advanced", seen["advanced"] + n)

    monkeypatch.setattr(scoring, "_progress", progress)
    long = [" ".join(f"word{i}" for i in range(150)), " ".join(f"term{i}" for i in range(150))]
    res = score_texts(tiny_neox, long, max_length=64, stride=16, batch_size=1, cache=False)
    assert seen["advanced"] == seen["total"] == sum(r.n_tokens for r in res)
