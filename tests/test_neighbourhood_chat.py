"""The neighbourhood attack on conversations (format chat): each neighbour is the conversation with one word of one
assistant reply swapped, proposed over the replies' text; its score, the mean of the neighbours' NLL over their
reply tokens minus the conversation's, checked against float64 passes over the chat fine-tune's own examples."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from chat_cases import CHATML, LONGER, NO_CACHE, ONE_TURN, OTHERS
from conftest import run_main, torch_threads
from test_chat_mia import _replies_by_hand
from test_neighbourhood import _as_rank_one_of_two

from leakaudit.attacks import ScoringContext, get_attack
from leakaudit.attacks.mia import run_mia
from leakaudit.attacks.neighbourhood import NoNeighbourError, chat_neighbours, neighbours
from leakaudit.data.chat import reply_text

#: words in the user turns, few in the replies: what a swap may take is the replies' alone
WORDY = [{"role": "system", "content": "Alice Smith sent the quarterly report."},
         {"role": "user", "content": "Give three tips for staying healthy and happy."},
         {"role": "assistant", "content": "Sleep."}, {"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "Paris!"}]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(params=["plain", "chatml"])
def chat_lm(request, tiny_neox, monkeypatch):
    """The tiny model with no chat template (the plain one), or with ChatML's."""
    monkeypatch.setattr(tiny_neox.tokenizer, "chat_template", CHATML if request.param == "chatml" else None,
                        raising=False)
    return tiny_neox


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


def _one_word_of_one_reply(chat, new) -> int:
    """The index of the one turn `new` changes, which must be an assistant reply changed in one word."""
    assert len(new) == len(chat) and [m["role"] for m in new] == [m["role"] for m in chat]
    changed = [i for i, (a, b) in enumerate(zip(chat, new, strict=True)) if a != b]
    assert len(changed) == 1 and chat[changed[0]]["role"] == "assistant", (chat, new)
    a, b = _words(chat[changed[0]]["content"]), _words(new[changed[0]]["content"])
    assert len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1, (a, b)
    return changed[0]


def test_a_conversations_neighbours_swap_one_word_of_one_reply_scored_by_hand(chat_lm, mlm, tiny_mlm_dir):
    """LONGER's replies "Blue." and "Green, like the grass." are proposed over as one text, "Blue.\\nGreen, like
    the grass."; each swap goes in the reply it falls in, the other turns as they were. The score is the mean
    over the neighbours of their NLL (every reply's tokens in context, as the chat fine-tune's example holds
    them: one unbatched float64 pass per reply) minus the conversation's own."""
    got = chat_neighbours(mlm, LONGER, n=6)
    assert [tuple(m["content"] for m in new if m["role"] == "assistant") for new in got] == [
        ("Ballue.", "Green, like the grass."), ("Thlinklue.", "Green, like the grass."),
        ("Blue.", "Green, like the grvel."), ("Blue.", "Urrentreen, like the grass."),
        ("Blue.", "Agereen, like the grass."), ("Blue.", "Green, lron the grass.")]
    every = chat_neighbours(mlm, LONGER, n=1000)
    assert {_one_word_of_one_reply(LONGER, new) for new in every} == {2, 4}  # both replies are swapped in
    # the text path's neighbours of the replies' text, spliced into their replies
    assert [reply_text(new) for new in every] == neighbours(mlm, reply_text(LONGER), n=1000)

    chats = [LONGER, ONE_TURN, *OTHERS]
    ctx = ScoringContext(chat_lm, [reply_text(c) for c in chats], score_options=NO_CACHE, chats=chats)
    scores = get_attack("neighbourhood", model=str(tiny_mlm_dir), n_neighbours=5).score(ctx)
    want = [np.mean([-_replies_by_hand(chat_lm, new)["logp"].mean() for new in chat_neighbours(mlm, chat, n=5)])
            + _replies_by_hand(chat_lm, chat)["logp"].mean() for chat in chats]
    assert np.allclose(scores, want, rtol=1e-5, atol=1e-5), (scores, want)


def test_batched_and_unbatched_scores_of_conversations_agree(tiny_neox, tiny_mlm_dir):
    options = {"attack_options": {"neighbourhood": {"model": str(tiny_mlm_dir), "n_neighbours": 6}},
               "n_bootstrap": 0, **NO_CACHE}
    batched = run_mia(tiny_neox, [LONGER, WORDY], [ONE_TURN, *OTHERS], ["neighbourhood"], **options)
    one = run_mia(tiny_neox, [LONGER, WORDY], [ONE_TURN, *OTHERS], ["neighbourhood"], batch_size=1, **options)
    assert np.isfinite(batched.scores["neighbourhood"]).all()
    assert np.allclose(one.scores["neighbourhood"], batched.scores["neighbourhood"], rtol=1e-5, atol=1e-6)


def test_the_user_and_system_turns_are_never_swapped(tiny_neox, tiny_mlm_dir, monkeypatch):
    """WORDY's system and user turns hold most of its words: every neighbour the target scores keeps them, and
    the masked LM proposes over the replies' text alone."""
    from leakaudit.attacks import base, neighbourhood

    scored, proposed = [], []
    real_pass, real_swaps = base.scoring_pass, neighbourhood.swaps
    monkeypatch.setattr(base, "scoring_pass", lambda lm, texts=None, chats=None, **kw: (
        scored.append(chats) if kw.get("name") == "neighbours" else None, real_pass(lm, texts, chats, **kw))[1])
    monkeypatch.setattr(neighbourhood, "swaps", lambda mlm, text, **kw: (proposed.append(text),
                                                                         real_swaps(mlm, text, **kw))[1])
    ctx = ScoringContext(tiny_neox, [reply_text(WORDY)], score_options=NO_CACHE, chats=[WORDY])
    assert np.isfinite(get_attack("neighbourhood", model=str(tiny_mlm_dir), n_neighbours=50).score(ctx)).all()
    assert proposed == ["Sleep.\nParis!"]
    assert len(scored) == 1 and len(scored[0]) > 5
    assert {_one_word_of_one_reply(WORDY, new) for new in scored[0]} == {2, 4}


def test_a_conversation_whose_replies_have_no_word_to_swap_is_named(tiny_neox, tiny_mlm_dir):
    """Its user turn has words, but only the replies' are swapped: named, by its list and row."""
    silent = [{"role": "user", "content": "Alice Smith sent the quarterly report?"},
              {"role": "assistant", "content": "!!! ..."}, {"role": "user", "content": "And John?"},
              {"role": "assistant", "content": "???"}]
    with pytest.raises(NoNeighbourError) as err:
        run_mia(tiny_neox, [LONGER, ONE_TURN], [OTHERS[0], silent], ["neighbourhood"], n_bootstrap=0,
                attack_options={"neighbourhood": {"model": str(tiny_mlm_dir)}}, **NO_CACHE)
    assert str(err.value).startswith("nonmembers[1] has no word in its assistant replies the masked LM can swap"), (
        err.value)


def test_under_a_launcher_each_process_scores_its_own_conversations_neighbours(tiny_neox, tiny_mlm_dir, mlm,
                                                                               monkeypatch):
    """As process 1 of 2: every conversation is checked before any is proposed for (the first, rank 0's, is named
    here too), and the neighbours of its own shard are scored on this process alone, not in a sharded pass that
    waits for the others (which hold other neighbours)."""
    import leakaudit.distributed as dist

    silent = [{"role": "user", "content": "Hello there, my friend?"}, {"role": "assistant", "content": "..."}]
    attack = get_attack("neighbourhood", model=str(tiny_mlm_dir), n_neighbours=3)
    chats = [silent, LONGER, ONE_TURN]
    ctx = ScoringContext(tiny_neox, [reply_text(c) for c in chats], score_options=NO_CACHE, chats=chats)
    gathered = _as_rank_one_of_two(monkeypatch, ctx, {})
    with pytest.raises(NoNeighbourError) as err:
        attack.score(ctx)
    assert err.value.index == 0 and gathered == []
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")

    def no_gather(*a, **k):
        raise AssertionError("the neighbours were scored in a pass sharded across processes")

    chats = [ONE_TURN, LONGER, OTHERS[0]]
    ctx = ScoringContext(tiny_neox, [reply_text(c) for c in chats], score_options=NO_CACHE, chats=chats)
    gathered = _as_rank_one_of_two(monkeypatch, ctx, {})
    monkeypatch.setattr(dist, "gather_ragged", no_gather)
    scores = attack.score(ctx)
    want = (np.mean([-_replies_by_hand(tiny_neox, new)["logp"].mean() for new in chat_neighbours(mlm, LONGER, n=3)])
            + _replies_by_hand(tiny_neox, LONGER)["logp"].mean())
    assert gathered[0] == [0.0] and scores[1] == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_mia_format_chat_runs_the_neighbourhood_from_the_cli_and_an_experiment(tmp_path, monkeypatch, capsys,
                                                                                tiny_mlm_dir):
    """`mia --format chat --attacks neighbourhood` and an experiment's `format: chat` run it (they refused it), with
    the library's scores."""
    from leakaudit.config import parse_experiment
    from leakaudit.experiment import run_experiment
    from leakaudit.models import load_model

    members, nonmembers = [LONGER, WORDY], [ONE_TURN, *OTHERS]
    files = {}
    for name, rows in (("members", members), ("nonmembers", nonmembers)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": reply_text(c), "messages": c}) + "\n" for c in rows))
    code, err = run_main(["mia", "--target", "tiny-gpt-neox", "--members", files["members"], "--nonmembers",
                          files["nonmembers"], "--format", "chat", "--attacks", "loss,neighbourhood",
                          "--neighbour-model", tiny_mlm_dir, "--neighbours", "4", "--n-bootstrap", "0", "--no-cache",
                          "--dtype", "fp32", "--out", tmp_path / "cli"], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "cli" / "mia.json").read_text())
    assert res["format"] == "chat" and set(res["attacks"]) == {"loss", "neighbourhood"}
    assert res["attacks"]["neighbourhood"]["options"]["n_neighbours"] == 4
    cli = [json.loads(x)["neighbourhood"] for x in (tmp_path / "cli" / "scores.jsonl").read_text().splitlines()]
    lib = run_mia(load_model("tiny-gpt-neox", dtype="fp32"), members, nonmembers, ["neighbourhood"], n_bootstrap=0,
                  attack_options={"neighbourhood": {"model": str(tiny_mlm_dir), "n_neighbours": 4}}, **NO_CACHE)
    assert cli == pytest.approx(list(lib.scores["neighbourhood"]), rel=1e-5, abs=1e-6)

    exp = tmp_path / "chat.yaml"
    exp.write_text(f"""name: chat
models: {{base: tiny-gpt-neox}}
datasets:
  members: {{path: {files['members']}}}
  nonmembers: {{path: {files['nonmembers']}}}
evaluate:
  mia: {{kind: mia, targets: [base], members: members, nonmembers: nonmembers,
        options: {{format: chat, attacks: [neighbourhood], n_bootstrap: 0, cache: false,
                  attack_options: {{neighbourhood: {{model: '{tiny_mlm_dir}', n_neighbours: 4}}}}}}}}
""")
    monkeypatch.setenv("LEAKAUDIT_DTYPE", "fp32")
    run_experiment(parse_experiment(exp.read_text(), exp), tmp_path / "run", log=lambda m: None, report=False)
    rows = (tmp_path / "run" / "evaluate" / "mia" / "base" / "scores.jsonl").read_text().splitlines()
    assert [json.loads(x)["neighbourhood"] for x in rows] == pytest.approx(cli, rel=1e-5, abs=1e-6)


def test_the_window_warning_and_the_progress_count_say_conversations(tiny_neox, tiny_mlm_dir, mlm, monkeypatch,
                                                                      capsys):
    """What is counted is conversations (their replies, together, past the masked LM's window), not texts."""
    from leakaudit.attacks.neighbourhood import _propose

    n = len(mlm.tokenizer(reply_text(LONGER))["input_ids"])
    chats = [LONGER, WORDY]  # WORDY's replies are short, its other turns long: they are not counted
    ctx = ScoringContext(tiny_neox, [reply_text(c) for c in chats], score_options=NO_CACHE, chats=chats)
    get_attack("neighbourhood", model=str(tiny_mlm_dir), n_neighbours=2, max_length=n - 1).score(ctx)
    err = capsys.readouterr().err
    assert "neighbourhood: 1 of 2 conversations have replies longer together (one per line) than the masked LM's " \
           f"{n - 1}-token window" in err, err
    monkeypatch.setenv("LEAKAUDIT_PROGRESS_INTERVAL", "0.001")
    cfg = get_attack("neighbourhood", model=str(tiny_mlm_dir), n_neighbours=2).config
    found = _propose(mlm, chat_neighbours, chats, [0, 1], cfg, True, "conversations")
    assert found == [chat_neighbours(mlm, c, n=2) for c in chats]
    assert "1/2 conversations" in capsys.readouterr().err
