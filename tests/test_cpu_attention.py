"""The bf16 CPU attention scoring runs (models.cpu_attention): the same numbers as sdpa in fp32, within bf16
rounding in bf16, on every mask the engine passes (causal, padding on either side, a shared prefix's cache)."""

from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from leakaudit.models import cpu_attention, load_model, scoring_attention
from leakaudit.scoring import score_texts

CAUSAL = types.SimpleNamespace(is_causal=True)  # what the function reads of the attention module


def _qkv(b, heads, kv_heads, lq, lk, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, heads, d, generator=g).transpose(1, 2)  # transformers passes transposed views
    k = torch.randn(b, lk, kv_heads, d, generator=g).transpose(1, 2)
    v = torch.randn(b, lk, kv_heads, d, generator=g).transpose(1, 2)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _sdpa(q, k, v, mask):
    """Reference: torch's sdpa on repeated key/value heads, (b, lq, heads, d) like the interface returns."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if mask is None:
        lq, lk = q.shape[2], k.shape[2]
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("block", [4, 64])  # several blocks, the last one short; one block
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])  # grouped-query and plain heads
def test_blocks_equal_sdpa_in_fp32(monkeypatch, block, heads, kv_heads):
    monkeypatch.setattr(cpu_attention, "BLOCK", block)
    q, k, v = _qkv(3, heads, kv_heads, 11, 11)
    out, _ = cpu_attention.blocked_attention(CAUSAL, q, k, v, None)
    torch.testing.assert_close(out, _sdpa(q, k, v, None), rtol=0, atol=1e-5)
    # Right padding (rows 1, 2 shorter), as the engine's batches: the boolean mask transformers builds.
    lengths = torch.tensor([11, 7, 3])
    keep = torch.arange(11)[None] < lengths[:, None]
    mask = torch.ones(11, 11, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    out, _ = cpu_attention.blocked_attention(CAUSAL, q, k, v, mask)
    for row, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[row, :n], _sdpa(q, k, v, mask)[row, :n], rtol=0, atol=1e-5)


def test_left_padding_rows_stay_finite(monkeypatch):
    """A left-padded row's leading queries see no key at all: their output is finite (not NaN, which the next
    layer's values would carry into real rows) and the real queries get sdpa's numbers."""
    monkeypatch.setattr(cpu_attention, "BLOCK", 4)
    q, k, v = _qkv(2, 6, 2, 9, 9)
    keep = torch.tensor([[True] * 9, [False] * 4 + [True] * 5])
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    out, _ = cpu_attention.blocked_attention(CAUSAL, q, k, v, mask)
    assert torch.isfinite(out).all()
    ref = _sdpa(q, k, v, mask)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1, 4:], ref[1, 4:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_mask", [False, True])
def test_queries_after_a_cache(monkeypatch, with_mask):
    """Rows after a shared prefix: 5 queries over 13 keys (8 cached), causal with the offset."""
    monkeypatch.setattr(cpu_attention, "BLOCK", 2)
    q, k, v = _qkv(2, 6, 3, 5, 13)
    mask = torch.ones(5, 13, dtype=torch.bool).tril(8)[None, None].expand(2, 1, 5, 13) if with_mask else None
    out, _ = cpu_attention.blocked_attention(CAUSAL, q, k, v, mask)
    torch.testing.assert_close(out, _sdpa(q, k, v, mask), rtol=0, atol=1e-5)



def test_mask_plan_is_worked_out_once_per_mask(monkeypatch):
    """Every layer of a forward gets the same mask object: its plan is reused, and a mask changed in place, a
    new mask or another block size gets a new one (and sdpa's numbers)."""
    monkeypatch.setattr(cpu_attention, "BLOCK", 4)
    q, k, v = _qkv(2, 6, 2, 9, 9)
    keep = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    plan = cpu_attention._mask_plan(mask, 9, 9, True, mask.device)
    assert cpu_attention._mask_plan(mask, 9, 9, True, mask.device) is plan
    assert [start for *_, start, _ in plan] == [1, 5, 6]  # the diagonal's first hidden key; row 1's padding
    mask[1, :, :, 2] = False  # in place: key 2 hidden from every query of row 1
    assert cpu_attention._mask_plan(mask, 9, 9, True, mask.device) is not plan
    out, _ = cpu_attention.blocked_attention(CAUSAL, q, k, v, mask)
    torch.testing.assert_close(out[:, :6], _sdpa(q, k, v, mask)[:, :6], rtol=0, atol=1e-5)
    monkeypatch.setattr(cpu_attention, "BLOCK", 2)
    assert len(cpu_attention._mask_plan(mask, 9, 9, True, mask.device)) == 5


def test_bf16_within_rounding_of_fp32():
    q, k, v = _qkv(2, 9, 3, 70, 70, d=64)
    want = _sdpa(q, k, v, None)
    got, _ = cpu_attention.blocked_attention(CAUSAL, q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    flash = _sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    err, flash_err = (got.float() - want).abs().mean(), (flash.float() - want).abs().mean()
    assert got.dtype == torch.bfloat16 and err < 3 * flash_err and err < 2e-2


def test_what_it_does_not_handle_goes_to_sdpa():
    """A float mask (ALiBi's biases, say) and a position bias are sdpa's: the same output, bit for bit; what sdpa
    refuses (soft-capping), it refuses the same way."""
    q, k, v = _qkv(2, 4, 4, 6, 6)
    bias = torch.randn(2, 1, 6, 6).tril()
    module = types.SimpleNamespace(is_causal=True, training=False)
    got, _ = cpu_attention.blocked_attention(module, q, k, v, bias)
    want, _ = sdpa_attention_forward(module, q, k, v, bias)
    assert torch.equal(got, want)
    got, _ = cpu_attention.blocked_attention(module, q, k, v, None, position_bias=bias.expand(2, 4, 6, 6))
    want, _ = sdpa_attention_forward(module, q, k, v, None, position_bias=bias.expand(2, 4, 6, 6))
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="softcap"):
        cpu_attention.blocked_attention(module, q, k, v, None, softcap=30.0)


TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hi",
         "Please forward the contract to Karen before Friday, thanks, and copy Mark on the reply.", "x"]


@pytest.mark.parametrize("spec", ["tiny-gpt-neox", "tiny-opt"])
def test_bf16_scoring_runs_blocks_within_rounding(monkeypatch, spec):
    """A bf16 model on the CPU scores through the blocks (and gets sdpa back afterwards); its numbers are as
    close to the fp32 model's as the flash kernel's are, and batching, padding side and shared prefixes still
    agree within bf16 rounding. An fp32 model never runs them (its numbers stay bit for bit)."""
    calls = []
    real = cpu_attention.blocked_attention
    monkeypatch.setitem(AttentionInterface._global_mapping, cpu_attention.NAME,
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fp32 = load_model(spec, dtype="fp32")
    ref = score_texts(fp32, TEXTS, moments=True, cache=False)
    assert not calls
    lm = load_model(spec, dtype="bf16")
    got = score_texts(lm, TEXTS, moments=True, cache=False)
    assert calls and lm.model.config._attn_implementation == "sdpa"
    with monkeypatch.context() as m:  # the flash kernel, for the size of bf16 rounding
        m.setattr("leakaudit.scoring.scoring_attention", lambda *a: contextlib.nullcontext())
        flash = score_texts(lm, TEXTS, moments=True, cache=False)
    tokens = lambda rs: np.concatenate([r.logp for r in rs])  # noqa: E731
    err, flash_err = np.abs(tokens(got) - tokens(ref)).mean(), np.abs(tokens(flash) - tokens(ref)).mean()
    assert err < 2 * flash_err + 1e-3 and err < 0.05
    tol = 0.05  # nats per token: bf16 rounding of a batch of another shape
    for bs, side in ((1, "right"), (len(TEXTS), "left")):
        other = score_texts(lm, TEXTS, batch_size=bs, padding_side=side, cache=False)
        np.testing.assert_allclose(tokens(other), tokens(got), atol=tol)
    prefix = "Subject: the quarterly meeting notes, as promised, with the numbers for the desk"
    shared = score_texts(lm, [prefix + t for t in TEXTS], cache=False)
    alone = [score_texts(lm, [prefix + t], cache=False)[0] for t in TEXTS]
    np.testing.assert_allclose(tokens(shared), tokens(alone), atol=tol)


def test_switch_only_for_bf16_on_cpu(tiny_neox):
    """fp32 (and any non-CPU device) keeps sdpa inside the block; bf16 on the CPU switches and restores."""
    with scoring_attention(tiny_neox.model, torch.device("cpu")):
        assert tiny_neox.model.config._attn_implementation == "sdpa"
    lm = load_model("tiny-gpt-neox", dtype="bf16")
    with scoring_attention(lm.model, torch.device("meta")):
        assert lm.model.config._attn_implementation == "sdpa"
    with pytest.raises(KeyError), scoring_attention(lm.model, torch.device("cpu")):
        assert lm.model.config._attn_implementation == cpu_attention.NAME
        raise KeyError("a failing pass")
    assert lm.model.config._attn_implementation == "sdpa"


@pytest.mark.default_model
def test_default_model_bf16_blocks_within_rounding(default_model, monkeypatch):
    """On the default model (Llama, 9 query heads sharing 3 key/value heads) the blocks keep bf16 scores as
    close to fp32 as the flash kernel does."""
    texts = TEXTS + ["Subject: gas desk\nKaren, the numbers for the west desk are attached; call me after three."]
    ref = np.concatenate([r.logp for r in score_texts(default_model, texts, cache=False)])
    lm = load_model("default", dtype="bf16")
    got = np.concatenate([r.logp for r in score_texts(lm, texts, cache=False)])
    monkeypatch.setattr("leakaudit.scoring.scoring_attention", lambda *a: contextlib.nullcontext())
    flash = np.concatenate([r.logp for r in score_texts(lm, texts, cache=False)])
    assert np.abs(got - ref).mean() < 2 * np.abs(flash - ref).mean() + 1e-3
