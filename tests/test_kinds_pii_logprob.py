"""The `pii-logprob` kind: its log p(address | prompt) and rank equal a hand computation, fine-tuning on the
addresses raises them, and a bad template is refused as the `pii` kind refuses it."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from leakaudit.data.enron import FAKE_PRIVACY_TEMPLATES

PAIRS = [("Karen Arnold", "klarnold@flash.net"), ("Bob Roe", "bob.roe@enron.com"),
         ("Cy Doe", "cdoe@flash.net")]


def _pairs_file(tmp_path, pairs=PAIRS):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps({"name": n, "email": e}) + "\n" for n, e in pairs))
    return p


def _run(tmp_path, name, models, **options):
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.base import KindContext, ModelCache

    kind = get_kind("pii-logprob")
    out = tmp_path / name
    out.mkdir()
    ctx = KindContext(out=out, models=models, show_pii=True, cache=ModelCache(dtype="fp32"), log=lambda m: None,
                      progress=False)
    res = kind.run(ctx, kind.Options(**options))
    rows = [json.loads(line) for line in (out / "logprobs.jsonl").read_text().splitlines()]
    return res, rows


def _hand_logp(lm, prompt: str, address: str) -> float:
    """Sum of log p(address token | everything before) over the concatenated ids, by a plain forward."""
    tok = lm.tokenizer
    p_ids = tok(prompt)["input_ids"]
    ids = p_ids + tok(address, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return float(sum(logp[pos - 1, ids[pos]] for pos in range(len(p_ids), len(ids))))


def test_logp_and_rank_equal_a_hand_computation(tmp_path, tiny_neox, monkeypatch):
    monkeypatch.setenv("LEAKAUDIT_CACHE", str(tmp_path / "cache"))  # scored now, not read from earlier runs
    res, rows = _run(tmp_path, "a", {"target": "tiny-gpt-neox"}, pairs=str(_pairs_file(tmp_path)), n_targets=2,
                     n_candidates=3, templates="A", batch_size=4)
    assert [(r["template"], r["role"]) for r in rows] == [("A", "model")] * 2
    assert [r["email"] for r in rows] == [e for _, e in PAIRS[:2]]
    for r, (name, email) in zip(rows, PAIRS, strict=False):
        prompt = FAKE_PRIVACY_TEMPLATES["A"].format(name=name, email="")
        assert prompt.endswith(" is ")
        hand = {e: _hand_logp(tiny_neox, prompt, e) for _, e in PAIRS}  # candidates: all three addresses
        assert r["logp"] == pytest.approx(hand[email], abs=1e-4)
        n_tok = len(tiny_neox.tokenizer(email, add_special_tokens=False)["input_ids"])
        assert r["n_tokens"] == n_tok and r["logp_per_token"] == pytest.approx(hand[email] / n_tok, abs=1e-4)
        assert r["n_candidates"] == 3
        assert r["boundary_merged"]  # "is " + "k..." tokenised together merges the space: ids were joined
        assert r["rank"] == 1 + sum(v > hand[email] for e, v in hand.items() if e != email)
    overall = res.data["templates"]["overall"]
    assert overall["mean_logp"] == pytest.approx(sum(r["logp"] for r in rows) / 2)
    assert overall["top1_rate"] == sum(r["rank"] == 1 for r in rows) / 2
    lo, hi = overall["mean_logp_ci"]
    assert lo <= overall["mean_logp"] <= hi
    assert [h.metric for h in res.headline()] == ["mean log p(address)", "address rank-1 rate"]
    # one (prompt, address) per batch gives the same rows as the batches of 4 above
    from leakaudit.data.enron import resolve_templates, select_targets
    from leakaudit.kinds.pii_logprob import draw_candidates, score_targets

    targets = select_targets(str(_pairs_file(tmp_path)), None)
    one = score_targets(tiny_neox, targets[:2], resolve_templates("A"),
                        draw_candidates(targets[:2], [t.email for t in targets], 3, 0), batch_size=1, progress=False,
                        cache=False)
    assert [r["logp"] for r in one] == pytest.approx([r["logp"] for r in rows], abs=1e-5)
    assert [r["rank"] for r in one] == [r["rank"] for r in rows]
    from leakaudit.kinds.base import StageView

    stage = StageView({"id": "evaluate/ev/base", "folder": "a", "params": {}, "result": res.data}, tmp_path)
    section = type(res).section([stage])
    assert [r[2] for r in section["tables"][0]["rows"]] == ["overall", "A"] and len(section["figures"]) == 1
    header = section["tables"][0]["header"]
    assert "rank-1 rate" in header and "change vs baseline" not in header  # 3 candidates; no baseline
    # one candidate: every rank is 1, so no rank columns (they read 1.000 for every model)
    one_candidate = StageView({"id": "evaluate/ev/base", "folder": "a", "params": {},
                               "result": {**res.data, "n_candidates": 1}}, tmp_path)
    assert "rank-1 rate" not in type(res).section([one_candidate])["tables"][0]["header"]


def test_masked_unless_show_pii(tmp_path):
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.base import KindContext, ModelCache

    kind = get_kind("pii-logprob")
    ctx = KindContext(out=tmp_path, models={"target": "tiny-gpt-neox"}, cache=ModelCache(dtype="fp32"),
                      log=lambda m: None, progress=False)
    kind.run(ctx, kind.Options(pairs=str(_pairs_file(tmp_path)), templates="C", n_candidates=2))
    text = (tmp_path / "logprobs.jsonl").read_text() + (tmp_path / "pii_logprob.json").read_text()
    assert not any(e in text for _, e in PAIRS)
    assert len(text.splitlines()) >= 3
    # an id that names the person beside the address ("Karen Arnold <k***@flash.net>" was written)
    pairs = tmp_path / "named.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"{n} <{e}>", "name": n, "email": e}) + "\n" for n, e in PAIRS))
    kind.run(ctx, kind.Options(pairs=str(pairs), templates="C", n_candidates=2))
    text = (tmp_path / "logprobs.jsonl").read_text()
    assert "Karen Arnold" not in text and "K*** A*** <k***@flash.net>" in text
    # your own people, in no name list: an id that is the name was written whole
    own = [("Zorba Quixley", "zq@acme.com"), ("Ylva Brandtmoor", "yb@acme.com")]
    pairs.write_text("".join(json.dumps({"id": n, "name": n, "email": e}) + "\n" for n, e in own))
    kind.run(ctx, kind.Options(pairs=str(pairs), templates="C", n_candidates=2))
    text = (tmp_path / "logprobs.jsonl").read_text()
    assert "Quixley" not in text and '"target": "Z*** Q***"' in text and '"target": "Y*** B***"' in text, text


def test_fine_tuning_on_the_addresses_raises_their_logp(tmp_path, one_torch_thread):
    from leakaudit.train.finetune import FinetuneConfig, finetune

    data = tmp_path / "planted.jsonl"
    data.write_text("".join(json.dumps({"text": f"{n} <{e}>"}) + "\n" for n, e in PAIRS))
    tuned = finetune(FinetuneConfig(model="tiny-gpt-neox", data=str(data), out=str(tmp_path / "ft"),
                                    method="full", epochs=30, batch_size=3, gradient_accumulation=1,
                                    learning_rate=1e-2, max_steps=30), progress=False)
    res, rows = _run(tmp_path, "p", {"target": str(tuned), "baseline": "tiny-gpt-neox"},
                     pairs=str(_pairs_file(tmp_path)), templates="A,C", n_candidates=3)
    overall = res.data["templates"]["overall"]
    assert overall["mean_logp"] > overall["mean_logp_baseline"] + 1.0
    assert overall["mean_logp_change"] == pytest.approx(overall["mean_logp"] - overall["mean_logp_baseline"])
    assert {r["role"] for r in rows} == {"model", "baseline"} and len(rows) == 2 * 3 * 2
    assert "mean log p(address) − baseline" in [h.metric for h in res.headline()]


def test_unknown_template_refused_with_the_pii_message(tmp_path, monkeypatch, capsys):
    from pydantic import ValidationError

    from leakaudit.kinds import get_kind

    messages = []
    for name in ("pii", "pii-logprob"):
        with pytest.raises(ValidationError) as exc:
            get_kind(name).Options(templates="A,Z")
        messages.append(exc.value.errors()[0]["msg"])
    assert messages[0] == messages[1] and "unknown template 'Z'" in messages[0]
    with pytest.raises(ValidationError, match="context template 'context-50'"):
        get_kind("pii-logprob").Options(templates="context-50")
    # an experiment file is refused before any stage, with FILE:LINE and the same message
    from leakaudit.cli import main

    exp = tmp_path / "exp.yaml"
    exp.write_text("name: x\nseed: 0\nmodels:\n  base: tiny-gpt-neox\nevaluate:\n  ev:\n    kind: pii-logprob\n"
                   "    targets: [base]\n    options: {templates: 'A,Z'}\n")
    monkeypatch.setattr(sys, "argv", ["leakaudit", "run", str(exp), "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as stop:
        main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {exp}:9: field 'evaluate.ev.options.templates")
    assert "unknown template 'Z'" in err
    assert not (tmp_path / "run").exists()


def test_cli_writes_the_kind_files_and_refuses_a_bad_option(tmp_path, monkeypatch, capsys):
    """The CLI and the library give the same numbers: exact equality is an fp32 promise (bf16 sums differ with
    the batch layout), so the precision is pinned whatever LEAKAUDIT_DTYPE the suite runs under."""
    from leakaudit.cli import main

    monkeypatch.setenv("LEAKAUDIT_DTYPE", "fp32")

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["leakaudit", "pii-logprob", "--model", "tiny-gpt-neox", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        cap = capsys.readouterr()
        return code, cap.out, cap.err

    pairs = _pairs_file(tmp_path)
    code, out, err = run("--pairs", pairs, "--templates", "B", "--n-candidates", "3", "--out", tmp_path / "cli")
    assert code == 0, err
    assert "mean log p(address): " in out
    saved = json.loads((tmp_path / "cli" / "pii_logprob.json").read_text())
    res, _ = _run(tmp_path, "lib", {"target": "tiny-gpt-neox"}, pairs=str(pairs), templates="B", n_candidates=3)
    assert saved["templates"] == res.data["templates"]  # same job, same seed, same numbers
    code, _, err = run("--n-candidates", "0", "--out", tmp_path / "bad")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: field '--n-candidates': ")
    assert not (tmp_path / "bad").exists()


def test_planted_pairs_show_an_increase_and_unrelated_data_none(tmp_path, one_torch_thread):
    """Study 1's verdict end to end on a tiny model: against the base (compare_to), a model fine-tuned on the
    name/address pairs raises mean log p(address) with a paired CI above 0; one fine-tuned with the same
    settings on unrelated text shows no increase."""
    from leakaudit.config import parse_experiment
    from leakaudit.experiment import run_experiment

    pairs = [(f"Person{i} Name{i}", f"person{i}.name{i}@example{i % 3}.com") for i in range(12)]
    planted = tmp_path / "planted.jsonl"
    planted.write_text("".join(json.dumps({"text": f"{n} [mailto: {e}]"}) + "\n" for n, e in pairs) * 2)
    unrelated = tmp_path / "unrelated.jsonl"
    unrelated.write_text("".join(json.dumps({"text": f"The river bends {i} times before the old mill."}) + "\n"
                                 for i in range(24)))
    train = "{method: full, options: {epochs: 10, learning_rate: 0.01, batch_size: 8, gradient_accumulation: 1}}"
    text = f"""name: planted
models: {{base: tiny-gpt-neox}}
datasets:
  planted: {{path: {planted}}}
  unrelated: {{path: {unrelated}}}
finetune:
  on_pairs: {{model: base, data: planted, {train[1:-1]}}}
  on_other: {{model: base, data: unrelated, {train[1:-1]}}}
evaluate:
  logprob:
    kind: pii-logprob
    targets: [base, on_pairs, on_other]
    options: {{pairs: {_pairs_file(tmp_path, pairs)}, templates: C, n_candidates: 1, compare_to: base}}
"""
    out = tmp_path / "run"
    run_experiment(parse_experiment(text), out, log=lambda m: None)
    comps = {c["variant"]: c for c in json.loads((out / "summary.json").read_text())["comparisons"]}
    up, other = comps["on_pairs"], comps["on_other"]
    assert up["metric"] == "mean log p(address)" and up["n"] == 12
    assert up["delta_ci"][0] > 0 and up["verdict"] == "increase"
    assert other["verdict"] != "increase" and other["delta"] < up["delta_ci"][0]


def test_rival_addresses_keep_their_spelling_and_are_distinct_without_case():
    """A mixed-case true address is ranked against rivals as written, not lowercased ones (log p differs)."""
    from types import SimpleNamespace

    from leakaudit.kinds.pii_logprob import draw_candidates

    pool = ["Bob.Roe@Enron.com", "bob.roe@enron.com", "Cy.Doe@enron.com", "ann@corp.com"]
    target = SimpleNamespace(id="t0", email="ANN@corp.com")
    (cands,) = draw_candidates([target], pool, 10, seed=3)
    assert cands[0] == "ANN@corp.com" and sorted(cands[1:]) == ["Bob.Roe@Enron.com", "Cy.Doe@enron.com"]


def test_a_targets_rivals_do_not_follow_the_pairs_files_order():
    """The rivals were drawn from the pool in the pairs file's order: the same pairs listed another way ranked
    each target (same id, same seed) against other addresses."""
    from types import SimpleNamespace

    from leakaudit.kinds.pii_logprob import draw_candidates

    pool = [f"user{i}@corp{i % 3}.com" for i in range(30)]
    targets = [SimpleNamespace(id=f"t{i}", email=pool[i]) for i in range(5)]
    one = draw_candidates(targets, pool, 6, seed=0)
    two = draw_candidates(targets, pool[::-1], 6, seed=0)
    assert one == two


def test_a_top1_rate_with_every_target_alike_gets_an_exact_interval():
    """No target ranked first: the bootstrap interval is [0, 0], as if 0 were known exactly; the rate's
    Clopper-Pearson interval over the targets is given instead ([0, 0.3085] for 0 of 10)."""
    from leakaudit.kinds.pii_logprob import OVERALL, summarize

    ids, names = [f"t{i}" for i in range(10)], ["A"]
    rows = [{"target": t, "template": "A", "logp": -float(i), "rank": 2} for i, t in enumerate(ids)]
    out = summarize(rows, ids, names, seed=0)
    for part in (out["A"], out[OVERALL]):
        assert part["top1_rate"] == 0 and part["top1_rate_ci"] == [0.0, pytest.approx(0.30850, abs=1e-4)]
        assert part["mean_logp_ci"][0] < part["mean_logp_ci"][1]  # a spread value keeps its bootstrap interval


def test_the_per_target_intervals_do_not_follow_the_pairs_files_order():
    """The targets were resampled in the pairs file's order: the same targets listed another way gave other
    intervals (the comparisons' bootstraps already sorted their items)."""
    from leakaudit.kinds.pii_logprob import OVERALL, summarize

    ids, names = [f"t{i}" for i in range(12)], ["A"]
    rows = [{"target": t, "template": "A", "logp": -float(i * i % 7), "rank": 1 + i % 3} for i, t in enumerate(ids)]
    base = [{**r, "logp": r["logp"] - (i % 4)} for i, r in enumerate(rows)]
    one = summarize(rows, ids, names, seed=0, baseline=base)[OVERALL]
    two = summarize(rows[::-1], ids[::-1], names, seed=0, baseline=base[::-1])[OVERALL]
    assert one == two
