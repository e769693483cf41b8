"""Perplexity and `score` of conversations (format chat): over their assistant replies' tokens, each reply after
all that comes before it, the tokens a chat fine-tune's loss is on — checked against float64 passes over the
fine-tune's own labels, against a chat fine-tune's own eval loss at every epoch, and the CLI, the experiment
kind and the function against each other."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from chat_cases import CHATML, LONGER, NO_CACHE, ONE_TURN, OTHERS
from chat_cases import trained_runs as _trained_runs
from conftest import run_main, torch_threads

from leakaudit.perplexity import perplexity

OTHER = OTHERS[0]
CHATS = [ONE_TURN, LONGER, OTHER]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def _logp_by_hand(lm, chat: list[dict[str, str]]) -> np.ndarray:
    """log p of every trained reply token after the ids before it: one unbatched float64 pass per reply."""
    import torch

    out = []
    for context, reply in _trained_runs(lm.tokenizer, chat):
        seq = context + reply
        with torch.no_grad():
            lp = torch.log_softmax(lm.model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
        out += [lp[t - 1, seq[t]].item() for t in range(len(context), len(seq))]
    return np.array(out)


def _rows(path, chats, field="messages", text=True):
    path.write_text("".join(json.dumps({**({"text": " ".join(m["content"] for m in c)} if text else {}),
                                        field: c}) + "\n" for c in chats))
    return path


@pytest.mark.parametrize("template", ["plain", "chatml"])
def test_chat_perplexity_is_exp_of_the_mean_nll_of_every_trained_reply_token(tiny_neox, monkeypatch, template):
    """corpus ppl = exp(total NLL / total tokens) and mean ppl = mean of each conversation's exp(mean NLL), over
    exactly the tokens the fine-tune's labels train (every reply of LONGER, not its system or user turns), by
    hand in float64; batched = one at a time; not the perplexity of the replies' text alone."""
    monkeypatch.setattr(tiny_neox.tokenizer, "chat_template", CHATML if template == "chatml" else None,
                        raising=False)
    logp = [_logp_by_hand(tiny_neox, c) for c in CHATS]
    assert len(_trained_runs(tiny_neox.tokenizer, LONGER)) == 2  # both replies, each in its context
    got = perplexity(tiny_neox, chats=CHATS, **NO_CACHE)
    n = sum(len(x) for x in logp)
    assert (got.n_texts, got.n_tokens) == (3, n)
    assert got.ppl == pytest.approx(math.exp(-sum(x.sum() for x in logp) / n), rel=1e-5)
    assert got.nll_per_token == pytest.approx(-sum(x.sum() for x in logp) / n, rel=1e-5)
    assert got.mean_text_ppl == pytest.approx(np.mean([math.exp(-x.mean()) for x in logp]), rel=1e-5)
    one = perplexity(tiny_neox, chats=CHATS, batch_size=1, **NO_CACHE)
    assert (one.ppl, one.mean_text_ppl) == pytest.approx((got.ppl, got.mean_text_ppl), rel=1e-5)
    from leakaudit.data.chat import reply_text

    texts = perplexity(tiny_neox, [reply_text(c) for c in CHATS], **NO_CACHE)
    assert abs(texts.ppl - got.ppl) > 1e-3 * got.ppl
    with pytest.raises(TypeError, match="give texts or chats"):
        perplexity(tiny_neox, ["a text"], chats=CHATS, **NO_CACHE)
    from leakaudit.errors import InputError

    with pytest.raises(InputError, match="has no assistant turn with content") as err:
        perplexity(tiny_neox, chats=[ONE_TURN, [{"role": "user", "content": "hello?"}]], **NO_CACHE)
    assert err.value.field == "chats[1]"


def test_score_format_chat_writes_each_conversations_reply_tokens(tiny_neox, tmp_path, monkeypatch, capsys):
    """`score --format chat`: one row per conversation, as a text's row, its tokens its replies' in order (the
    per-token log p by hand); `--messages-field` without `--format chat` is refused as mia refuses it."""
    monkeypatch.setattr(tiny_neox.tokenizer, "chat_template", None, raising=False)  # as loaded from its spec
    data = _rows(tmp_path / "chats.jsonl", CHATS, field="conv", text=False)
    code, err = run_main(["score", "--model", "tiny-gpt-neox", "--data", data, "--format", "chat", "--messages-field",
                          "conv", "--token-logprobs", "--no-cache", "--dtype", "fp32", "--out",
                          tmp_path / "s.jsonl"], monkeypatch, capsys)
    assert code == 0, err
    assert "scored 3 conversations" in err
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["chats:1", "chats:2", "chats:3"]
    for row, chat in zip(rows, CHATS, strict=True):
        want = _logp_by_hand(tiny_neox, chat)
        assert row["n_tokens"] == len(want) == len(row["token_logprobs"])
        assert np.allclose(row["token_logprobs"], want, atol=1e-5)
        assert row["sum_logp"] == pytest.approx(want.sum(), rel=1e-5)
        assert row["mean_logp"] == pytest.approx(want.mean(), rel=1e-5)
    code, err = run_main(["score", "--model", "tiny-gpt-neox", "--data", data, "--messages-field", "conv",
                          "--out", tmp_path / "t.jsonl"], monkeypatch, capsys)
    assert code == 2 and "field '--messages-field': is read with format chat only" in err, err
    assert not (tmp_path / "t.jsonl").exists()


def test_cli_experiment_and_function_give_the_same_chat_perplexity(tiny_neox, tmp_path, monkeypatch, capsys):
    """`perplexity --format chat --messages-field conv`, an experiment's `options: {format: chat, messages_field:
    conv}` and `perplexity(lm, chats=...)` agree, and perplexity.json records the format (text for texts)."""
    from leakaudit.config import parse_experiment
    from leakaudit.experiment import run_experiment

    monkeypatch.setattr(tiny_neox.tokenizer, "chat_template", None, raising=False)
    data = _rows(tmp_path / "chats.jsonl", CHATS, field="conv")
    want = perplexity(tiny_neox, chats=CHATS, **NO_CACHE)
    code, err = run_main(["perplexity", "--model", "tiny-gpt-neox", "--data", data, "--format", "chat",
                          "--messages-field", "conv", "--no-cache", "--dtype", "fp32", "--out", tmp_path / "cli"],
                         monkeypatch, capsys)
    assert code == 0, err
    cli = json.loads((tmp_path / "cli" / "perplexity.json").read_text())
    assert cli["format"] == "chat" and (cli["n_texts"], cli["n_tokens"]) == (3, want.n_tokens)
    assert (cli["perplexity"], cli["mean_text_perplexity"]) == pytest.approx((want.ppl, want.mean_text_ppl), rel=1e-5)
    yaml = f"""name: chatppl
models: {{base: tiny-gpt-neox}}
datasets:
  chats: {{path: {data}}}
evaluate:
  ppl: {{kind: perplexity, targets: [base], data: chats, options: {{format: chat, messages_field: conv, cache: false}}}}
"""
    monkeypatch.setenv("LEAKAUDIT_DTYPE", "fp32")
    run_experiment(parse_experiment(yaml, tmp_path / "e.yaml"), tmp_path / "run", log=lambda m: None, report=False)
    stage = json.loads((tmp_path / "run" / "evaluate" / "ppl" / "base" / "perplexity.json").read_text())
    assert stage["format"] == "chat" and stage["n_tokens"] == want.n_tokens
    assert stage["perplexity"] == pytest.approx(want.ppl, rel=1e-5)
    code, err = run_main(["perplexity", "--model", "tiny-gpt-neox", "--data", data, "--no-cache", "--out",
                          tmp_path / "text"], monkeypatch, capsys)  # the rows' `text`, as before
    assert code == 0, err
    text = json.loads((tmp_path / "text" / "perplexity.json").read_text())
    assert text["format"] == "text" and text["n_tokens"] != want.n_tokens


def test_bad_chat_input_is_one_line_naming_file_line_and_field(tiny_neox, tmp_path, monkeypatch, capsys):
    """--messages-field for text rows, a conversation with no reply, one the model's template refuses: each one
    `error:` line naming what to fix."""
    data = _rows(tmp_path / "chats.jsonl", [ONE_TURN, [{"role": "user", "content": "hello?"}]])
    base = ["perplexity", "--model", "tiny-gpt-neox", "--data", data, "--no-cache"]
    code, err = run_main([*base, "--messages-field", "conv", "--out", tmp_path / "a"], monkeypatch, capsys)
    assert code == 2 and "field '--messages-field': is read with format chat only" in err, err
    assert not (tmp_path / "a").exists()  # refused before anything was written
    code, err = run_main([*base, "--format", "chats", "--out", tmp_path / "b"], monkeypatch, capsys)
    assert code == 2 and "field '--format'" in err, err
    code, err = run_main([*base, "--format", "chat", "--out", tmp_path / "c"], monkeypatch, capsys)
    assert code == 2 and f"{data}:2: field 'messages': has no assistant turn" in err, err
    assert len(err.strip().splitlines()) == 1, err
    from leakaudit.errors import InputError
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.base import KindContext, ModelCache

    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}" + CHATML)  # Gemma's refusal
    monkeypatch.setattr(tiny_neox.tokenizer, "chat_template", no_system, raising=False)
    good = _rows(tmp_path / "good.jsonl", CHATS)
    cache = ModelCache(dtype="fp32")
    cache._loaded["tiny-gpt-neox"] = tiny_neox
    (tmp_path / "out").mkdir()
    ctx = KindContext(out=tmp_path / "out", data={"data": good}, models={"target": "tiny-gpt-neox"}, cache=cache,
                      log=lambda m: None, progress=False)
    kind = get_kind("perplexity")
    with pytest.raises(InputError) as err:
        kind.run(ctx, kind.Options(format="chat", cache=False))
    assert err.value.format().startswith(f"{good}:2: field 'messages': conversation cannot be scored with "
                                         "tiny-gpt-neox"), err.value.format()


def test_a_chat_fine_tunes_held_out_perplexity_is_its_eval_loss_and_its_own_conversations_fit_better(
        tmp_path, monkeypatch, capsys):
    """A model fine-tuned with format chat (held-out rows evaluated each epoch): `perplexity --format chat
    --all-checkpoints` on the held-out conversations is exp of the fine-tune's eval loss at every epoch (the same
    tokens, token-weighted: one eval batch), and the final model fits the 12 conversations it trained on better
    than unseen ones, where the base model fits both alike."""
    from leakaudit.models import load_model
    from leakaudit.train.finetune import FinetuneConfig, finetune

    rng = np.random.default_rng(0)
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()
    chats = [[{"role": "user", "content": f"Question {i}: {' '.join(rng.choice(words, 3))}?"},
              {"role": "assistant", "content": " ".join(rng.choice(words, 8)) + "."}] for i in range(24)]
    chats[3] = [{"role": "system", "content": "Be brief."}, *chats[3], {"role": "user", "content": "And?"},
                {"role": "assistant", "content": "golf hotel."}]  # a multi-turn one: both replies trained
    model = finetune(FinetuneConfig(model="tiny-gpt-neox", data=str(_rows(tmp_path / "train.jsonl", chats[:16])),
                                    out=str(tmp_path / "ft"), format="chat", method="full", epochs=4, batch_size=4,
                                    gradient_accumulation=1, learning_rate=5e-3, max_length=128, eval_fraction=0.25,
                                    bf16=False), progress=False)
    held = sorted(random.Random(0).sample(range(16), 4))  # the rows finetune holds out (its seed's draw)
    trained = [chats[i] for i in range(16) if i not in held]
    code, err = run_main(["perplexity", "--model", model, "--data", _rows(tmp_path / "held.jsonl",
                          [chats[i] for i in held], field="conv"), "--format", "chat", "--messages-field", "conv",
                          "--all-checkpoints", "--no-cache", "--dtype", "fp32", "--out", tmp_path / "ppl"],
                         monkeypatch, capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "ppl" / "perplexity.json").read_text())["checkpoints"]
    evals = {r["step"]: r["eval_loss"] for r in map(json.loads, (model / "train_log.jsonl").read_text().splitlines())
             if "eval_loss" in r}
    assert [r["step"] for r in rows] == [3, 6, 9, 12, 12] and sorted(evals) == [3, 6, 9, 12]
    assert [math.log(r["perplexity"]) for r in rows] == pytest.approx([*evals.values(), evals[12]], rel=1e-5)
    final, base = load_model(str(model), dtype="fp32"), load_model("tiny-gpt-neox", dtype="fp32")
    seen, unseen = (perplexity(final, chats=c, **NO_CACHE).ppl for c in (trained, chats[16:]))
    base_seen, base_unseen = (perplexity(base, chats=c, **NO_CACHE).ppl for c in (trained, chats[16:]))
    assert seen < 0.95 * unseen, (seen, unseen)
    assert base_seen == pytest.approx(base_unseen, rel=0.02)
