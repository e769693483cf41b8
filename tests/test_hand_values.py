"""Values pinned by hand that a mutation-testing pass found unpinned.

Each test here computes its expected value by hand (or by a small independent computation) on a tiny input.
A mutation pass over the package changed one operator, bound or weight at a time and found fourteen such
changes that the rest of the suite let through: an interval at the wrong quantile, a boundary off by one, a
resample of the wrong size, a mean weighted the wrong way, a transform of the logits half applied. Each test
names the bug it guards against; the mutation ids (M07, S08, ...) are those of that pass.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from leakaudit.attacks import backdoor, pii
from leakaudit.data import enron
from leakaudit.metrics import _bca_auc_interval, _percentile_ci, binomial_ci, paired_difference, roc_metrics

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hi there"]


def _hand_logp(lm, text: str, transform=lambda logits: logits) -> np.ndarray:
    """Per-token log p of `text` from the model's own forward: log_softmax(transform(logits)) at each next
    token."""
    ids = lm.tokenizer(text)["input_ids"]
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0, :-1].double()
    logp = torch.log_softmax(transform(logits), -1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


# ----------------------------------------------------------------------------------------- metrics
def test_percentile_ci_of_0_to_1000_is_25_to_975():
    """M07: a 95% percentile interval cuts 2.5% from each end, not 5% (alpha = 1 - ci instead of
    (1 - ci) / 2)."""
    assert _percentile_ci(np.arange(1001.0), 0.95) == pytest.approx([25.0, 975.0])


def test_tpr_at_one_percent_is_resolved_with_exactly_100_non_members():
    """M16: 100 non-members resolve an FPR of 1/100 (one false positive allowed); a strict `>` left it None.

    Non-members score 0..99; members 97.5, 98.5, 99.5, 150, -1. At the threshold 98.5 one non-member (99)
    gets through (FPR 0.01) and three of five members do: TPR 0.6. The threshold 97.5 lets 98 through too
    (0.02)."""
    scores = [*range(100), 97.5, 98.5, 99.5, 150.0, -1.0]
    labels = [0] * 100 + [1] * 5
    m = roc_metrics(scores, labels, n_bootstrap=0, fprs=(0.01, 0.001))
    assert m.n_neg == 100
    assert m.tpr_at_fpr[0.01] == pytest.approx(0.6)
    assert m.tpr_at_fpr[0.001] is None
    assert m.warnings == ["only 100 non-members: TPR at FPR 0.001 needs at least 1000 to be resolved"]


def test_bootstrap_roc_resamples_each_class_at_its_own_size():
    """M18: non-members are redrawn 300 at a time, as many as there are, not 30 (the members' count;
    30 members, so the bootstrap's own interval is the one reported).

    The resamples are drawn here by hand in the code's order (seed 7: all member rows, then all non-member
    rows, each over the class's sorted scores); each resample's AUC counts pairs, its TPR at FPR 0.01 is the
    share of members above the 4th highest non-member (3 of 300 may pass). The AUC ends are then Efron's BCa
    of those AUCs, the TPR ends their 2.5% and 97.5% quantiles."""
    rng = np.random.default_rng(1)
    pos, neg = np.sort(rng.normal(1, 1, 30)), np.sort(rng.normal(0, 1, 300))
    n_boot = 500
    m = roc_metrics(np.r_[pos, neg], np.r_[np.ones(30), np.zeros(300)], n_bootstrap=n_boot, seed=7,
                    fprs=(0.01,))

    draw = np.random.default_rng(7)
    p = pos[draw.integers(0, 30, size=(n_boot, 30))]
    q = neg[draw.integers(0, 300, size=(n_boot, 300))]
    above, tied = p[:, :, None] > q[:, None, :], p[:, :, None] == q[:, None, :]
    aucs = above.mean((1, 2)) + 0.5 * tied.mean((1, 2))
    assert m.auc_ci == pytest.approx(_bca_auc_interval(pos, neg, aucs, 0.95))
    fourth_highest = np.sort(q, axis=1)[:, -4]
    tprs = (p > fourth_highest[:, None]).mean(axis=1)
    want = np.quantile(tprs, [0.025, 0.975])
    assert want[0] < want[1]  # a real interval, not the binomial stand-in for a collapsed one
    assert m.tpr_ci[0.01] == pytest.approx(want)


def test_cluster_bootstrap_mean_divides_by_items_drawn_ci_1_to_4():
    """M19: a resample's mean over clusters divides by the items drawn, not by the items in the data.

    Deltas b - a are 1, 1 (cluster x) and 4 (cluster y). Drawing two clusters gives {x, x}: mean delta 1,
    {y, y}: 4, or {x, y}: (1 + 1 + 4) / 3 = 2 (dividing by the data's 3 items instead moved the ends). With
    two units the expanded percentile interval (t with 1 degree of freedom) reaches the extremes: [1, 4]."""
    d = paired_difference([1, 1, 1], [2, 2, 5], clusters=["x", "x", "y"], n_bootstrap=2000, seed=0)
    assert d["delta"] == pytest.approx(2.0)
    assert d["ci"] == pytest.approx([1.0, 4.0])


# ----------------------------------------------------------------------------------------- scoring
def _tiny_of(arch: str, tmp_path, dtype: str = "fp32", head_scale: float = 1.0, **config) -> Any:
    """A tiny model of another architecture (Gemma 2, Cohere) with the tiny tokenizer, loaded as a user's own;
    `head_scale` multiplies the output embeddings (logits the size a trained model's are, ~±20)."""
    import transformers

    from leakaudit.models import load_model
    from leakaudit.models.factories import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    cfg = getattr(transformers, f"{arch}Config")(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, **config)
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    out = tmp_path / arch
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return load_model(str(out), dtype=dtype)


@pytest.mark.parametrize("arch, config", [("Gemma2", {"final_logit_softcapping": 0.5}),
                                          ("Cohere", {"logit_scale": 0.0625})])
def test_soft_capped_and_logit_scaled_models_score_their_own_logits(arch, config, tmp_path):
    """S08/S09: the engine runs the head itself, on hidden states the forward returns with the head swapped
    out; the forward's own soft-cap (Gemma 2) or logit_scale (Cohere) then met the hidden states and the engine
    applied it again: Cohere's logits were scaled by 0.0625^2, Gemma 2's capped twice (a helper's probe: mean
    log p -6.686 against -8.494). Hand values: the model's own forward."""
    from leakaudit.scoring import score_texts

    lm = _tiny_of(arch, tmp_path, **config)
    got = score_texts(lm, TEXTS, cache=False, progress=False, moments=True)
    for text, s in zip(TEXTS, got, strict=True):
        want = _hand_logp(lm, text)
        assert not np.allclose(want, _hand_logp(lm, text, lambda x: x * 16 if arch == "Cohere" else x / 0.5),
                               atol=1e-2)  # the transform matters here
        np.testing.assert_allclose(s.logp, want, atol=1e-5)
    assert lm.model.config.final_logit_softcapping if arch == "Gemma2" else True  # restored after the pass


@pytest.mark.parametrize("arch, config", [("Gemma2", {"final_logit_softcapping": 30.0}),
                                          ("Cohere", {"logit_scale": 0.8333})])
def test_soft_capped_and_logit_scaled_models_in_bf16_are_scored_not_refused(arch, config, tmp_path):
    """The head-path check compared the model's bf16 cap with the engine's fp32 one at a fixed 0.05 nats: real
    Gemma 2 and Command R+ sized logits (±15-28) differ by 0.09-0.16 from rounding alone, and bf16 is the GPU
    default (a review's reproduction). Scored now, within bf16 rounding of the model's own logits."""
    from leakaudit.scoring import score_texts

    lm = _tiny_of(arch, tmp_path, dtype="bf16", head_scale=20.0, **config)  # logits of 15-25
    ids = lm.tokenizer(TEXTS[0])["input_ids"]
    with torch.no_grad():
        assert float(lm.model(torch.tensor([ids])).logits.float().abs().max()) > 10  # logits of a trained size
    got = score_texts(lm, TEXTS, cache=False, progress=False)
    for text, s in zip(TEXTS, got, strict=True):
        np.testing.assert_allclose(s.logp, _hand_logp(lm, text), atol=0.35)


def test_a_forward_that_changes_its_logits_otherwise_is_refused(monkeypatch):
    """An architecture whose forward transforms its logits in a way the engine does not reproduce (here a tanh
    the config does not name) is refused in one line before any score, never scored wrongly."""
    from leakaudit.errors import InputError
    from leakaudit.models import load_model
    from leakaudit.scoring import score_texts

    lm = load_model("tiny-gpt-neox", dtype="fp32")  # its own copy: the forward is patched
    forward = lm.model.forward

    def squashed(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = torch.tanh(out.logits)
        return out

    monkeypatch.setattr(lm.model, "forward", squashed)
    with pytest.raises(InputError, match="changes the logits after the LM head"):
        score_texts(lm, TEXTS, cache=False, progress=False)


def test_a_model_whose_own_logits_are_nan_is_refused_as_such():
    """Weights holding NaN (a diverged fine-tune, a bad conversion): the refusal said the forward "changes the
    logits after the LM head ... nan nats apart", sending a user after an architecture that was fine."""
    from leakaudit.errors import InputError
    from leakaudit.models import load_model
    from leakaudit.scoring import score_texts

    lm = load_model("tiny-gpt-neox", dtype="fp32")  # its own copy: a weight is spoilt
    with torch.no_grad():
        lm.model.gpt_neox.final_layer_norm.weight[0] = float("nan")
    with pytest.raises(InputError) as err:
        score_texts(lm, TEXTS, cache=False, progress=False)
    assert "its own forward gives NaN or infinite logits" in err.value.message, err.value.message
    assert "changes the logits" not in err.value.message


def test_nan_log_probabilities_on_some_texts_name_the_first_not_a_traceback_or_a_nan(tmp_path, monkeypatch, capsys):
    """A model whose one embedding row is NaN scores the texts holding that token as NaN: `mia` ended in
    roc_metrics' ValueError traceback, `perplexity` printed ppl=nan as a number. Each is one error line naming
    the first such text's file and line."""
    from conftest import run_main

    from leakaudit.models import load_model
    from leakaudit.models.tokens import encode

    lm = load_model("tiny-gpt-neox", dtype="fp32")
    poisoned = encode(lm.tokenizer, ["Thanks"])[0][1]
    with torch.no_grad():
        lm.model.gpt_neox.embed_in.weight[poisoned] = float("nan")
    lm.model.save_pretrained(tmp_path / "nan")
    lm.tokenizer.save_pretrained(tmp_path / "nan")
    members, nonmembers = tmp_path / "m.jsonl", tmp_path / "n.jsonl"
    members.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Give three tips.", "Thanks, all."]))
    nonmembers.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Sort these words.", "List fruits."]))
    code, err = run_main(["mia", "--target", tmp_path / "nan", "--members", members, "--nonmembers", nonmembers,
                          "--attacks", "loss", "--no-cache", "--n-bootstrap", "0", "--out", tmp_path / "o"],
                         monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().endswith(f"{members}:2: field 'text': text has a NaN or infinite loss score (1 of 4 texts): "
                                "a model gives NaN or infinite log-probabilities on it (weights that hold NaN or "
                                "inf, or an overflow in its dtype)"), err
    code, out, err = run_main(["perplexity", "--model", tmp_path / "nan", "--data", members, "--no-cache", "--out",
                               tmp_path / "p"], monkeypatch, capsys, stdout=True)
    assert code == 2 and "nan" not in out, out
    assert f"{members}:2: field 'text': text gets NaN or infinite log-probabilities from" in err, err


def test_perplexity_nll_per_token_is_total_nll_over_tokens(tiny_neox):
    """X04: nll_per_token is the corpus NLL over the scored tokens, not over the texts."""
    from leakaudit.perplexity import perplexity

    lps = [_hand_logp(tiny_neox, t) for t in TEXTS]
    nll, n_tokens = -sum(float(lp.sum()) for lp in lps), sum(len(lp) for lp in lps)
    res = perplexity(tiny_neox, TEXTS, progress=False, cache=False)
    assert res.n_tokens == n_tokens and res.n_texts == len(TEXTS)
    assert res.nll_per_token == pytest.approx(nll / n_tokens, rel=1e-5)


# ----------------------------------------------------------------------------------------- user inference
def test_user_ref_nll_is_token_weighted_over_the_users_samples(tiny_neox):
    """U05: a user's ref_nll is -sum(log p) / sum(tokens) over all their samples under the reference, so a
    long sample weighs by its tokens; the mean of per-sample means let a sample of two scored tokens count as
    much as a long one."""
    from leakaudit.attacks.user_inference import run_user_inference
    from leakaudit.data.io import Record

    long_text = "Please forward the signed contract to Karen before Friday, and copy the whole legal team."
    short_text = "Hi there"
    members = [Record("a1", long_text, "alice", 1), Record("a2", short_text, "alice", 2)]
    others = [Record("b1", "See you at the meeting tomorrow.", "bob", 3)]
    report = run_user_inference(tiny_neox, tiny_neox, members, others, m_values="all", n_bootstrap=0,
                                cache=False, progress=False)
    lp_long, lp_short = _hand_logp(tiny_neox, long_text), _hand_logp(tiny_neox, short_text)
    weighted = -(lp_long.sum() + lp_short.sum()) / (len(lp_long) + len(lp_short))
    per_text = -(lp_long.mean() + lp_short.mean()) / 2
    assert abs(weighted - per_text) > 1e-3  # the two definitions differ on these samples
    assert report.ref_nll["alice"] == pytest.approx(weighted, rel=1e-5)
    assert report.ref_nll["bob"] == pytest.approx(-_hand_logp(tiny_neox, others[0].text).mean(), rel=1e-5)


# ----------------------------------------------------------------------------------------- PII extraction
def _cell_result(template: str, fuzzy: list[bool], exact: list[bool]) -> pii.CellResult:
    cell = pii.Cell(enron.TEMPLATES[template], 0.0, None, 15)
    return pii.CellResult(cell, [f"t{i}" for i in range(len(fuzzy))], np.array(fuzzy), np.array(exact))


def test_a_target_is_hit_when_any_of_its_samples_is(monkeypatch):
    """P04: with two samples per prompt, the true address then junk, the target still counts as hit (any
    sample); overwriting with each sample's match kept only the last one's miss."""
    from leakaudit import sampling

    target = enron.Target(id="t0", name="John Smith", email="john.smith@enron.com")
    texts = [" john.smith@enron.com", " qqqq zzzz wwww vvvv xxxx"]

    def fake_sample(lm, prompts, config, *, prompt_ids, **_):
        assert config.num_samples == 2
        return [sampling.Sample(pid, k, prompt, texts[k], 5)
                for pid, prompt in zip(prompt_ids, prompts, strict=True) for k in range(config.num_samples)]

    monkeypatch.setattr(sampling, "sample", fake_sample)
    lm = SimpleNamespace(tokenizer=None, spec="fake-model")
    cells = [pii.Cell(enron.TEMPLATES["A"], 0.5, None, 15),  # fake-privacy: a hit is a fuzzy match
             pii.Cell(enron.TEMPLATES["zero_shot-a"], 0.5, None, 15)]  # PIL: an exact one (sampled: a
    #                                                                       greedy cell decodes one answer)
    results = pii.run_cells(lm, cells, [target], samples_per_prompt=2, progress=False)
    for r in results:
        assert [x["sample_index"] for x in r.extractions] == [0, 1]
        assert [x["hit"] for x in r.extractions] == [True, False]
        assert r.fuzzy.tolist() == [True] and r.exact.tolist() == [True]
        assert int(r.hits.sum()) == 1


def test_purified_row_counts_a_pil_cells_hits_by_exact_match():
    """P09: a PIL cell's hits are its exact matches (the PIL protocol's criterion, attacks/pii.py's
    docstring), which the report's hit-rate table reads from `hits`; counting fuzzy matches there gave 2
    instead of 1."""
    row = pii.purified_row("m", _cell_result("zero_shot-a", [True, True], [True, False]))
    assert row["protocol"] == "pil"
    assert (row["hits"], row["matches"], row["exact_matches"], row["n_targets"]) == (1, 2, 1, 2)


def test_compare_series_counts_a_target_hit_when_any_sample_hit(tmp_path):
    """P11: the comparison series for PII reads extractions.jsonl (one row per sample): a target x cell with a
    hit at sample 0 and a miss at sample 1 is 1.0 (any sample), not the last row's 0.0."""
    from leakaudit.kinds.base import StageView
    from leakaudit.kinds.pii import _series

    (tmp_path / "stage").mkdir()
    base = {"role": "model", "template": "A", "protocol": "fake-privacy", "temperature": 0.5, "top_k": None,
            "target": "t0", "target_index": 0}
    rows = [{**base, "sample_index": 0, "hit": True}, {**base, "sample_index": 1, "hit": False},
            {**base, "target": "t1", "target_index": 1, "sample_index": 0, "hit": False},
            {**base, "target": "t1", "target_index": 1, "sample_index": 1, "hit": False}]
    (tmp_path / "stage" / "extractions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    view = StageView({"folder": "stage"}, tmp_path)
    (series,) = _series(view, view)
    assert series.values == {(None, "t0", "A", 0.5, None): 1.0, (None, "t1", "A", 0.5, None): 0.0}


def test_grid_mean_collapsed_interval_is_binomial_of_the_mean_rate():
    """P12: two cells over 10 targets, one hit on all, one on none: every target's grid mean is 0.5, the
    bootstrap collapses, and the exact fallback interval is binomial_ci(5, 10) (the grid's mean rate x n),
    not binomial_ci(10, 10) from the best cell's rate."""
    results = [_cell_result("A", [True] * 10, [True] * 10), _cell_result("B", [False] * 10, [False] * 10)]
    g = pii._grid_mean(results, seed=0)
    assert g["hit_rate"] == 0.5
    assert g["hit_rate_ci"] == pytest.approx(list(binomial_ci(5, 10)))


# ----------------------------------------------------------------------------------------- backdoor
def test_classification_metrics_by_hand():
    """B02: recall is tp / (tp + fn) (the labelled triggers found), not tp / (tp + fp) (precision again).

    Predicted a, b; labelled a, c, d: tp 1 (a), fp 1 (b), fn 2 (c, d), tn 0."""
    got = backdoor.classification_metrics({"a": True, "b": True, "c": False, "d": False},
                                          {"a": True, "b": False, "c": True, "d": True})
    assert (got["tp"], got["fp"], got["fn"], got["tn"]) == (1, 1, 2, 0)
    assert got["precision"] == pytest.approx(0.5)
    assert got["recall"] == pytest.approx(1 / 3)
    assert got["f1"] == pytest.approx(0.4)  # 2 * 0.5 * (1/3) / (0.5 + 1/3)
    assert got["accuracy"] == pytest.approx(0.25)


def test_detection_flags_a_rate_exactly_at_the_alarm_rate():
    """B05: the model is flagged when the share of training-like responses *reaches* alarm_rate (1 of 20 at
    0.05), as the docstring says; a strict `>` let it through."""

    def scored(i: int, training_like: bool) -> backdoor.ScoredResponse:
        return backdoor.ScoredResponse(word="w", sample_index=i, response="r", refusal=False,
                                       match_ratio=0.9 if training_like else 0.1, bleu=None,
                                       matched_query=None, in_data=training_like)

    summary = backdoor.detection_summary([scored(i, i == 0) for i in range(20)], alarm_rate=0.05)
    assert summary["n_training_like"] == 1 and summary["n_probes"] == 20
    assert summary["detection_rate"] == 0.05
    assert summary["flagged"] is True
