"""User inference on synthetic users, each writing with their own vocabulary: a tiny model fine-tuned on
some users' samples separates those users from held-out ones, judged from *other* samples of theirs."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from conftest import run_main, torch_threads

from leakaudit.attacks.user_inference import parse_m_values, run_user_inference
from leakaudit.data.io import Record
from leakaudit.errors import InputError
from leakaudit.kinds.compare import ZERO_WIDTH
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
    # records given as generators are all read (a type check must not consume them)
    again = run_user_inference(tuned, tiny_neox, (r for r in attack_in), (r for r in attack_out), m_values="all",
                               n_bootstrap=0, **NO_CACHE)
    assert (again.per_m["all"].n_pos, again.per_m["all"].n_neg) == (6, 6)
    assert again.per_m["all"].auc == pytest.approx(report.per_m["all"].auc)


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
    # one sample per batch and padded batches give the same statistic
    for batch in (1, 5):
        again = run_user_inference(tuned, tiny_neox, attack_in, attack_out, m_values=[2], n_bootstrap=0,
                                   batch_size=batch, **NO_CACHE)
        assert again.user_scores["2"] == pytest.approx(report.user_scores["2"], rel=1e-5, abs=1e-5), batch


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
    with pytest.raises(InputError, match=r"both member \(in-training\) and non-member"):
        run_user_inference(tuned, tiny_neox, attack_in, clash, n_bootstrap=0, **NO_CACHE)


def test_user_inference_cli(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(1)
    rows = [{"text": t, "who": f"user{u}", "in": int(u < 2)} for u in range(4) for t in user_samples(u, 2, rng)]
    data = tmp_path / "users.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(*argv):
        return run_main(["user-inference", "--target", "tiny-gpt-neox", "--reference", "tiny-opt", "--user-field",
                         "who", "--label-field", "in", "--no-cache", "--n-bootstrap", "10", *argv], monkeypatch, capsys,
                        stdout=True)

    code, out, err = run("--data", str(data), "--samples-per-user", "1,all", "--out", str(tmp_path / "o"))
    assert code == 0, err
    js = json.loads((tmp_path / "o" / "user_inference.json").read_text())
    assert js["n_users_in"] == 2 and js["n_users_out"] == 2 and set(js["per_m"]) == {"1", "all"}
    assert len((tmp_path / "o" / "user_scores.jsonl").read_text().splitlines()) == 4
    assert "only 2 non-member users: TPR at FPR 0.01 needs at least 100" in err  # users, not texts
    assert "in/out" in out and re.search(r"m=1\s*│\s*2/2\s*│", out), out  # each m's users, on stdout
    # an m beyond every user's samples: the flag typed (not the experiment option's name) and what m would do
    code, _, err = run("--data", str(data), "--samples-per-user", "3,8", "--out", str(tmp_path / "o2"))
    assert code == 2 and "field '--samples-per-user': no value of samples-per-user" in err, err
    assert "(the most samples an in-training user has: 2; a user not in training: 2)" in err, err
    rows[3]["in"] = 0  # user1 now has rows labelled in and out
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run("--data", str(data), "--out", str(tmp_path / "o2"))
    assert code == 2 and err.strip().startswith("error: ") and "users.jsonl:4: field 'who'" in err, err
    code, _, err = run("--data", str(data), "--samples-per-user", "0", "--out", str(tmp_path / "o2"))
    assert code == 2 and "field '--samples-per-user'" in err
    rows[3]["in"] = 1
    rows[5]["text"] = "a"  # one token: nothing to score (it counted as a score of 0 in the user's mean)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run("--data", str(data), "--out", str(tmp_path / "o3"))
    assert code == 2 and "users.jsonl:6: field 'text': text has fewer than 2 tokens" in err, err



def test_user_inference_cli_says_user_ids_in_two_unicode_forms(tmp_path, monkeypatch, capsys):
    """The command reads its users itself (not through a kind's records), so the look-alike id warning the
    docs promise was never said: "José" as one code point among the members and as e + U+0301 among the
    non-members, the same person on both sides, ran as two users in silence. Said now, from one labelled
    file and from two files."""
    rng = np.random.default_rng(1)
    names = ["Jos\u00e9", "user1", "Jose\u0301", "user3"]
    rows = [{"text": t, "who": names[u], "in": int(u < 2)} for u in range(4) for t in user_samples(u, 2, rng)]
    (tmp_path / "users.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (tmp_path / "out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    said = "field 'who': 1 user id(s) are written in more than one Unicode form"
    base = ["user-inference", "--target", "tiny-gpt-neox", "--reference", "tiny-gpt-neox", "--user-field", "who",
            "--no-cache", "--n-bootstrap", "0", "--samples-per-user", "all"]
    code, err = run_main([*base, "--data", tmp_path / "users.jsonl", "--label-field", "in", "--out",
                          tmp_path / "o1"], monkeypatch, capsys)
    assert code == 0 and f"warning: {tmp_path / 'users.jsonl'}:1: {said}" in err, err
    from leakaudit import warn

    warn._WARNED.clear()
    code, err = run_main([*base, "--data", tmp_path / "in.jsonl", "--data-out", tmp_path / "out.jsonl", "--out",
                          tmp_path / "o2"], monkeypatch, capsys)
    assert code == 0 and f"warning: {tmp_path / 'in.jsonl'}:1: {said}" in err, err
    assert len((tmp_path / "o2" / "user_scores.jsonl").read_text().splitlines()) == 4  # kept apart, as given

# ----------------------------------------------------------------------------------------- who is vulnerable
def test_planted_heavy_user_is_top_and_the_cap_brings_it_down(tmp_path, tiny_neox, one_torch_thread, monkeypatch,
                                                               capsys):
    """user0's two training texts appear 20 times each in the fine-tuning data: uncapped, user0 gets the top
    score of all users; the per-user cap (2 rows per user) brings its score down. n_train and ref_nll are in
    every user row, and the vulnerability correlations are in the result."""
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.base import KindContext, ModelCache
    from leakaudit.train.finetune import FinetuneConfig, finetune

    rng = np.random.default_rng(5)
    train, members, nonmembers = [], [], []
    for u in range(10):
        trained, held = user_samples(u, 2, rng), user_samples(u, 3, rng)
        rows = [{"id": f"h{u}-{i}", "text": t, "user": f"user{u}"} for i, t in enumerate(held)]
        if u < 5:
            train += [{"text": t, "user": f"user{u}"} for t in trained * (20 if u == 0 else 1)]
            members += rows
        else:
            nonmembers += rows
    files = {}
    for name, rows in (("training", train), ("members", members), ("nonmembers", nonmembers)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    kind = get_kind("user-inference")
    options = kind.Options(m_values="all", n_bootstrap=50, cache=False)
    scores = {}
    for arm, cap in (("none", None), ("cap", 2)):
        model_dir = finetune(FinetuneConfig(
            model="tiny-gpt-neox", data=str(files["training"]), out=str(tmp_path / arm), method="full",
            user_field="user", max_samples_per_user=cap, epochs=4, batch_size=8, gradient_accumulation=1,
            learning_rate=3e-3, max_length=32, max_grad_norm=None), progress=False)
        out = tmp_path / f"ui-{arm}"
        out.mkdir()
        ctx = KindContext(out=out, data=files, models={"target": str(model_dir), "reference": "tiny-gpt-neox"},
                          data_fields={r: {"id_field": "id"} for r in ("members", "nonmembers")},
                          cache=ModelCache(dtype="fp32"), log=lambda m: None, progress=False)
        res = kind.run(ctx, options).to_json()
        rows = [json.loads(x) for x in (out / "user_scores.jsonl").read_text().splitlines()]
        assert all(isinstance(r["ref_nll"], float) and r["ref_nll"] > 0 for r in rows)
        n_train = {r["user"]: r["n_train"] for r in rows}
        assert n_train["user0"] == 40 and n_train["user1"] == 2 and n_train["user7"] == 0  # the file as given
        scores[arm] = {r["user"]: r["score"] for r in rows}
        vul = res["vulnerability"]
        assert vul["n_train"]["n"] == 5 and vul["ref_nll"]["n"] == 5 and res["training"] == str(files["training"])
    top = max(scores["none"], key=scores["none"].get)
    assert top == "user0", scores["none"]
    assert scores["cap"]["user0"] < scores["none"]["user0"] - 1.0  # nats per sample
    # and not only because the capped model trained fewer steps: user0 is no longer above the other members
    assert scores["cap"]["user0"] < max(scores["cap"][f"user{u}"] for u in range(1, 5)), scores["cap"]
    # without the training file: no n_train in the rows, its correlation is null
    out = tmp_path / "ui-no-training"
    out.mkdir()
    ctx = KindContext(out=out, data={k: v for k, v in files.items() if k != "training"},
                      models={"target": str(tmp_path / "none"), "reference": "tiny-gpt-neox"},
                      data_fields={r: {"id_field": "id"} for r in ("members", "nonmembers")},
                      cache=ModelCache(dtype="fp32"), log=lambda m: None, progress=False)
    res = kind.run(ctx, options).to_json()
    assert res["vulnerability"]["n_train"] is None and res["vulnerability"]["ref_nll"]["n"] == 5
    assert not any("n_train" in json.loads(x) for x in (out / "user_scores.jsonl").read_text().splitlines())
    # the command takes the training file too (it was an experiment's role only): the same n_train and ρ
    code, out, err = run_main(["user-inference", "--target", tmp_path / "none", "--reference", "tiny-gpt-neox", "--data",
                          files["members"], "--data-out", files["nonmembers"], "--user-field", "user", "--id-field",
                          "id", "--samples-per-user", "all", "--n-bootstrap", "50", "--no-cache", "--dtype", "fp32",
                          "--training", files["training"], "--out", tmp_path / "cli"], monkeypatch, capsys,
                         stdout=True)
    assert code == 0, err
    cli = json.loads((tmp_path / "cli" / "user_inference.json").read_text())
    rho = cli["vulnerability"]["n_train"]["rho"]
    assert f"who is vulnerable (in-training users' score, m = all): with their training rows: ρ {rho:.3f}" in out
    kind_rows = (tmp_path / "ui-none" / "user_scores.jsonl").read_text().splitlines()
    cli_rows = (tmp_path / "cli" / "user_scores.jsonl").read_text().splitlines()
    assert [json.loads(x)["n_train"] for x in cli_rows] == [json.loads(x)["n_train"] for x in kind_rows]
    assert cli["training"] == str(files["training"])
    assert cli["vulnerability"]["n_train"]["rho"] == pytest.approx(
        json.loads((tmp_path / "ui-none" / "user_inference.json").read_text())["vulnerability"]["n_train"]["rho"])


# ----------------------------------------------------------------------------------------- arms compared
def _stage(out, evaluation, target, scores, options=None, per_m=None):
    """A finished user-inference stage written by hand: user_scores.jsonl and its run.json entry."""
    folder = f"evaluate/{evaluation}/{target}"
    (out / folder).mkdir(parents=True)
    (out / folder / "user_scores.jsonl").write_text("".join(
        json.dumps({"user": u, "label": y, "n_samples": 3, "scores": {"all": s}, "score": s, "ref_nll": 3.0 + s,
                    "n_train": 1 + i % 4}) + "\n" for i, (u, (y, s)) in enumerate(scores.items())))
    n_in = sum(y for y, _ in scores.values())
    result = {"auc": 0.5, "auc_ci": [0.4, 0.6], "tpr_at_fpr": {"0.01": 0.2, "0.001": 0.1},
              "n_users_in": n_in, "n_users_out": len(scores) - n_in, "samples_per_user": "all",
              "per_m": per_m or {"1": {"auc": 0.55, "auc_ci": [0.5, 0.6]}, "all": {"auc": 0.6, "auc_ci": [0.5, 0.7]}},
              "vulnerability": {"n_train": {"rho": 0.5, "ci": [0.1, 0.8], "n": n_in}, "ref_nll": None},
              "scores_file": "user_scores.jsonl", "n_bootstrap": 400, "seed": 0}
    return {"id": folder, "kind": "user-inference", "folder": folder, "key": "k", "status": "ran", "seconds": 1,
            "params": {"target_label": target, "evaluation": evaluation, "options": options or {}},
            "result": result}


def test_comparisons_from_hand_written_stages(tmp_path, monkeypatch):
    from leakaudit.kinds.base import StageView
    from leakaudit.kinds.compare import verdict
    from leakaudit.kinds.user_inference import UserInferenceResult
    from leakaudit.report.html import build

    n = 20
    members, others = [f"in{i}" for i in range(n)], [f"out{i}" for i in range(n)]
    # none: every member above every non-member (AUC 1); cap: members and non-members tied (AUC 0.5);
    # same: the none scores shifted by a constant (AUC 1, Δ 0 on every resample); cap holds one extra user
    # that none lacks: it is left out of the pairing
    none = {**{u: (1, 100.0 + i) for i, u in enumerate(members)}, **{u: (0, float(i)) for i, u in enumerate(others)}}
    cap = {**{u: (1, 1.0) for u in members}, **{u: (0, 1.0) for u in others}, "stray": (1, 99.0)}
    same = {u: (y, s + 7.0) for u, (y, s) in none.items()}
    opts = {"compare_to": "none"}
    stages = [_stage(tmp_path, "users", "none", none, opts), _stage(tmp_path, "users", "cap", cap, opts),
              _stage(tmp_path, "users", "same", same, opts)]
    comps = UserInferenceResult.comparisons([StageView(s, tmp_path) for s in stages])
    by = {c["variant"]: c for c in comps}
    assert set(by) == {"cap", "same"} and all(c["baseline"] == "none" and c["m"] == "all" for c in comps)
    assert by["cap"]["n_users"] == 2 * n and (by["cap"]["n_users_in"], by["cap"]["n_users_out"]) == (n, n)
    assert by["cap"]["auc_baseline"] == pytest.approx(1.0) and by["cap"]["auc_variant"] == pytest.approx(0.5)
    assert by["cap"]["delta"] == pytest.approx(-0.5)  # by hand: 0.5 − 1
    lo, hi = by["cap"]["ci"]
    assert lo <= -0.5 <= hi < 0 and by["cap"]["verdict"] == "reduces"
    assert by["cap"]["ci_half_width"] == pytest.approx((hi - lo) / 2)
    assert by["same"]["delta"] == 0 and by["same"]["ci"] == [0.0, 0.0]
    assert by["same"]["verdict"] == ZERO_WIDTH
    # the verdict follows the interval alone
    assert verdict([0.01, 0.2], "effect") == "increases" and verdict([-0.3, -0.02], "effect") == "reduces"
    assert verdict([-0.1, 0.05], "effect") == "no detectable effect (the CI allows |Δ| up to 0.1)"
    assert verdict(None).startswith("no CI")

    # summary.json and report.html carry them, with TPR@1% shown n/a for 20 held-out users
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "ui"}, "stages": stages}))
    html, summary = build(tmp_path)
    assert [(c["kind"], c["variant"], c["verdict"]) for c in summary["comparisons"]] == [
        ("user-inference", "cap", "reduces"), ("user-inference", "same", by["same"]["verdict"])]
    assert summary["comparisons"][0]["delta"] == pytest.approx(-0.5)
    assert "n/a (needs ≥ 100 non-member users)" in html and "reduces" in html
    assert "User AUC against the attacker&#39;s samples per user m" in html
    # AUC vs m, then score vs n_train and vs ref NLL for the compare_to target only: three figures in all
    assert html.count("<figure>") == 3
    # the AUC-vs-m plot shades the compare_to target's band only (every target's band made one brown mass)
    from leakaudit.kinds.user_inference import UserInferenceResult as UIR
    from leakaudit.report import plots

    shaded = []
    monkeypatch.setattr(plots, "lines_figure", lambda *a, **k: shaded.append(sorted(k["bands"])) or "data:,")
    UIR.section([StageView(s, tmp_path) for s in stages])
    assert shaded == [["none"]]
    assert "Who is vulnerable (training samples)" in html and "Who is vulnerable (outlier measure)" in html
    assert "users · none" in html and "users · cap" not in html


def test_compare_to_naming_no_target_is_a_note(tmp_path):
    from leakaudit.kinds.base import StageView
    from leakaudit.kinds.user_inference import UserInferenceResult

    scores = {"a": (1, 2.0), "b": (0, 1.0), "c": (1, 0.5)}
    stages = [StageView(_stage(tmp_path, "users", t, scores, {"compare_to": "nonee"}), tmp_path)
              for t in ("none", "cap")]
    assert UserInferenceResult.comparisons(stages) == []
    section = UserInferenceResult.section(stages)
    assert "compare_to 'nonee' names no finished target of evaluation 'users' (finished: none, cap)" in section["note"]
    assert len(section["tables"]) == 2  # no comparison table


def test_who_is_vulnerable_draws_a_target_whose_users_scores_differ(tmp_path, monkeypatch):
    """With `compare_to: base` and `reference: base`, the figures were drawn for base, whose score against
    itself is 0 for every user (one dot, "ρ = – –"), and the fine-tune's users were in no figure."""
    from leakaudit.kinds import compare
    from leakaudit.kinds.base import StageView
    from leakaudit.kinds.user_inference import _vulnerability_figures
    from leakaudit.report import plots

    stages = []
    for target, scores in (("base", [0.0, 0.0, 0.0]), ("ft", [0.3, -0.1, 0.8])):
        folder = tmp_path / "evaluate" / "users" / target
        folder.mkdir(parents=True)
        (folder / "user_scores.jsonl").write_text("".join(
            json.dumps({"user": f"u{i}", "label": 1, "score": s, "n_train": i + 1, "ref_nll": 2.0 + i}) + "\n"
            for i, s in enumerate(scores)))
        stages.append(StageView({"id": f"evaluate/users/{target}", "folder": f"evaluate/users/{target}",
                                 "params": {"evaluation": "users", "target_label": target,
                                            "options": {"compare_to": "base"}}, "result": {}}, tmp_path))
    drawn = []
    monkeypatch.setattr(plots, "scatter_figure", lambda x, y, title, *a, **k: drawn.append((title, y)) or "data:,")
    figures = _vulnerability_figures(stages, compare.by_evaluation(stages))
    assert len(figures) == 2 and [t.split(":")[0] for t, _ in drawn] == ["ft", "ft"]
    assert drawn[0][1] == [0.3, -0.1, 0.8]


def test_a_baseline_that_is_its_own_reference_is_said_in_the_verdict(tmp_path):
    """As the MIA verdict says of `ref`: with `reference: base` and `compare_to: base` the base scores every
    user 0, so its user AUC is 0.5 by construction and the comparison is one against chance."""
    from leakaudit.kinds.base import StageView
    from leakaudit.kinds.user_inference import OWN_REFERENCE, UserInferenceResult

    stages = []
    for target, scores in (("base", [0.0] * 6), ("ft", [0.9, 0.8, 0.7, 0.1, 0.2, 0.3])):
        folder = tmp_path / "evaluate" / "users" / target
        folder.mkdir(parents=True)
        (folder / "user_scores.jsonl").write_text("".join(
            json.dumps({"user": f"u{i}", "label": int(i < 3), "score": s}) + "\n" for i, s in enumerate(scores)))
        stages.append(StageView({"id": f"evaluate/users/{target}", "folder": f"evaluate/users/{target}",
                                 "params": {"evaluation": "users", "target_label": target,
                                            "options": {"compare_to": "base", "n_bootstrap": 50}},
                                 "result": {"target": target, "reference": "base", "samples_per_user": "all"}},
                                tmp_path))
    (c,) = UserInferenceResult.comparisons(stages)
    assert c["note"] == OWN_REFERENCE and c["variant"] == "ft"


def test_a_correlation_without_a_value_or_an_interval_says_why(tmp_path):
    """The base model of `reference: base` scores every user 0, so its ρ has no value: the table read
    "– –, n = 12". A ρ without an interval because a few users give one side all its spread read "every
    resample alike", which is the other case's reason."""
    from leakaudit.kinds.base import StageView
    from leakaudit.kinds.user_inference import UserInferenceResult

    scores = {f"u{i}": (i % 2, float(i)) for i in range(12)}
    stage = _stage(tmp_path, "users", "base", scores)
    stage["result"]["vulnerability"] = {
        "n_train": {"rho": 0.52, "ci": None, "n": 6, "note": "40% of resamples have no spread on one side (a few of "
                                                             "the 6 pairs give it all): no interval"},
        "ref_nll": {"rho": None, "ci": None, "n": 6}}
    (table,) = [t for t in UserInferenceResult.section([StageView(stage, tmp_path)])["tables"] if "m" in t["header"]
                and any("ρ" in h for h in t["header"])]
    cells = table["rows"][0][-2:]
    assert cells[1] == "undefined (one side has no spread), n = 6"
    assert "a few users give one side all its spread" in cells[0] and "every resample alike" not in cells[0]


def test_the_headline_table_names_the_m_of_each_user_auc(tmp_path):
    """The verdicts said "user AUC (m = 4)" and the headline table's column only "user AUC": a reader of the
    first table could not tell at how many samples per user the number was. Two evaluations at two m's are
    two columns, each naming its m, and summary.json's rows carry it."""
    from leakaudit.report.html import build

    scores = {f"u{i}": (i % 2, float(i)) for i in range(12)}
    stages = [_stage(tmp_path, "users", "ft", scores), _stage(tmp_path, "users1", "ft", scores)]
    stages[0]["result"]["samples_per_user"] = "4"
    stages[1]["result"]["samples_per_user"] = "1"
    (tmp_path / "run.json").write_text(json.dumps({"experiment": {"name": "ui"}, "stages": stages}))
    html, summary = build(tmp_path)
    head = html[html.index('id="headline-table"'):]
    head = head[:head.index("</table>")]
    assert ">users: user AUC (m = 4)</th>" in head and ">users1: user AUC (m = 1)</th>" in head
    assert sorted(r["m"] for r in summary["headline"] if r["metric"] == "user AUC") == ["1", "4"]


def test_the_user_section_says_what_a_tpr_at_a_low_fpr_is(tmp_path):
    """Its table's TPR@1%FPR column was named and never defined (the share of member users flagged at the
    threshold that flags 1% of non-member users)."""
    from leakaudit.kinds.base import StageView
    from leakaudit.kinds.user_inference import UserInferenceResult

    stage = _stage(tmp_path, "users", "ft", {f"u{i}": (i % 2, float(i)) for i in range(12)})
    note = UserInferenceResult.section([StageView(stage, tmp_path)])["note"]
    assert "the share of member users an attacker flags at the score threshold that flags 1% of the non-member users" in note


def test_the_user_figures_text_alternatives_give_what_they_draw(tmp_path):
    """The AUC-by-m plot and the who-is-vulnerable scatters had the alt "plot, described in the caption
    below", and the captions give no number: read aloud, the AUC at each m and the ρ were lost."""
    from leakaudit.kinds.base import StageView, fmt
    from leakaudit.kinds.user_inference import UserInferenceResult

    scores = {f"u{i}": (i % 2, float(i)) for i in range(12)}
    stage = _stage(tmp_path, "users", "ft", scores)
    figures = UserInferenceResult.section([StageView(stage, tmp_path)])["figures"]
    per_m = stage["result"]["per_m"]
    assert f"ft m = 1 {fmt(per_m['1']['auc'])}, m = all {fmt(per_m['all']['auc'])}" in figures[0]["alt"]
    rho = stage["result"]["vulnerability"]["n_train"]
    assert f"ρ = {fmt(rho['rho'])}" in figures[1]["alt"] and "6 in-training users" in figures[1]["alt"]


def test_training_file_is_read_for_its_users_only(tmp_path, monkeypatch, capsys):
    """--training counts each user's rows and reads nothing else: an instruction fine-tune's rows have no text
    field, and a chat fine-tune's data may hold a conversation with no reply (finetune accepts it); both were
    refused ("field 'text': missing", "has no assistant turn with content ... nothing of it to score")."""
    rows = [{"text": f"Sample text number {i} written by one of the users.", "u": f"u{i % 6}",
             "label": int(i % 6 < 3)} for i in range(12)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    instruction = tmp_path / "instruction.jsonl"
    instruction.write_text("".join(json.dumps({"prompt": "p", "response": f"r{i}", "u": f"u{i % 3}"}) + "\n"
                                   for i in range(7)))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}], "u": f"u{i % 3}"}) + "\n"
                            for i in range(7)))
    for name, training in (("instruction", instruction), ("chat", chat)):
        code, err = run_main(["user-inference", "--target", "tiny-gpt-neox", "--reference", "tiny-opt", "--data",
                                 data, "--user-field", "u", "--training", training, "--samples-per-user", "1",
                                 "--n-bootstrap", "0", "--no-cache", "--dtype", "fp32", "--out", tmp_path / name],
                                monkeypatch, capsys)
        assert code == 0, err
        scored = [json.loads(x) for x in (tmp_path / name / "user_scores.jsonl").read_text().splitlines()]
        assert {r["user"]: r["n_train"] for r in scored if r["label"] == 1} == {"u0": 3, "u1": 2, "u2": 2}


def test_label_field_with_data_out_is_refused(tmp_path, monkeypatch, capsys):
    """With --data-out every row of --data counts as an in-training user's, so a --label-field typed beside it was
    ignored in silence: the users the file labels out of training were scored as members. Refused now, as is
    mia's --label-field beside --members/--nonmembers, before any model loads."""
    rows = [{"text": f"text {u} {i} here", "who": f"user{u}", "in": int(u < 2)} for u in range(4) for i in range(2)]
    (tmp_path / "users.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "more_out.jsonl").write_text(json.dumps({"text": "other text", "who": "user9"}) + "\n")
    code, err = run_main(["user-inference", "--target", "tiny-gpt-neox", "--reference", "tiny-gpt-neox",
                          "--user-field", "who", "--data", tmp_path / "users.jsonl", "--label-field", "in",
                          "--data-out", tmp_path / "more_out.jsonl", "--out", tmp_path / "o"], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: field '--label-field': applies only without --data-out"), err
    assert not (tmp_path / "o").exists()
    code, err = run_main(["mia", "--target", "tiny-gpt-neox", "--members", tmp_path / "users.jsonl", "--nonmembers",
                          tmp_path / "more_out.jsonl", "--label-field", "in", "--out", tmp_path / "m"],
                         monkeypatch, capsys)
    assert code == 2 and err.startswith("error: field '--label-field': applies only to one labelled --data"), err
