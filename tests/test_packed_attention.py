"""Per-example attention for packed training rows: the same loss and gradients as sdpa under transformers'
block-diagonal mask, sdpa's own path whenever the mask says more than packing, and used by finetune."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from leakaudit.models import load_model
from leakaudit.train import examples as ex
from leakaudit.train import packed_attention as pa
from leakaudit.train.finetune import FinetuneConfig, finetune


def _tiny_llama() -> LlamaForCausalLM:
    """Grouped-query heads (4 query heads share 2 key/value heads), as the default model has (9 and 3)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).float().train()


def _packed_batch(max_tokens: int | None) -> dict:
    g = torch.Generator().manual_seed(1)
    items = []
    for n in (7, 12, 3, 20, 9, 5):
        ids = torch.randint(1, 97, (n,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": ids})
    return ex.PackedCollator(max_tokens)(items)


def _loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_kind", ["llama", "gpt_neox"])
@pytest.mark.parametrize("rows", [1, 3])
def test_per_example_attention_matches_sdpa_under_the_packed_mask(model_kind, rows, monkeypatch):
    model = _tiny_llama() if model_kind == "llama" else load_model("tiny-gpt-neox", dtype="fp32").model.train()
    batch = _packed_batch(None if rows == 1 else 32)  # 32 tokens a row: the examples fill three padded rows
    assert batch["input_ids"].shape[0] == (1 if rows == 1 else 3)
    assert model.config._attn_implementation == "sdpa"
    want_loss, want_grads = _loss_and_grads(model, batch)

    def no_fallback(*args, **kwargs):
        raise AssertionError("plain packing must not fall back to sdpa")

    monkeypatch.setattr(pa, "sdpa_attention_forward", no_fallback)
    with pa.packed_attention(model, torch.device("cpu")):
        assert model.config._attn_implementation == pa.NAME
        loss, grads = _loss_and_grads(model, batch)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert loss == pytest.approx(want_loss, rel=1e-6)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-5, atol=1e-6)


def test_a_padding_mask_beside_packing_goes_to_sdpa():
    model = _tiny_llama().eval()
    batch = _packed_batch(None)
    mask = torch.ones_like(batch["input_ids"])
    mask[0, -4:] = 0  # a padding mask the block-diagonal one does not express
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": mask}
    with torch.no_grad():
        want = model(**inputs).logits
        with pa.packed_attention(model, torch.device("cpu")):
            got = model(**inputs).logits
            plain = model(input_ids=batch["input_ids"]).logits  # no position ids: one causal sequence
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(plain, model(input_ids=batch["input_ids"]).logits)


def test_other_devices_and_attention_implementations_are_left_alone():
    model = _tiny_llama()
    with pa.packed_attention(model, torch.device("cuda")):
        assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    with pa.packed_attention(model, torch.device("cpu")):
        assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("packing", [True, False])
def test_finetune_trains_packed_rows_with_per_example_attention(packing, tmp_path, monkeypatch):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"Row {i}: a short text about item {i}."}) + "\n"
                            for i in range(8)))
    calls = []
    segments = pa._segments

    def counting(mask, position_ids):
        plan = segments(mask, position_ids)
        calls.append(plan is not None)
        return plan

    monkeypatch.setattr(pa, "_segments", counting)
    config = FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "out"), epochs=1,
                            batch_size=4, gradient_accumulation=1, learning_rate=1e-2, packing=packing)
    finetune(config, progress=False)
    # packed batches: every layer of every forward splits its rows by example; padded ones never get here
    assert (calls and all(calls)) if packing else not calls
