"""User inference on synthetic users, each writing with their own vocabulary: a tiny model fine-tuned on
some users' samples separates those users from held-out ones, judged from *other* samples of theirs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import torch_threads

from leakaudit.attacks.user_inference import parse_m_values, run_user_inference
from leakaudit.data.io import Record
from leakaudit.errors import InputError
from leakaudit.models import LoadedModel

WORDS = ("harbor lantern cobalt falcon meadow quartz river saddle timber violet walnut anchor bishop cactus "
         "dolphin ember glacier hazel island jasmine kettle lemon marble nectar orbit pepper quiver rocket "
         "silver tundra umbrella velvet willow yonder zephyr almond bamboo canyon desert engine forest garnet "
         "helmet iceberg jungle kayak ladder magnet nickel oyster pillow quill raven spruce tulip urchin valley "
         "wizard yogurt zinc amber basil cedar dune").split()
N_USERS, PER_USER_TRAIN, PER_USER_ATTACK = 12, 4, 4
NO_CACHE = {"cache": False, "progress": False}


def user_samples(u: int, n: int, rng: np.random.Generator) -> list[str]:
    vocab = WORDS[u * 5:(u + 1) * 5]
    return [" ".join(rng.choice(vocab, 8)) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def users(tiny_neox):
    """Users 0-5 are in training (4 samples each); the attacker holds 4 other samples of every user."""
    with torch_threads(1):
        rng = np.random.default_rng(0)
        train, attack_in, attack_out = [], [], []
        for u in range(N_USERS):
            trained = user_samples(u, PER_USER_TRAIN, rng)
            held = user_samples(u, PER_USER_ATTACK, rng)
            if u < N_USERS // 2:
                train += trained
                attack_in += [Record(f"u{u}-{i}", t, f"user{u}", i + 1) for i, t in enumerate(held)]
            else:
                attack_out += [Record(f"u{u}-{i}", t, f"user{u}", i + 1) for i, t in enumerate(held)]
        model = copy.deepcopy(tiny_neox.model)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        torch.manual_seed(0)
        enc_all = tiny_neox.tokenizer(train, return_tensors="pt", padding=True)
        for _ in range(150):
            idx = torch.as_tensor(rng.choice(len(train), 8, replace=False))
            ids, mask = enc_all["input_ids"][idx], enc_all["attention_mask"][idx]
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        tuned = LoadedModel(model, tiny_neox.tokenizer, "tiny+users", "test-tuned-users-150", tiny_neox.device,
                            tiny_neox.dtype)
        yield tuned, attack_in, attack_out


def test_in_training_users_are_separated(users, tiny_neox):
    tuned, attack_in, attack_out = users
    report = run_user_inference(tuned, tiny_neox, attack_in, attack_out, m_values="1,2,all", n_bootstrap=200,
                                **NO_CACHE)
    assert set(report.per_m) == {"1", "2", "all"}
    assert report.per_m["all"].auc > 0.9
    assert report.per_m["all"].n_pos == 6 and report.per_m["all"].n_neg == 6
    js = report.to_json()
    assert js["samples_per_user"] == "all" and js["n_users_in"] == 6 and js["n_users_out"] == 6
    assert set(js) >= {"auc", "auc_ci", "tpr_at_fpr", "per_m"}
    # the untuned model (target = reference) gives every user the statistic 0: no separation
    null = run_user_inference(tiny_neox, tiny_neox, attack_in, attack_out, m_values="all", n_bootstrap=0,
                              **NO_CACHE)
    assert null.per_m["all"].auc == pytest.approx(0.5)


def test_statistic_by_hand(users, tiny_neox):
    """S(u) = mean over the user's first m samples of log p_target(x) - log p_ref(x) (sequence sums)."""
    tuned, attack_in, attack_out = users

    @torch.no_grad()
    def seq_logp(lm, text):
        ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
        lp = torch.log_softmax(lm.model(input_ids=ids).logits[0, :-1].double(), -1)
        return float(lp.gather(1, ids[0, 1:, None]).sum())

    report = run_user_inference(tuned, tiny_neox, attack_in, attack_out, m_values=[2], n_bootstrap=0, **NO_CACHE)
    for u in ("user0", "user9"):
        recs = [r for r in attack_in + attack_out if r.user == u][:2]
        want = np.mean([seq_logp(tuned, r.text) - seq_logp(tiny_neox, r.text) for r in recs])
        assert report.user_scores["2"][u] == pytest.approx(want, rel=1e-4)
    rows = report.rows()
    assert len(rows) == 12 and json.dumps(rows)


def test_users_with_too_few_samples_are_left_out_for_that_m(users, tiny_neox):
    tuned, attack_in, attack_out = users
    report = run_user_inference(tuned, tiny_neox, attack_in, attack_out[:-3], m_values="1,4", n_bootstrap=0,
                                **NO_CACHE)
    assert report.per_m["1"].n_neg == 6
    assert report.per_m["4"].n_neg == 5  # the last held-out user kept only 1 of 4 samples


def test_bad_m_values_and_conflicting_users(users, tiny_neox):
    with pytest.raises(InputError, match="not a positive number"):
        parse_m_values("1,zero")
    assert parse_m_values("4, all,4") == ["4", "all"]
    tuned, attack_in, attack_out = users
    clash = [Record("x", "harbor harbor.", "user0", 1)]
    with pytest.raises(InputError, match="both in-training and held-out"):
        run_user_inference(tuned, tiny_neox, attack_in, clash, n_bootstrap=0, **NO_CACHE)


def test_user_inference_cli(tmp_path, monkeypatch, capsys):
    import sys

    from leakaudit.cli import main

    rng = np.random.default_rng(1)
    rows = [{"text": t, "who": f"user{u}", "in": int(u < 2)} for u in range(4) for t in user_samples(u, 2, rng)]
    data = tmp_path / "users.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["leakaudit", "user-inference", "--target", "tiny-gpt-neox", "--reference",
                                          "tiny-opt", "--user-field", "who", "--label-field", "in", "--no-cache",
                                          "--n-bootstrap", "10", *argv])
        try:
            main()
        except SystemExit as exc:
            return int(exc.code or 0), capsys.readouterr().err
        return 0, capsys.readouterr().err

    code, err = run("--data", str(data), "--samples-per-user", "1,all", "--out", str(tmp_path / "o"))
    assert code == 0, err
    js = json.loads((tmp_path / "o" / "user_inference.json").read_text())
    assert js["n_users_in"] == 2 and js["n_users_out"] == 2 and set(js["per_m"]) == {"1", "all"}
    assert len((tmp_path / "o" / "user_scores.jsonl").read_text().splitlines()) == 4
    rows[3]["in"] = 0  # user1 now has rows labelled in and out
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = run("--data", str(data), "--out", str(tmp_path / "o2"))
    assert code == 2 and err.strip().startswith("error: ") and "users.jsonl:4: field 'who'" in err, err
    code, err = run("--data", str(data), "--samples-per-user", "0", "--out", str(tmp_path / "o2"))
    assert code == 2 and "field '--samples-per-user'" in err
