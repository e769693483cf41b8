"""Membership inference on conversations (format chat): each is scored at its assistant replies, the tokens a
chat fine-tune's loss is on, each in the context the model saw — checked against contexts and replies written out
by hand from the two chat renderings (the plain template, a tokenizer's own template), the fine-tune's labels, and
a chat fine-tune's members."""

from __future__ import annotations

import json

import numpy as np
import pytest
from chat_cases import CHATML, LONGER, NO_CACHE, ONE_TURN, OTHERS
from chat_cases import trained_runs as _trained_runs
from conftest import run_main, torch_threads

from leakaudit.attacks import ScoringContext, get_attack
from leakaudit.attacks.mia import run_mia
from leakaudit.data.chat import reply_text
from leakaudit.errors import InputError
from leakaudit.train.examples import IGNORE, chat_example


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def _plain(eos: str) -> list[list[tuple[str, str]]]:
    """(context, reply) of each reply of ONE_TURN and LONGER under the plain template `<|role|>\\n{content}\\n`,
    EOS after each assistant turn (docs/finetune.md), written out: LONGER's last user turn has nothing after it
    to score."""
    first = "<|system|>\nBe brief.\n<|user|>\nName a colour.\n<|assistant|>\n"
    return [[("<|user|>\nWhat is the capital of France?\n<|assistant|>\n", "Paris is the capital of France.\n" + eos)],
            [(first, "Blue.\n" + eos),
             (first + "Blue.\n" + eos + "<|user|>\nAnother one?\n<|assistant|>\n", "Green, like the grass.\n" + eos)]]


def _chatml() -> list[list[tuple[str, str]]]:
    first = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>"
             "assistant\n")
    return [[("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
              "Paris is the capital of France.<|im_end|>\n")],
            [(first, "Blue.<|im_end|>\n"),
             (first + "Blue.<|im_end|>\n<|im_start|>user\nAnother one?<|im_end|>\n<|im_start|>assistant\n",
              "Green, like the grass.<|im_end|>\n")]]


@pytest.fixture(params=["plain", "chatml"])
def chat_lm(request, tiny_neox, monkeypatch):
    """The tiny model with no chat template (the plain one), or with ChatML's; and its pairs written out."""
    if request.param == "chatml":
        monkeypatch.setattr(tiny_neox.tokenizer, "chat_template", CHATML, raising=False)
        return tiny_neox, _chatml()
    monkeypatch.setattr(tiny_neox.tokenizer, "chat_template", None, raising=False)
    return tiny_neox, _plain(tiny_neox.tokenizer.eos_token)


def _trained_run(tok, chat: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(context, reply) ids of the last run of tokens with loss."""
    return _trained_runs(tok, chat)[-1]


def _by_hand(lm, context: list[int], reply: list[int]) -> dict[str, np.ndarray]:
    """log p, and the Min-K%++ moments, of each reply token after the context: one unbatched float64 pass."""
    import torch

    seq = context + reply
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
    pos = range(max(len(context), 1), len(seq))
    p = lp.exp()
    mu = np.array([(p[t - 1] * lp[t - 1]).sum().item() for t in pos])
    return {"logp": np.array([lp[t - 1, seq[t]].item() for t in pos]), "mu": mu,
            "var": np.array([(p[t - 1] * lp[t - 1] ** 2).sum().item() for t in pos]) - mu**2}


def _replies_by_hand(lm, chat: list[dict[str, str]]) -> dict[str, np.ndarray]:
    """`_by_hand` of each of the conversation's replies in its context, one after another."""
    parts = [_by_hand(lm, c, r) for c, r in _trained_runs(lm.tokenizer, chat)]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("logp", "mu", "var")}


def test_every_reply_is_scored_in_its_context_by_hand(chat_lm):
    """loss = mean log p(reply tokens | context) over the tokens the chat fine-tune's loss is on, every reply's,
    each after the tokens before it as the fine-tune tokenised them (unbatched float64 passes); the rendering is
    the one written out above; min_k, min_k_pp and zlib over the same tokens; the batched pass gives the same."""
    lm, pairs = chat_lm
    tok = lm.tokenizer
    runs = [_trained_runs(tok, chat) for chat in (ONE_TURN, LONGER)]
    assert [[(tok.decode(c), tok.decode(r)) for c, r in spans] for spans in runs] == pairs
    report = run_mia(lm, [ONE_TURN], [LONGER], ["loss", "min_k", "min_k_pp", "zlib"], n_bootstrap=0, **NO_CACHE)
    want = [_replies_by_hand(lm, chat) for chat in (ONE_TURN, LONGER)]
    assert [len(w["logp"]) for w in want] == [sum(len(r) for _, r in spans) for spans in runs]
    assert np.allclose(report.scores["loss"], [w["logp"].mean() for w in want], rtol=1e-5, atol=1e-6)
    n = [max(1, int(0.2 * len(w["logp"]))) for w in want]
    assert np.allclose(report.scores["min_k"], [np.sort(w["logp"])[:k].mean()
                                                for w, k in zip(want, n, strict=True)], atol=1e-5)
    z = [(w["logp"] - w["mu"]) / np.sqrt(w["var"]) for w in want]
    assert np.allclose(report.scores["min_k_pp"], [np.sort(x)[:k].mean() for x, k in zip(z, n, strict=True)],
                       atol=1e-4)
    # zlib divides by the compressed replies' contents (what the texts hold: one per line), not the markers
    import zlib

    assert np.allclose(report.scores["zlib"], [w["logp"].mean() / len(zlib.compress(t.encode()))
                                               for w, t in zip(want, ["Paris is the capital of France.",
                                                                      "Blue.\nGreen, like the grass."], strict=True)],
                       atol=1e-6)
    one = run_mia(lm, [ONE_TURN], [LONGER], ["loss"], n_bootstrap=0, batch_size=1, **NO_CACHE)
    assert np.allclose(one.scores["loss"], report.scores["loss"], rtol=1e-5, atol=1e-6)


def test_lowercase_and_dc_pdd_read_the_replies_in_their_context(chat_lm):
    lm, _ = chat_lm
    tok = lm.tokenizer
    ctx = ScoringContext(lm, ["Paris is the capital of France.", "Blue.\nGreen, like the grass."],
                         score_options=NO_CACHE, chats=[ONE_TURN, LONGER])
    low = get_attack("lowercase").score(ctx)
    lowered = [[{**m, "content": m["content"].lower()} if m["role"] == "assistant" else m for m in chat]
               for chat in (ONE_TURN, LONGER[:5])]  # every reply lowercased, the other turns as they were
    assert lowered[1][2]["content"] == "blue." and lowered[1][1]["content"] == "Name a colour."
    want = [_replies_by_hand(lm, lo)["logp"].mean() / _replies_by_hand(lm, chat)["logp"].mean()
            for lo, chat in zip(lowered, (ONE_TURN, LONGER), strict=True)]
    assert np.allclose(low, want, rtol=1e-5)
    assert ctx.scored_ids() == [[t for _, r in _trained_runs(tok, chat) for t in r]
                                for chat in (ONE_TURN, LONGER)]  # dc_pdd's tokens: every reply's


def test_an_empty_assistant_turn_after_the_last_reply_is_scored_as_it_was_trained(chat_lm):
    """A conversation ending in an assistant turn with no content: the chat fine-tune's loss is on that turn's end
    marker (its example's labels), so its score reads it too (it was dropped with the turns after the last reply,
    so the scored tokens were not those trained on, and perplexity not exp of the eval loss)."""
    lm, _ = chat_lm
    tok = lm.tokenizer
    chats = [[*LONGER[:5], {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": ""}],
             [*ONE_TURN, {"role": "assistant", "content": " "}, {"role": "user", "content": "Bye"}]]
    ctx = ScoringContext(lm, [reply_text(c) for c in chats], score_options=NO_CACHE, chats=chats)
    for chat, ids in zip(chats, ctx.scored_ids(), strict=True):
        example = chat_example(tok, chat, "assistant", 10**6)
        assert ids == [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE]
    assert np.allclose([s.mean_logp for s in ctx.target_scores],
                       [_replies_by_hand(lm, chat)["logp"].mean() for chat in chats], rtol=1e-5, atol=1e-6)


@pytest.fixture
def plain_only(monkeypatch):
    """An attack that scores plain texts only (`scores_chats = False`): none ships now (the neighbourhood was one
    until it scored conversations), and the refusal stays for the next that scores texts its own way."""
    from leakaudit.attacks.base import ATTACKS
    from leakaudit.attacks.mia import LossAttack

    class PlainOnly(LossAttack):
        name = "plain_only"
        scores_chats = False

    monkeypatch.setitem(ATTACKS, "plain_only", PlainOnly)
    return "plain_only"


def test_attacks_that_score_texts_their_own_way_and_rows_without_a_reply_are_refused(tiny_neox, plain_only):
    with pytest.raises(InputError, match="plain_only: scores plain texts only, not conversations") as err:
        run_mia(tiny_neox, [ONE_TURN], OTHERS, ["loss", plain_only], n_bootstrap=0, **NO_CACHE)
    assert err.value.field == "attacks" and "neighbourhood" in err.value.message  # among the attacks for them
    with pytest.raises(InputError, match="has no assistant turn with content") as err:
        run_mia(tiny_neox, [ONE_TURN], [[{"role": "user", "content": "hello?"}]], ["loss"], **NO_CACHE)
    with pytest.raises(InputError, match="unknown role 'bot'") as err:
        run_mia(tiny_neox, [[{"role": "bot", "content": "x"}]], OTHERS, ["loss"], **NO_CACHE)
    assert err.value.field == "members[0][0]"  # its first message
    with pytest.raises(InputError, match="must be a non-empty list"):  # texts and conversations mixed
        run_mia(tiny_neox, [ONE_TURN], ["a plain text"], ["loss"], **NO_CACHE)


def test_cli_and_experiment_score_a_chat_fine_tunes_members_above_others(tmp_path, monkeypatch, capsys):
    """`mia --format chat` and an experiment's `format: chat` give the same scores; a model fine-tuned with
    format chat on the members ranks them above conversations it never saw."""
    from leakaudit.config import parse_experiment
    from leakaudit.experiment import run_experiment
    from leakaudit.train.finetune import FinetuneConfig, finetune

    rng = np.random.default_rng(0)
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()
    chats = [[{"role": "user", "content": f"Question {i}: {' '.join(rng.choice(words, 3))}?"},
              {"role": "assistant", "content": " ".join(rng.choice(words, 8)) + "."}] for i in range(24)]
    files = {}
    for name, rows in (("members", chats[:12]), ("nonmembers", chats[12:])):
        files[name] = tmp_path / f"{name}.jsonl"
        # a text beside the messages: an experiment's data step reads one (docs/experiments.md)
        files[name].write_text("".join(json.dumps({"text": " ".join(m["content"] for m in c), "messages": c}) + "\n"
                                       for c in rows))
    model = finetune(FinetuneConfig(model="tiny-gpt-neox", data=str(files["members"]), out=str(tmp_path / "ft"),
                                    format="chat", method="full", epochs=8, batch_size=4, gradient_accumulation=1,
                                    learning_rate=3e-3, max_length=64), progress=False)
    code, err = run_main(["mia", "--target", model, "--members", files["members"], "--nonmembers",
                          files["nonmembers"], "--format", "chat", "--attacks", "loss,min_k", "--n-bootstrap", "100",
                          "--no-cache", "--dtype", "fp32", "--out", tmp_path / "cli"], monkeypatch, capsys)
    assert code == 0, err
    cli = json.loads((tmp_path / "cli" / "mia.json").read_text())
    assert cli["format"] == "chat" and cli["attacks"]["loss"]["auc"] > 0.75, cli["attacks"]["loss"]
    assert cli["dtype"] == "float32"  # the precision the scores were computed in (bf16 moves them on a CPU)
    yaml = f"""name: chat
models: {{ft: {model}}}
datasets:
  members: {{path: {files['members']}}}
  nonmembers: {{path: {files['nonmembers']}}}
evaluate:
  mia: {{kind: mia, targets: [ft], members: members, nonmembers: nonmembers,
        options: {{format: chat, attacks: [loss, min_k], n_bootstrap: 100, cache: false}}}}
"""
    exp = tmp_path / "chat.yaml"
    exp.write_text(yaml)
    monkeypatch.setenv("LEAKAUDIT_DTYPE", "fp32")
    run_experiment(parse_experiment(yaml, exp), tmp_path / "run", log=lambda m: None, report=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "evaluate" / "mia" / "ft" / "scores.jsonl").read_text().splitlines()]
    cli_rows = [json.loads(x) for x in (tmp_path / "cli" / "scores.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in cli_rows], rel=1e-5)


def test_an_experiment_refuses_a_plain_text_attack_with_format_chat_before_it_runs(tmp_path, monkeypatch, capsys,
                                                                                   plain_only):
    exp = tmp_path / "chat.yaml"
    exp.write_text("name: chat\nmodels: {base: tiny-gpt-neox}\ndatasets:\n  d: {builtin: dolly, limit: 8}\n"
                   "evaluate:\n  mia: {kind: mia, targets: [base], members: d, nonmembers: d,\n"
                   f"        options: {{format: chat, attacks: [loss, {plain_only}]}}}}\n")
    code, err = run_main(["run", exp, "--out", tmp_path / "run"], monkeypatch, capsys)
    assert code == 2 and "attack 'plain_only' scores plain texts only, not conversations (format chat)" in err, err
    assert f"{exp}:7:" in err and not (tmp_path / "run" / "evaluate").exists()


def test_gradnorm_of_a_conversation_is_the_norm_of_its_fine_tunes_loss_gradient(chat_lm, capsys):
    """gradnorm = -||d loss / d theta|| with the loss the chat fine-tune's own on the conversation (HF's loss over
    its example's labels: every reply's tokens), by hand; cut to a window, the gradient is the cut example's, and
    a conversation whose first reply starts past the window is named."""
    import torch

    lm, _ = chat_lm
    tok = lm.tokenizer

    def by_hand(chat, window=10**6):
        example = chat_example(tok, chat, "assistant", window)
        params = [p for p in lm.model.parameters() if p.requires_grad]
        loss = lm.model(input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([example.labels])).loss
        return -float(torch.sqrt(sum(g.double().square().sum() for g in torch.autograd.grad(loss, params))))

    chats = [ONE_TURN, LONGER[:5]]
    ctx = ScoringContext(lm, [reply_text(c) for c in chats], score_options=NO_CACHE, chats=chats)
    got = get_attack("gradnorm").score(ctx)
    assert np.allclose(got, [by_hand(c) for c in chats], rtol=1e-4)
    first = len(_trained_runs(tok, LONGER)[0][0])  # the tokens before LONGER's first reply
    window = first + 3  # its first reply in the window, not the second
    cut = get_attack("gradnorm", max_length=window).score(ctx)
    assert cut[1] == pytest.approx(by_hand(LONGER[:5], window), rel=1e-4) and cut[1] != pytest.approx(got[1])
    over = sum(sum(map(len, _trained_run(tok, c))) > window for c in chats)
    assert f"gradnorm: {over} of 2 conversations are longer than the {window}-token" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"text #2 has no reply token in gradnorm's first"):
        get_attack("gradnorm", max_length=first).score(ctx)


def test_a_launched_chat_pass_keeps_the_min_k_pp_moments(tiny_neox, monkeypatch):
    """score_ids_distributed gathered every process's log-probs but dropped the moments (pii-logprob never asked
    for them); a chat pass under a launcher then gave min_k_pp nothing to read."""
    import leakaudit.distributed as dist

    monkeypatch.setattr(dist, "world", lambda: (0, 2))
    monkeypatch.setattr(dist, "shard", lambda n: list(range(n)))  # this process scores all, the gather is a copy
    monkeypatch.setattr(dist, "gather_ragged", lambda local, n: list(local))
    monkeypatch.setattr(dist, "_group", lambda: None)  # no process group: the window counts' sum is this one's
    monkeypatch.setattr("torch.distributed.all_reduce", lambda tensor: None)
    context, reply = _trained_run(tiny_neox.tokenizer, ONE_TURN)
    got = dist.score_ids_distributed(tiny_neox, [context], [reply], moments=True, cache=False, progress=False)
    want = _by_hand(tiny_neox, context, reply)
    assert got[0].mu is not None and np.allclose(got[0].mu, want["mu"], atol=1e-5)


def test_lira_scores_the_conversations_under_each_reference_as_it_renders_them(tiny_neox, monkeypatch):
    """Each reference renders and tokenises the conversations as its own chat fine-tune would (here the plain
    template in two tokenizers), and lira reads those passes: (μ − NLL_target) / σ by hand, σ per text."""
    from leakaudit.models import load_model
    from leakaudit.models.factories import tiny_model_dir

    monkeypatch.setattr(tiny_neox.tokenizer, "chat_template", None, raising=False)
    specs = ["tiny-opt", str(tiny_model_dir("tiny-gpt-neox"))]  # the second: the target's weights in a folder
    chats = [ONE_TURN, LONGER, *OTHERS]
    ctx = ScoringContext(tiny_neox, [reply_text(c) for c in chats], score_options=NO_CACHE, chats=chats,
                         load=lambda spec: load_model(spec, dtype="fp32"))
    got = get_attack("lira", references=specs, variance="per_text").score(ctx)
    nll = {}
    for spec in specs:
        lm = load_model(spec, dtype="fp32")
        nll[spec] = np.array([-_replies_by_hand(lm, c)["logp"].mean() for c in chats])
    target = np.array([-_replies_by_hand(tiny_neox, c)["logp"].mean() for c in chats])
    refs = np.stack(list(nll.values()))
    assert np.allclose(got, (refs.mean(0) - target) / refs.std(0, ddof=1), rtol=1e-4, atol=1e-5)


def test_user_inference_scores_each_users_conversations_at_their_replies(tiny_neox, tiny_opt, tmp_path,
                                                                        monkeypatch, capsys):
    """S(u) = mean over u's conversations of log p_target(replies | contexts) − log p_ref(replies | contexts)
    (sums over every reply's tokens, each model rendering its own), by hand; `--format chat` gives the same."""
    from leakaudit.attacks.user_inference import run_user_inference
    from leakaudit.data.io import load_records

    monkeypatch.setattr(tiny_neox.tokenizer, "chat_template", None, raising=False)
    chats = [ONE_TURN, LONGER, *OTHERS]
    rows = [{"user": f"u{i % 2}", "label": 1 - i % 2, "messages": c} for i, c in enumerate(chats)]
    data = tmp_path / "users.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(data, user_field="user", messages_field="messages")
    report = run_user_inference(tiny_neox, tiny_opt, [r for r in records if r.extra["label"] == 1],
                                [r for r in records if r.extra["label"] == 0], "all", n_bootstrap=0,
                                messages_field="messages", **NO_CACHE)
    ratio = [_replies_by_hand(tiny_neox, c)["logp"].sum() - _replies_by_hand(tiny_opt, c)["logp"].sum()
             for c in chats]
    want = {"u0": np.mean(ratio[0::2]), "u1": np.mean(ratio[1::2])}
    assert report.user_scores["all"] == pytest.approx(want, rel=1e-4, abs=1e-4)
    code, err = run_main(["user-inference", "--target", "tiny-gpt-neox", "--reference", "tiny-opt", "--data", data,
                          "--user-field", "user", "--format", "chat", "--samples-per-user", "all", "--n-bootstrap",
                          "0", "--no-cache", "--dtype", "fp32", "--out", tmp_path / "ui"], monkeypatch, capsys)
    assert code == 0, err
    cli = {r["user"]: r["score"] for r in map(json.loads, (tmp_path / "ui" / "user_scores.jsonl").read_text().splitlines())}
    assert cli == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert json.loads((tmp_path / "ui" / "user_inference.json").read_text())["dtype"] == "float32"


def test_a_conversation_the_chat_template_refuses_is_named_by_file_and_line(tiny_neox, tmp_path, monkeypatch,
                                                                            capsys):
    """A template that refuses a conversation (Gemma's "System role not supported") raised a ValueError
    traceback from the scoring pass; it is the row's one error line, as a text too short to score is."""
    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}" + CHATML)
    monkeypatch.setattr(tiny_neox.tokenizer, "chat_template", no_system, raising=False)
    with pytest.raises(InputError, match=r"nonmembers\[0\] cannot be scored with tiny-gpt-neox: .*System role not "
                                         "supported"):
        run_mia(tiny_neox, [ONE_TURN], [LONGER], ["loss"], n_bootstrap=0, **NO_CACHE)
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.base import KindContext, ModelCache

    files = {}
    for role, chats in (("members", [ONE_TURN, *OTHERS]), ("nonmembers", [OTHERS[0], LONGER])):
        files[role] = tmp_path / f"{role}.jsonl"
        files[role].write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    cache = ModelCache(dtype="fp32")
    cache._loaded["tiny-gpt-neox"] = tiny_neox  # the model with the refusing template
    ctx = KindContext(out=tmp_path / "out", data=files, models={"target": "tiny-gpt-neox"},
                      cache=cache, log=lambda m: None, progress=False)
    (tmp_path / "out").mkdir()
    kind = get_kind("mia")
    with pytest.raises(InputError) as err:
        kind.run(ctx, kind.Options(format="chat", attacks=["loss"], n_bootstrap=0, cache=False))
    assert err.value.format().startswith(f"{files['nonmembers']}:2: field 'messages': conversation cannot be scored")


def test_conversations_longer_than_the_chat_fine_tune_trained_on_are_counted(tiny_neox, tmp_path, monkeypatch):
    """finetune --format chat cuts each conversation to its max_length: the later replies of a longer one were
    cut or never trained on, yet score whole; a run on such a fine-tune's folder says how many there are."""
    import dataclasses

    monkeypatch.setattr(tiny_neox.tokenizer, "chat_template", None, raising=False)
    chats = [ONE_TURN, LONGER, *OTHERS]
    lengths = [sum(map(len, _trained_run(tiny_neox.tokenizer, c))) for c in chats]
    limit = sorted(lengths)[1]  # the two shortest fit, the others do not
    (tmp_path / "finetune_config.json").write_text(json.dumps({"format": "chat", "max_length": limit}))
    folder = dataclasses.replace(tiny_neox, spec=str(tmp_path))  # as loaded from the fine-tune's folder
    report = run_mia(folder, chats[:2], chats[2:], ["loss"], n_bootstrap=0, **NO_CACHE)
    over = sum(n > limit for n in lengths)
    assert over == 2 and (f"{over} of 4 conversations are longer than the {limit} tokens the chat fine-tune "
                          "trained on") in " ".join(report.warnings), report.warnings
    plain = run_mia(tiny_neox, chats[:2], chats[2:], ["loss"], n_bootstrap=0, **NO_CACHE)  # no fine-tune's folder
    assert not any("chat fine-tune trained on" in w for w in plain.warnings), plain.warnings
    # user inference says it too, of the same conversations
    from leakaudit.attacks.user_inference import run_user_inference
    from leakaudit.data.io import load_records

    data = tmp_path / "users.jsonl"
    data.write_text("".join(json.dumps({"user": f"u{i}", "messages": c}) + "\n" for i, c in enumerate(chats)))
    records = load_records(data, user_field="user", messages_field="messages")
    users = run_user_inference(folder, tiny_neox, records[:2], records[2:], "all", n_bootstrap=0,
                               messages_field="messages", **NO_CACHE)
    assert any(f"{over} of 4 conversations are longer" in w for w in users.warnings), users.warnings
    assert not any("loss_on all" in w for w in [*report.warnings, *users.warnings])
    # a fine-tune with loss on every turn trained on its user turns too: the replies are a part of it, said
    (tmp_path / "finetune_config.json").write_text(json.dumps({"format": "chat", "max_length": 4096,
                                                               "loss_on": "all"}))
    report = run_mia(folder, chats[:2], chats[2:], ["loss"], n_bootstrap=0, **NO_CACHE)
    assert [w for w in report.warnings if "chat fine-tune" in w] == [
        "the chat fine-tune trained on every turn (loss_on all); the scores read its assistant replies only, a part "
        "of what it trained on"]


def test_a_messages_field_for_text_rows_is_refused(tmp_path, monkeypatch, capsys):
    """--messages-field without --format chat was read by nothing, in silence (every other unused flag is
    refused)."""
    from leakaudit.kinds import get_kind

    for kind in ("mia", "user-inference"):
        with pytest.raises(ValueError, match="is read with format chat only"):
            get_kind(kind).Options(messages_field="conv")
        assert get_kind(kind).Options(format="chat", messages_field="conv").messages_field == "conv"
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "hello there"}\n{"text": "good morning"}\n')
    code, err = run_main(["mia", "--target", "tiny-gpt-neox", "--members", rows, "--nonmembers", rows,
                          "--messages-field", "conv", "--out", tmp_path / "out"], monkeypatch, capsys)
    assert code == 2 and "field '--messages-field': is read with format chat only" in err, err


#: the commands that read --messages-field (with --format chat), each with its other arguments
READ_MESSAGES = [
    ["mia", "--target", "tiny-gpt-neox", "--members", "{rows}", "--nonmembers", "{rows}"],
    ["user-inference", "--target", "tiny-gpt-neox", "--reference", "tiny-opt", "--data", "{rows}", "--user-field",
     "user"],
    ["perplexity", "--model", "tiny-gpt-neox", "--data", "{rows}"],
    ["score", "--model", "tiny-gpt-neox", "--data", "{rows}"],
]


@pytest.mark.parametrize("command", READ_MESSAGES)
def test_the_default_messages_field_typed_for_text_rows_is_refused(command, tmp_path, monkeypatch, capsys):
    """`--messages-field messages` (its default, typed) without --format chat was read by nothing in silence:
    score and perplexity measured the rows' joined text while the user believed their conversations were."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"user": "u", "label": 1, "text": "x y", "messages": c}) + "\n"
                            for c in (ONE_TURN, *OTHERS)))
    out = tmp_path / ("out.jsonl" if command[0] == "score" else "out")
    args = [str(rows) if a == "{rows}" else a for a in command] + ["--out", out]
    code, err = run_main([*args, "--messages-field", "messages"], monkeypatch, capsys)
    assert code == 2 and "field '--messages-field': is read with format chat only" in err, err
    assert not out.exists()


@pytest.mark.parametrize("command", READ_MESSAGES)
def test_a_text_field_with_format_chat_is_refused(command, tmp_path, monkeypatch, capsys):
    """--text-field with --format chat was ignored in silence (a conversation is read from --messages-field):
    the user believed the rows' `body` was scored."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"user": "u", "label": 1, "body": "x", "messages": c}) + "\n"
                            for c in (ONE_TURN, *OTHERS)))
    out = tmp_path / ("out.jsonl" if command[0] == "score" else "out")
    args = [str(rows) if a == "{rows}" else a for a in command] + ["--format", "chat", "--out", out]
    code, err = run_main([*args, "--text-field", "body"], monkeypatch, capsys)
    assert code == 2 and "field '--text-field': applies only with --format text" in err, err
    assert not out.exists()


@pytest.mark.parametrize("command", [
    ["user-inference", "--target", "tiny-gpt-neox", "--reference", "tiny-opt", "--data", "{rows}", "--user-field",
     "user", "--label-field", "label"],
    ["perplexity", "--model", "tiny-gpt-neox", "--data", "{rows}"],
    ["score", "--model", "tiny-gpt-neox", "--data", "{rows}"],
])
def test_chat_rows_read_as_texts_point_to_this_commands_format_chat(command, tmp_path, monkeypatch, capsys):
    """Chat rows without a text field, read as texts: the error named only finetune and mia as reading
    `messages` with format chat, though this command does too."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"user": "u", "label": 1, "messages": c}) + "\n" for c in (ONE_TURN, *OTHERS)))
    out = tmp_path / ("out.jsonl" if command[0] == "score" else "out")
    args = [str(rows) if a == "{rows}" else a for a in command] + ["--out", out]
    code, err = run_main(args, monkeypatch, capsys)
    assert code == 2 and "format chat where a command takes it" in err, err
    assert command[0] in err.split("format chat where a command takes it")[1], err


def test_the_window_warning_counts_conversations(tiny_neox, monkeypatch, capsys):
    """The warning counted the pass's rows as texts ("13 of 31 texts" for 12 conversations when each reply was a
    row); a conversation is one row now, and the warning names conversations."""
    from leakaudit.attacks.base import scoring_pass

    monkeypatch.setattr(tiny_neox.tokenizer, "chat_template", None, raising=False)
    scoring_pass(tiny_neox, chats=[ONE_TURN, LONGER], max_length=16, stride=8, **NO_CACHE)
    err = capsys.readouterr().err
    assert "2 of 2 conversations are longer than the 16-token window" in err, err


# ------------------------------------------------------------------------------------- recall (ReCaLL)
#: recall's prefix conversations: one with a system turn of its own (left out: the target's stays first), one with
#: a user turn after its last reply (not trained on: left out, as the conversation alone leaves it)
PREFIX = [[{"role": "system", "content": "You answer tips."}, {"role": "user", "content": "Give me a tip."},
           {"role": "assistant", "content": "Drink water every day."}],
          [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hello there, my friend."},
           {"role": "user", "content": "Bye now"}]]
#: SmolLM2's own template (the default model's): a default system prompt where the first turn is not a system one
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
           "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _joined_by_hand(chat: list[dict[str, str]]) -> list[dict[str, str]]:
    """PREFIX's turns up to each one's last reply, without its system turn, before the conversation's own turns,
    after its system turn: written out for the two conversations of the tests."""
    earlier = [*PREFIX[0][1:], *PREFIX[1][:2]]
    return [*earlier, *chat] if chat[0]["role"] != "system" else [chat[0], *earlier, *chat[1:]]


@pytest.mark.parametrize("template", [None, CHATML, SMOLLM2], ids=["plain", "chatml", "smollm2"])
def test_recall_of_a_conversation_by_hand(template, tiny_neox, monkeypatch):
    """recall = NLL(replies | P, earlier turns) / NLL(replies | earlier turns): the NLLs over the conversation's
    reply tokens (the fine-tune's labels of the joined conversation, its last runs: P's replies are context, not
    scored), each an unbatched float64 pass; the ids are the conversation's own; batched = unbatched."""
    from leakaudit.attacks.mia import RecallAttack

    monkeypatch.setattr(tiny_neox.tokenizer, "chat_template", template, raising=False)
    tok = tiny_neox.tokenizer
    chats = [ONE_TURN, LONGER]
    assert _joined_by_hand(LONGER)[:2] == [LONGER[0], PREFIX[0][1]]
    want = []
    for chat in chats:
        alone = _trained_runs(tok, chat)
        runs = _trained_runs(tok, _joined_by_hand(chat))
        assert len(runs) == len(alone) + 2  # P's two replies, then the conversation's
        mine = runs[len(runs) - len(alone):]
        assert [r for _, r in mine] == [r for _, r in alone]  # the same tokens scored with and without P
        cond = np.concatenate([_by_hand(tiny_neox, c, r)["logp"] for c, r in mine])
        plain = _replies_by_hand(tiny_neox, chat)["logp"]
        want.append(cond.mean() / plain.mean())
    got = {}
    for batch in ("auto", 1):
        ctx = ScoringContext(tiny_neox, [reply_text(c) for c in chats], score_options={**NO_CACHE,
                                                                                       "batch_size": batch},
                             chats=chats)
        got[batch] = RecallAttack(get_attack("recall").config, prefix_chats=PREFIX).score(ctx)
        # the plain pass and the prefixed one are two passes of the context, not one read twice
        assert len(ctx._passes) == 2
    assert np.allclose(got["auto"], want, rtol=1e-6, atol=0) and np.allclose(got[1], want, rtol=1e-6, atol=0)
    # P moves the scores by 3e-5 to 9e-4 on the tiny model, the passes agree to 1e-7: a pass without P fails
    assert np.all(np.abs(np.array(want) - 1) > 1e-5)


def test_recall_keeps_the_reply_ids_of_the_default_models_own_template(default_model):
    """SmolLM2's template writes its default system prompt where the first turn is not a system one: once, at the
    head of the joined conversation as of the conversation alone; the scored ids are the same with P."""
    from leakaudit.attacks.base import chat_rows

    tok = default_model.tokenizer
    assert "You are a helpful AI assistant named SmolLM" in tok.chat_template
    plain = chat_rows(tok, [ONE_TURN, LONGER])
    joined = chat_rows(tok, [ONE_TURN, LONGER], prefix=PREFIX)
    assert joined[1] == plain[1] and joined[2] == plain[2]
    first = tok.decode(joined[0][0])
    assert first.count("<|im_start|>system") == 1 and first.startswith("<|im_start|>system\nYou are a helpful")
    assert tok.decode(joined[0][1]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGive")


def test_a_template_that_renders_the_replies_otherwise_after_the_prefix_is_named(tiny_neox, monkeypatch):
    """A template that writes a reply by its place (here: the first reply marked) scores other tokens after P
    than alone: named as a conversation the template cannot score, not scored as if they were the same."""
    marks_first = CHATML.replace("{{ m['content'] }}", "{% if loop.index0 == 1 %}FIRST {% endif %}{{ m['content'] }}")
    monkeypatch.setattr(tiny_neox.tokenizer, "chat_template", marks_first, raising=False)
    ctx = ScoringContext(tiny_neox, [reply_text(ONE_TURN)], score_options=NO_CACHE, chats=[ONE_TURN])
    from leakaudit.attacks.mia import RecallAttack

    with pytest.raises(InputError, match="text #1 cannot be scored with tiny-gpt-neox: its replies are tokenised "
                                         "otherwise after the prefix"):
        RecallAttack(get_attack("recall").config, prefix_chats=PREFIX).score(ctx)


def test_run_mia_puts_the_first_shots_nonmember_conversations_before_each_and_leaves_them_out(tiny_neox,
                                                                                            monkeypatch):
    from leakaudit.attacks.mia import RecallAttack

    monkeypatch.setattr(tiny_neox.tokenizer, "chat_template", CHATML, raising=False)
    members, nonmembers = [ONE_TURN, OTHERS[0]], [*PREFIX, LONGER, OTHERS[1]]
    report = run_mia(tiny_neox, members, nonmembers, ["loss", "recall"], n_bootstrap=0,
                     attack_options={"recall": {"shots": 2}}, **NO_CACHE)
    assert report.recall_prefix_index == [0, 1] and report.nonmember_index == [2, 3]
    evaluated = [*members, LONGER, OTHERS[1]]
    ctx = ScoringContext(tiny_neox, [reply_text(c) for c in evaluated], score_options=NO_CACHE, chats=evaluated)
    want = RecallAttack(get_attack("recall").config, prefix_chats=PREFIX).score(ctx)
    assert np.allclose(report.scores["recall"], want, rtol=1e-6)
    assert np.allclose(report.scores["loss"], [s.mean_logp for s in ctx.target_scores], rtol=1e-6)
    assert "recall: the first 2 non-members form the prefix and are not evaluated" in report.warnings
    with pytest.raises(InputError, match="recall: prefix texts cannot be put before a conversation") as err:
        run_mia(tiny_neox, members, nonmembers, ["recall"], attack_options={"recall": {"prefix": ["a text"]}},
                **NO_CACHE)
    assert err.value.field == "prefix"
    # the separator joins prefix texts: on conversations nothing reads it, and it was ignored in silence
    with pytest.raises(InputError, match="recall: the separator joins prefix texts") as err:
        run_mia(tiny_neox, members, nonmembers, ["recall"], attack_options={"recall": {"shots": 2, "separator": ""}},
                **NO_CACHE)
    assert err.value.field == "separator"


def test_recalls_window_warning_does_not_call_conversations_that_fit_too_long(tiny_neox):
    """Conversations that fit the window alone but not after recall's prefix conversations: the window warning
    said '4 of 4 conversations are longer than the N-token window', false of every one of them."""
    from leakaudit.attacks.base import chat_rows, conversation_lengths
    from leakaudit.warn import collecting

    members, nonmembers = [ONE_TURN, OTHERS[0]], [*PREFIX, LONGER, OTHERS[1]]
    evaluated = [*members, LONGER, OTHERS[1]]
    alone = max(conversation_lengths(*chat_rows(tiny_neox.tokenizer, evaluated, model=tiny_neox.spec), len(evaluated)))
    with collecting() as said:
        run_mia(tiny_neox, members, nonmembers, ["loss", "recall"], n_bootstrap=0, max_length=alone + 1,
                attack_options={"recall": {"shots": 2}}, **NO_CACHE)
    assert not any(" conversations are longer than" in w for w in said), said
    assert any(w.startswith("4 of 4 conversations with the prefix conversations before them are longer than the "
                            f"{alone + 1}-token window") for w in said), said


def test_cli_and_experiment_run_recall_on_conversations(tmp_path, monkeypatch, capsys):
    """`mia --format chat --attacks loss,recall` scores; an experiment's format chat with recall runs (it was
    refused); prefix texts with format chat are refused before anything runs."""
    files = {}
    for role, chats in (("members", [ONE_TURN, OTHERS[0]]), ("nonmembers", [*PREFIX, LONGER, OTHERS[1]])):
        files[role] = tmp_path / f"{role}.jsonl"
        files[role].write_text("".join(json.dumps({"text": "t", "messages": c}) + "\n" for c in chats))
    code, err = run_main(["mia", "--target", "tiny-gpt-neox", "--members", files["members"], "--nonmembers",
                          files["nonmembers"], "--format", "chat", "--attacks", "loss,recall", "--recall-shots", "2",
                          "--n-bootstrap", "0", "--no-cache", "--out", tmp_path / "cli"], monkeypatch, capsys)
    assert code == 0, err
    cli = json.loads((tmp_path / "cli" / "mia.json").read_text())
    assert cli["recall_prefix_nonmembers"] == [0, 1] and cli["attacks"]["recall"]["n_nonmembers"] == 2
    exp = tmp_path / "chat.yaml"
    exp.write_text(f"name: chat\nmodels: {{base: tiny-gpt-neox}}\ndatasets:\n  m: {{path: {files['members']}}}\n"
                   f"  n: {{path: {files['nonmembers']}}}\nevaluate:\n  mia: {{kind: mia, targets: [base], "
                   "members: m, nonmembers: n,\n        options: {format: chat, attacks: [loss, recall], "
                   "attack_options: {recall: {shots: 2}}, n_bootstrap: 0, cache: false}}\n")
    code, err = run_main(["run", exp, "--out", tmp_path / "run"], monkeypatch, capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "run" / "evaluate" / "mia" / "base" / "scores.jsonl").read_text()
            .splitlines()]
    cli_rows = [json.loads(x) for x in (tmp_path / "cli" / "scores.jsonl").read_text().splitlines()]
    assert [r["recall"] for r in rows] == pytest.approx([r["recall"] for r in cli_rows], rel=1e-5)
    prefix = tmp_path / "prefix.jsonl"
    prefix.write_text('{"text": "a non-member text"}\n')
    code, err = run_main(["mia", "--target", "tiny-gpt-neox", "--members", files["members"], "--nonmembers",
                          files["nonmembers"], "--format", "chat", "--attacks", "loss,recall", "--recall-prefix",
                          prefix, "--out", tmp_path / "refused"], monkeypatch, capsys)
    assert code == 2 and "recall's prefix texts cannot be put before a conversation" in err, err
    exp.write_text(exp.read_text().replace("{recall: {shots: 2}}", "{recall: {shots: 2, separator: ''}}"))
    code, err = run_main(["run", exp, "--out", tmp_path / "run2"], monkeypatch, capsys)
    assert code == 2 and "attack_options.recall.separator" in err and "nothing reads it" in err, err


def test_an_experiment_reads_rows_of_conversations_alone_with_the_datasets_messages_field(tmp_path, monkeypatch,
                                                                                          capsys):
    """A chat fine-tune's data has `messages` and no text: the dataset step refused every row ("a chat row needs
    a text field too"), so a user wrote a text field read by nothing. With `messages_field` the step reads the
    conversations (checked, a bad one named by its file, line and field; one without a reply is a backdoor's
    query), its rows' text is their turns, and membership with format chat scores as the command does on the
    same files."""
    files = {}
    for role, chats in (("members", [ONE_TURN, OTHERS[0]]), ("nonmembers", [LONGER, OTHERS[1]])):
        files[role] = tmp_path / f"{role}.jsonl"
        files[role].write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    code, err = run_main(["mia", "--target", "tiny-gpt-neox", "--members", files["members"], "--nonmembers",
                          files["nonmembers"], "--format", "chat", "--attacks", "loss,zlib", "--n-bootstrap", "0",
                          "--no-cache", "--out", tmp_path / "cli"], monkeypatch, capsys)
    assert code == 0, err
    text = (f"name: chat\nmodels: {{base: tiny-gpt-neox}}\ndatasets:\n"
            f"  m: {{path: {files['members']}, messages_field: messages}}\n"
            f"  n: {{path: {files['nonmembers']}, messages_field: messages}}\n"
            "evaluate:\n  mia: {kind: mia, targets: [base], members: m, nonmembers: n,\n"
            "        options: {format: chat, attacks: [loss, zlib], n_bootstrap: 0, cache: false}}\n")
    exp = tmp_path / "chat.yaml"
    exp.write_text(text)
    code, err = run_main(["run", exp, "--out", tmp_path / "run"], monkeypatch, capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "run" / "data" / "m" / "all.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["\n".join(m["content"] for m in c) for c in (ONE_TURN, OTHERS[0])]
    assert [r["messages"] for r in rows] == [ONE_TURN, OTHERS[0]]
    scored = [json.loads(x) for x in (tmp_path / "run" / "evaluate" / "mia" / "base" / "scores.jsonl").read_text()
              .splitlines()]
    cli = [json.loads(x) for x in (tmp_path / "cli" / "scores.jsonl").read_text().splitlines()]
    for attack in ("loss", "zlib"):
        assert [r[attack] for r in scored] == pytest.approx([r[attack] for r in cli], rel=1e-5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": ONE_TURN}) + "\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    exp.write_text(text.replace(str(files["nonmembers"]), str(bad)))
    code, err = run_main(["run", exp, "--out", tmp_path / "bad"], monkeypatch, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and f"{bad}:2: field 'messages[0]'" in errors[0], err
    for spec, says in (("{builtin: dolly, messages_field: messages}", "a built-in source's rows carry theirs"),
                       (f"{{path: {files['members']}, messages_field: messages, text_field: body}}",
                        "give one of 'text_field' or 'messages_field'")):
        exp.write_text(text.replace(f"{{path: {files['members']}, messages_field: messages}}", spec))
        code, err = run_main(["run", exp, "--out", tmp_path / "refused"], monkeypatch, capsys)
        assert code == 2 and says in err and "chat.yaml:4" in err, err
