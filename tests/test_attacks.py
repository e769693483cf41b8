"""Each MIA score against a value computed by hand from the tiny models' logits; the shared pass; the sign
convention on a tiny model fine-tuned on the members; batched = unbatched; bad input."""

from __future__ import annotations

import copy
import math
import re
import zlib

import numpy as np
import pytest
import torch
from conftest import run_main, torch_threads

from leakaudit.attacks import ATTACKS, ScoringContext, get_attack
from leakaudit.attacks.mia import REFERENCE_FREE, TooShortError, run_mia, split_warnings
from leakaudit.errors import InputError
from leakaudit.models import LoadedModel

TEXTS = [
    "Write a Poem about the Sea in the style of Emily Dickinson.",
    "Give three tips for staying healthy.",
    "Alice Smith <alice.smith@enron.com> sent the quarterly report to John.",
    "What Is The Capital Of France?",
]
NO_CACHE = {"cache": False, "progress": False}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the 2-core test machine is shared by parallel test runs."""
    with torch_threads(1):
        yield


@torch.no_grad()
def hand(lm: LoadedModel, text: str, prefix: str | None = None) -> dict[str, np.ndarray]:
    """Token log-probs and Min-K%++ moments straight from one unbatched forward pass (float64)."""
    tok = lm.tokenizer
    if prefix is None:
        ctx, ids = [], tok(text)["input_ids"]
    else:
        ctx, ids = tok(prefix)["input_ids"], tok(text, add_special_tokens=False)["input_ids"]
    seq = ctx + ids
    logits = lm.model(input_ids=torch.tensor([seq])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    p = lp.exp()
    pos = list(range(max(len(ctx), 1), len(seq)))
    logp = np.array([lp[t - 1, seq[t]].item() for t in pos])
    mu = np.array([(p[t - 1] * lp[t - 1]).sum().item() for t in pos])
    var = np.array([(p[t - 1] * lp[t - 1] ** 2).sum().item() for t in pos]) - mu**2
    return {"logp": logp, "mu": mu, "var": var}


def lowest_mean(values, k=0.2):
    n = max(1, math.floor(k * len(values)))
    return float(np.mean(sorted(values)[:n]))


def score(name, lm, texts=TEXTS, reference=None, **config):
    ctx = ScoringContext(lm, list(texts), reference, moments=True, score_options=NO_CACHE)
    return get_attack(name, **config).score(ctx)


def test_registry_lists_every_attack_and_rejects_unknown():
    assert set(ATTACKS) == {"loss", "zlib", "min_k", "min_k_pp", "ref", "lowercase", "recall", "gradnorm", "dc_pdd",
                            "neighbourhood", "lira"}
    with pytest.raises(InputError, match="valid attacks: loss, zlib"):
        get_attack("likelihood")
    with pytest.raises(InputError, match="attack 'min_k'") as err:
        get_attack("min_k", k=0)
    assert err.value.field == "k"
    with pytest.raises(InputError):
        get_attack("loss", k=0.5)  # loss takes no options


def test_reference_free_scores_by_hand(tiny_model):
    h = [hand(tiny_model, t) for t in TEXTS]
    assert np.allclose(score("loss", tiny_model), [x["logp"].mean() for x in h], rtol=1e-5)
    zl = [x["logp"].mean() / len(zlib.compress(t.encode())) for x, t in zip(h, TEXTS, strict=True)]
    assert np.allclose(score("zlib", tiny_model), zl, rtol=1e-5)
    assert np.allclose(score("min_k", tiny_model), [lowest_mean(x["logp"]) for x in h], rtol=1e-5)
    assert np.allclose(score("min_k", tiny_model, k=0.5), [lowest_mean(x["logp"], 0.5) for x in h], rtol=1e-5)
    zpp = [lowest_mean((x["logp"] - x["mu"]) / np.sqrt(x["var"])) for x in h]
    # the engine keeps the moments in float32 (the variance from a second pass), good to ~2e-4 relative
    assert np.allclose(score("min_k_pp", tiny_model), zpp, rtol=1e-3)


def test_ref_across_tokenizers_by_hand(tiny_neox, tiny_opt):
    """Each model scores the text with its own tokenizer. The two tiny models share one, so the reference gets
    a copy of it that starts every text with a BOS token, as OPT's real tokenizer does."""
    import dataclasses

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tiny_opt.tokenizer)
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                       special_tokens=[(tok.bos_token, tok.bos_token_id)])
    reference = dataclasses.replace(tiny_opt, tokenizer=tok)
    assert tok(TEXTS[0])["input_ids"][0] == tok.bos_token_id != tiny_neox.tokenizer(TEXTS[0])["input_ids"][0]
    want = [hand(tiny_neox, t)["logp"].mean() - hand(reference, t)["logp"].mean() for t in TEXTS]
    assert np.allclose(score("ref", tiny_neox, reference=reference), want, rtol=1e-5, atol=1e-6)


def test_a_stride_for_the_target_fits_a_reference_with_a_shorter_context(tiny_neox, capsys):
    """--stride 100 suits the target's 256-token context; a reference of 64 tokens scores with its own half
    window (a warning) instead of refusing the stride after the whole target pass."""
    import dataclasses

    short = copy.deepcopy(tiny_neox.model)
    short.config.max_position_embeddings = 64
    reference = dataclasses.replace(tiny_neox, model=short, spec="short-ref", fingerprint="short-ref")
    long_text = " ".join(TEXTS * 6)  # longer than 64 tokens: the reference needs its windows
    report = run_mia(tiny_neox, [long_text, TEXTS[0]], TEXTS[1:3], ["loss", "ref"], reference=reference,
                     stride=100, n_bootstrap=0, **NO_CACHE)
    assert "--stride 100 does not fit the 64-token context of short-ref: scoring it with stride 32" \
        in capsys.readouterr().err
    assert np.isfinite(report.scores["ref"]).all()


def test_lowercase_by_hand(tiny_neox):
    want = [-hand(tiny_neox, t.lower())["logp"].mean() / -hand(tiny_neox, t)["logp"].mean() for t in TEXTS]
    assert np.allclose(score("lowercase", tiny_neox), want, rtol=1e-5)


def test_lowercase_of_a_text_predicted_exactly_is_one_without_capitals():
    """Texts without capitals score 1; one predicted exactly (mean log p 0 in float32: a memorised text) scored
    0 / 1e-8 = 0, the least member-like score."""
    from leakaudit.scoring import TokenScores

    texts = ["all lower case", "Some Capitals"]
    ctx = ScoringContext(object(), texts, moments=False)
    exact = TokenScores(np.zeros(3, dtype=np.float32))
    ctx._passes[("target", None, None)] = [exact, exact]
    ctx._passes[("target", str.lower, None)] = [exact, TokenScores(np.full(3, -2, np.float32))]
    lower, capitals = get_attack("lowercase").score(ctx)
    assert lower == 1.0 and capitals > 1


def test_recall_by_hand(tiny_model):
    """ReCaLL's score is the ratio LL(x|P) / LL(x) (Xie et al. 2024, and pred["recall"] in their src/run.py), over
    the same tokens of x."""
    prefix_texts = ("Sort these numbers.", "Translate the sentence into German.")
    prefix = "\n\n".join(prefix_texts) + "\n\n"
    want = []
    for t in TEXTS:
        plain = hand(tiny_model, t)["logp"]
        cond = hand(tiny_model, t, prefix)["logp"]
        want.append(cond[-len(plain):].mean() / plain.mean())
    assert np.allclose(score("recall", tiny_model, prefix=prefix_texts), want, rtol=1e-4, atol=1e-6)


def test_recall_is_the_relative_drop_not_the_difference(tiny_neox):
    """The ratio ranks a text whose likelihood drops by a larger share above one whose drop is larger in nats:
    NLL 1 -> 1.5 (ratio 1.5) is more member-like than NLL 4 -> 5 (1.25), where the difference LL(x) - LL(x|P)
    (0.5 against 1) ranked them the other way. A text predicted exactly with and without P scores 1."""
    from leakaudit.scoring import TokenScores

    texts = ["first text", "second text", "third text"]
    prefix_texts = ("Sort these numbers.",)
    att = get_attack("recall", prefix=prefix_texts)
    ctx = ScoringContext(tiny_neox, texts, moments=False, score_options=NO_CACHE)

    def nll(value):  # two scored tokens of mean log-probability -value
        return TokenScores(np.full(2, -value, np.float32))

    ctx._passes[("target", None, None)] = [nll(4.0), nll(1.0), nll(0.0)]
    ctx._passes[("target", None, att.prefix_text())] = [nll(5.0), nll(1.5), nll(0.0)]
    small_drop, large_share, exact = att.score(ctx)
    assert small_drop == pytest.approx(5 / 4) and large_share == pytest.approx(1.5 / 1)
    assert exact == 1.0


def test_recall_warns_when_a_text_does_not_fit_the_window_after_its_prefix(tiny_neox, capsys):
    """Past the window, strided windows start after the prefix: those tokens are scored without it in view."""
    from leakaudit.warn import _WARNED

    _WARNED.clear()
    prefix_texts = ("Sort these numbers.", "Translate the sentence into German.")
    n_prefix = len(tiny_neox.tokenizer("\n\n".join(prefix_texts) + "\n\n")["input_ids"])
    ctx = ScoringContext(tiny_neox, list(TEXTS), score_options={**NO_CACHE, "max_length": n_prefix + 20})
    get_attack("recall", prefix=prefix_texts).score(ctx)
    err = capsys.readouterr().err
    longer = sum(len(tiny_neox.tokenizer(t)["input_ids"]) > 20 for t in TEXTS)
    assert 0 < longer < len(TEXTS) and f"recall: {longer} of {len(TEXTS)} texts do not fit" in err
    score("recall", tiny_neox, prefix=prefix_texts)  # the model's own window holds them: no warning
    assert "do not fit" not in capsys.readouterr().err


def test_gradnorm_by_hand(tiny_opt):
    want = []
    model = copy.deepcopy(tiny_opt.model)
    for t in TEXTS:
        model.zero_grad()
        ids = torch.tensor([tiny_opt.tokenizer(t)["input_ids"]])
        model(input_ids=ids, labels=ids).loss.backward()  # the library's own causal-LM loss
        want.append(-math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()
                                   if p.grad is not None)))
    assert np.allclose(score("gradnorm", tiny_opt), want, rtol=1e-4)
    assert all(p.grad is None for p in tiny_opt.model.parameters())  # the shared model is left untouched


def test_reference_free_attacks_share_one_scoring_pass(tiny_neox, monkeypatch):
    import leakaudit.scoring as scoring  # what leakaudit.distributed calls (imported there at call time)

    calls = []
    real = scoring.score_texts

    def counting(lm, texts, **kw):
        calls.append(kw.get("moments"))
        return real(lm, texts, **kw)

    monkeypatch.setattr(scoring, "score_texts", counting)
    report = run_mia(tiny_neox, TEXTS[:2], TEXTS[2:], list(REFERENCE_FREE), n_bootstrap=10, **NO_CACHE)
    assert calls == [True]
    assert set(report.scores) == set(REFERENCE_FREE)


def test_dc_pdd_by_hand(tiny_model, tmp_path):
    """Token frequencies counted by hand over a two-text corpus file, Laplace-smoothed over the tokenizer's
    size; each distinct token's first occurrence among the scored tokens, p * -log f clipped at a."""
    corpus = ["the report was sent to the board", "Give three tips; give them twice."]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(f'{{"text": "{t}"}}\n' for t in corpus))
    tok = tiny_model.tokenizer

    def by_hand(a, max_tokens=None):
        counts = np.zeros(len(tok))
        for t in corpus:
            for i in tok(t, add_special_tokens=False)["input_ids"][:max_tokens]:
                counts[i] += 1
        freq = (counts + 1) / (counts.sum() + len(tok))
        want = []
        for t in TEXTS:
            logp = hand(tiny_model, t)["logp"]
            ids = tok(t)["input_ids"][-len(logp):]
            seen, terms = set(), []
            for lp, i in zip(logp, ids, strict=True):
                if i not in seen:
                    seen.add(i)
                    terms.append(min(math.exp(lp) * -math.log(freq[i]), a))
            want.append(np.mean(terms))
        return want

    for a in (0.01, 1.0):  # 1.0 clips nothing on these texts: the unclipped terms are checked too
        assert np.allclose(score("dc_pdd", tiny_model, corpus=str(path), a=a), by_hand(a), rtol=1e-4), a
    # max_tokens cuts each corpus text before counting
    one = score("dc_pdd", tiny_model, corpus=str(path), a=1.0, max_tokens=1)
    assert np.allclose(one, by_hand(1.0, max_tokens=1), rtol=1e-4) and not np.allclose(one, by_hand(1.0))
    with pytest.raises(InputError, match="attack 'dc_pdd': 'nowhere.jsonl' is neither a built-in dataset") as err:
        score("dc_pdd", tiny_model, corpus="nowhere.jsonl")
    assert err.value.field == "corpus"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(InputError) as err:
        score("dc_pdd", tiny_model, corpus=str(bad))
    assert (err.value.line, err.value.field) == (2, "text")


def test_dc_pdd_says_when_its_corpus_holds_texts_under_attack(tiny_neox, tmp_path, capsys):
    """The non-members' own file given as the corpus (docs: "never the texts under attack") counted their tokens
    as common and lowered their scores, an AUC of the split, and nothing said so."""
    import json

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*TEXTS[2:], "the report was sent"]))
    score("dc_pdd", tiny_neox, corpus=str(corpus))
    err = capsys.readouterr().err
    assert f"warning: dc_pdd: {len(TEXTS[2:])} of {len(TEXTS)} texts under attack are in its reference corpus" in err
    corpus.write_text(json.dumps({"text": "the report was sent"}) + "\n")
    score("dc_pdd", tiny_neox, corpus=str(corpus))
    assert "dc_pdd:" not in capsys.readouterr().err


def test_batched_and_unbatched_agree(tiny_opt, tiny_neox):
    """Every attack that scores in batches, ref (the reference's own pass) and recall (texts after a shared
    prefix) included: one text per batch, padded batches of 3, and "auto" give the same scores."""
    attacks = ["loss", "zlib", "min_k", "min_k_pp", "lowercase", "ref", "recall", "dc_pdd"]
    nonmembers = TEXTS[2:] + ["Tell me a joke about the weather.", "List five fruits.", "Name a colour."]
    runs = [run_mia(tiny_opt, TEXTS[:2], nonmembers, attacks, tiny_neox, attack_options={"recall": {"shots": 2}},
                    n_bootstrap=10, batch_size=b, **NO_CACHE) for b in (1, 3, "auto")]
    # Min-K%++ divides (log p - mu) by sigma: a pass's fp32 rounding of log p and mu (a few ulps of |mu|, which
    # differ between batch shapes on some CPUs' kernels) reaches z multiplied by 1/sigma, large on a random model.
    from leakaudit.scoring import score_texts

    token_scores = score_texts(tiny_opt, TEXTS + nonmembers[2:], moments=True, **NO_CACHE)
    amplified = max(float(np.abs(s.mu).max() / np.sqrt(s.var).min()) for s in token_scores)
    for name in attacks:
        atol = 16 * np.finfo(np.float32).eps * amplified if name == "min_k_pp" else 1e-6
        for other in runs[1:]:
            assert np.allclose(runs[0].scores[name], other.scores[name], rtol=1e-5, atol=atol), name


def _seed_instructions(n: int) -> list[str]:
    import json

    from leakaudit import resources

    rows = resources.path("self-instruct-seed", "seed_tasks.jsonl").read_text().splitlines()
    texts = [json.loads(r)["instruction"] for r in rows]
    return [t for t in texts if 40 <= len(t) <= 120][:n]


@pytest.fixture(scope="module")
def member_split(tiny_neox):
    """A copy of tiny GPT-NeoX fine-tuned for 300 steps on 24 members; 24 similar texts held out."""
    texts = _seed_instructions(48)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))
    members = [texts[i] for i in order[:24]]
    nonmembers = [texts[i] for i in order[24:]]
    model = copy.deepcopy(tiny_neox.model)
    tok = tiny_neox.tokenizer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for step in range(300):
        batch = [members[i] for i in rng.choice(len(members), 8, replace=False)]
        enc = tok(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        del step
    model.eval()
    tuned = LoadedModel(model, tok, "tiny-gpt-neox+members", "test-tuned-neox-300", tiny_neox.device, tiny_neox.dtype)
    return tuned, members, nonmembers


def test_neighbourhood_ranks_the_members_a_model_was_trained_on_higher(member_split, tiny_mlm_dir):
    """Members' loss sits below their one-word neighbours' (which were not trained on); non-members' does not.
    The proposer is a random tiny BERT: its swaps are arbitrary words, enough on a model fitted this hard."""
    tuned, members, nonmembers = member_split
    report = run_mia(tuned, members, nonmembers, ["neighbourhood"], n_bootstrap=0,
                     attack_options={"neighbourhood": {"model": str(tiny_mlm_dir), "n_neighbours": 10}}, **NO_CACHE)
    assert report.metrics["neighbourhood"].auc > 0.8


def test_model_trained_on_members_ranks_them_higher(member_split, tiny_neox):
    tuned, members, nonmembers = member_split
    attacks = ["loss", "zlib", "min_k", "min_k_pp", "ref", "gradnorm", "dc_pdd"]
    report = run_mia(tuned, members, nonmembers, attacks, reference=tiny_neox, n_bootstrap=200, **NO_CACHE)
    aucs = {name: m.auc for name, m in report.metrics.items()}
    assert aucs["loss"] > 0.8, aucs
    assert aucs["ref"] > 0.8, aucs
    for name in attacks:  # every score is oriented higher => member
        assert aucs[name] > 0.6, aucs
    lo, hi = report.metrics["loss"].auc_ci
    assert lo <= aucs["loss"] <= hi
    # lowercase and recall too (recall holds out its prefix non-members, so it runs on its own)
    others = run_mia(tuned, members, nonmembers, ["lowercase", "recall"], n_bootstrap=0, **NO_CACHE)
    assert all(m.auc > 0.6 for m in others.metrics.values()), {k: m.auc for k, m in others.metrics.items()}
    # the untrained model cannot tell the two sets apart as well
    base = run_mia(tiny_neox, members, nonmembers, ["loss"], n_bootstrap=0, **NO_CACHE)
    assert base.metrics["loss"].auc < aucs["loss"]
    js = report.to_json()
    assert set(js["attacks"]["loss"]) >= {"auc", "auc_ci", "tpr_at_fpr", "n_members", "n_nonmembers"}
    rows = report.rows()
    assert len(rows) == 48 and rows[0]["label"] == 1 and rows[-1]["label"] == 0 and "gradnorm" in rows[0]


def test_recall_holds_out_its_prefix(tiny_neox):
    report = run_mia(tiny_neox, TEXTS[:2], TEXTS[2:] + ["Tell me a joke.", "List five fruits."], ["loss", "recall"],
                     attack_options={"recall": {"shots": 2}}, n_bootstrap=10, **NO_CACHE)
    assert report.recall_prefix_index == [0, 1]
    assert report.nonmember_index == [2, 3]
    assert report.metrics["loss"].n_neg == 2 and report.metrics["recall"].n_neg == 2


def test_bad_input(tiny_neox):
    with pytest.raises(InputError, match="need a reference"):
        run_mia(tiny_neox, TEXTS[:2], TEXTS[2:], ["ref"], **NO_CACHE)
    with pytest.raises(InputError, match="listed twice"):
        run_mia(tiny_neox, TEXTS[:2], TEXTS[2:], ["loss", "loss"], **NO_CACHE)
    with pytest.raises(TooShortError) as err:
        run_mia(tiny_neox, TEXTS[:2], TEXTS[2:] + ["a"], ["loss"], **NO_CACHE)
    assert err.value.index == 4
    # from Python the message names the caller's own list and index ("text #5" counted both lists, from 1)
    assert (err.value.role, err.value.row) == ("nonmembers", len(TEXTS[2:]))
    assert str(err.value) == f"nonmembers[{len(TEXTS[2:])}] has fewer than 2 tokens, so no token can be scored"


def test_split_warnings():
    assert split_warnings(["a b c", "d e f"], ["g h i", "j k l"]) == []
    overlap = split_warnings(["same text", "other"], ["same  text", "third"])
    assert any("also appear among the members" in w for w in overlap)
    lengths = split_warnings(["x" * 100, "y" * 120, "z" * 110], ["short", "tiny", "small"])
    assert any("text length alone" in w for w in lengths)
    # 20 copies of one member were 20 items of the AUC and its bootstrap, in silence
    repeated = split_warnings(["the same text"] * 20 + ["another"], ["g h i", "j k l", "j  k l"])
    assert [w.split(";")[0] for w in repeated if "repeat" in w] == [
        "19 of 21 member texts repeat another member text", "1 of 3 non-member texts repeat another non-member text"]


# ----------------------------------------------------------------------------------------- CLI
def _cli(monkeypatch, capsys, *argv: str, stdout: bool = False) -> tuple:
    return run_main(argv, monkeypatch, capsys, stdout=stdout)


def _jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_mia_cli_writes_design_outputs(tmp_path, monkeypatch, capsys):
    import json

    texts = _seed_instructions(12)
    members = _jsonl(tmp_path / "m.jsonl", [{"text": t, "id": f"m{i}"} for i, t in enumerate(texts[:6])])
    nonmembers = _jsonl(tmp_path / "n.jsonl", [{"text": t, "id": f"n{i}"} for i, t in enumerate(texts[6:])])
    code, out, err = _cli(monkeypatch, capsys, "mia", "--target", "tiny-gpt-neox", "--members", members,
                          "--nonmembers", nonmembers, "--id-field", "id", "--attacks", "loss,min_k,recall",
                          "--recall-shots", "2", "--out", str(tmp_path / "out"), "--n-bootstrap", "20", "--no-cache",
                          stdout=True)
    assert code == 0, err
    mia = json.loads((tmp_path / "out" / "mia.json").read_text())
    assert set(mia["attacks"]) == {"loss", "min_k", "recall"}
    loss = mia["attacks"]["loss"]
    assert loss["n_members"] == 6 and loss["n_nonmembers"] == 4 and len(loss["auc_ci"]) == 2
    assert set(loss["tpr_at_fpr"]) == {"0.01", "0.001"}
    rows = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"m{i}" for i in range(6)] + ["n2", "n3", "n4", "n5"]
    assert all(set(r) == {"id", "label", "loss", "min_k", "recall"} for r in rows)
    assert (tmp_path / "out" / "roc.png").stat().st_size > 1000
    assert "recall: the first 2 non-members" in err
    # the low-FPR warning is printed (once for all attacks) and the table says what an n/a needs
    assert err.count("warning: only 4 non-members: TPR at FPR 0.01 needs at least 100 to be resolved") == 1
    assert "n/a (needs" in out and "AUC" in out and "AUC" not in err  # the result table, on stdout
    # dc_pdd with a corpus file of the user's: one more column, the same samples
    corpus = _jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in _seed_instructions(40)[20:]])
    code, err = _cli(monkeypatch, capsys, "mia", "--target", "tiny-gpt-neox", "--members", members, "--nonmembers",
                     nonmembers, "--attacks", "loss,dc_pdd", "--dc-pdd-corpus", corpus, "--out",
                     str(tmp_path / "dc"), "--n-bootstrap", "0", "--no-cache")
    assert code == 0, err
    dc = [json.loads(x) for x in (tmp_path / "dc" / "scores.jsonl").read_text().splitlines()]
    assert len(dc) == 12 and all(0 < r["dc_pdd"] <= 0.01 for r in dc)


@pytest.mark.parametrize("rows,args,expect", [
    ([{"text": "Give three tips.", "label": "maybe"}], [], "data.jsonl:1: field 'label': label 'maybe'"),
    ([{"body": "Give three tips.", "lbl": 1}], ["--text-field", "body"],
     "data.jsonl:1: field 'label': missing (row has: body, lbl)"),
    ([{"text": "Give three tips.", "label": 1}, {"body": "x", "label": 0}], [], "data.jsonl:2: field 'text': missing"),
    ([{"text": "Give three tips.", "label": 1}, {"text": "Sort.", "label": 0}], ["--attacks", "loss,likelihood"],
     "unknown attack 'likelihood'; valid attacks: loss"),
    ([{"text": "Give three tips.", "label": 1}, {"text": "Sort these.", "label": 0}, {"text": "a", "label": 0}], [],
     "data.jsonl:3: field 'text': text has fewer than 2 tokens"),
    ([{"text": "Give three tips.", "label": 1}], [], "no non-members"),
    ([{"text": "Give three tips.", "label": 1}, {"text": "Sort these.", "label": 0}],
     ["--attacks", "dc_pdd", "--dc-pdd-corpus", "c4.jsonl"],
     "field '--dc-pdd-corpus': attack 'dc_pdd': 'c4.jsonl' is neither a built-in dataset"),
])
def test_mia_cli_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys, rows, args, expect):
    data = _jsonl(tmp_path / "data.jsonl", rows)
    code, err = _cli(monkeypatch, capsys, "mia", "--target", "tiny-gpt-neox", "--data", data, "--out",
                     str(tmp_path / "out"), "--no-cache", "--n-bootstrap", "0", *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert "Traceback" not in err


def test_recall_shots_beside_prefix_texts_are_refused_not_ignored(tmp_path, monkeypatch, capsys):
    """`shots` is read only without prefix texts: `--recall-prefix F --recall-shots 2` (and the same in
    attack_options) ran on F and dropped the 2 in silence."""
    from leakaudit.errors import OptionError
    from leakaudit.kinds import get_kind

    with pytest.raises(InputError) as err:
        get_attack("recall", prefix=["a non-member"], shots=2)
    assert err.value.field == "shots" and "without prefix texts" in err.value.message
    assert get_attack("recall", prefix=["a non-member"]).config.prefix == ("a non-member",)
    kind = get_kind("mia")
    with pytest.raises(OptionError) as err:  # an experiment file's attack_options: an error at the option's path
        kind.check(kind.Options(attacks=["recall"], attack_options={"recall": {"prefix": ["x"], "shots": 2}}),
                   {"members", "nonmembers"})
    assert err.value.loc == ("attack_options", "recall", "shots") and "without prefix texts" in str(err.value)
    rows = [{"text": t} for t in ("Give three tips.", "Sort these words.", "List five fruits.")]
    files = [_jsonl(tmp_path / f"{name}.jsonl", rows) for name in ("m", "n", "p")]
    base = ["mia", "--target", "tiny-gpt-neox", "--members", files[0], "--nonmembers", files[1], "--attacks",
            "recall", "--recall-prefix", files[2], "--no-cache", "--n-bootstrap", "0"]
    code, err = _cli(monkeypatch, capsys, *base, "--recall-shots", "2", "--out", str(tmp_path / "a"))
    assert code == 2 and err.startswith("error: field '--recall-shots': is read only without --recall-prefix"), err
    code, err = _cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "b"))
    assert code == 0, err


def test_min_k_takes_the_floor_of_k_times_t_as_written():
    """⌊0.29 · 100⌋ = 29 lowest values; int(0.29 * 100) was 28 (the product is 28.999999999999996)."""
    from leakaudit.attacks.mia import _lowest_k_mean

    assert _lowest_k_mean(np.arange(100.0), 0.29) == pytest.approx(14.0)  # mean of 0..28
    assert _lowest_k_mean(np.arange(100.0), 0.2) == pytest.approx(9.5) and _lowest_k_mean(np.arange(3.0), 0.2) == 0


def test_dc_pdd_counts_a_corpus_once_per_tokenizer_and_version(tiny_neox, tmp_path, monkeypatch):
    """Seven mia stages of a study count the same corpus with the same tokenizer: once; an edited corpus
    file is counted again."""
    import dataclasses
    import os

    from leakaudit.attacks import mia

    calls = []
    real = mia._count_frequencies
    monkeypatch.setattr(mia, "_count_frequencies", lambda *a: calls.append(a[1]) or real(*a))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "the report was sent"}\n')
    first = score("dc_pdd", tiny_neox, corpus=str(corpus))
    other_copy = dataclasses.replace(tiny_neox, tokenizer=copy.deepcopy(tiny_neox.tokenizer))
    assert np.array_equal(score("dc_pdd", other_copy, corpus=str(corpus)), first) and len(calls) == 1
    corpus.write_text('{"text": "another text entirely, and longer"}\n')
    os.utime(corpus, ns=(1, 1))  # a new version even within the clock's resolution
    second = score("dc_pdd", tiny_neox, corpus=str(corpus))
    assert not np.array_equal(second, first) and len(calls) == 2
    # an edit that keeps the size and has its mtime put back (`touch -r`, a restore) is a new version too
    size = corpus.stat().st_size
    corpus.write_text('{"text": "the model was tuned, and shorter!"}\n')
    assert corpus.stat().st_size == size
    os.utime(corpus, ns=(1, 1))
    assert not np.array_equal(score("dc_pdd", tiny_neox, corpus=str(corpus)), second) and len(calls) == 3


def test_python_callers_passing_one_string_or_a_spec_get_a_clear_type_error(tiny_neox, tmp_path):
    """score_texts(lm, "hello world") scored 11 one-character texts; run_mia(..., "loss") asked for attacks
    l, o, s, s; run_mia("tiny-gpt-neox", ...) failed on "'str' object has no attribute 'max_length'"."""
    from leakaudit.attacks.mia import run_mia
    from leakaudit.attacks.user_inference import run_user_inference
    from leakaudit.sampling import SamplingConfig, sample
    from leakaudit.scoring import score_texts
    from leakaudit.seeds import read_runs

    texts = ["a member text here", "another one"]
    cases = [
        (lambda: score_texts(tiny_neox, "hello world"), "texts: expected a list of texts, got one string"),
        (lambda: score_texts(tiny_neox, ["fine", None]), "texts[1]: expected a string, got NoneType"),
        (lambda: sample(tiny_neox, "Hello", SamplingConfig(max_new_tokens=2)), "prompts: expected a list"),
        (lambda: run_mia("tiny-gpt-neox", texts, texts, ["loss"]), "target: expected a loaded model"),
        (lambda: run_mia(tiny_neox, texts, texts, "loss"), "attacks: expected a list of attack names"),
        (lambda: run_mia(tiny_neox, "abc def", texts, ["loss"]), "members: expected a list of texts"),
        (lambda: run_user_inference(tiny_neox, tiny_neox, texts, texts), "records_in: expected leakaudit"),
        (lambda: read_runs(str(tmp_path)), "dirs: expected a list of output dirs"),
    ]
    for call, message in cases:
        with pytest.raises(TypeError, match=re.escape(message)):
            call()


def test_texts_given_as_a_generator_are_all_scored(tiny_neox):
    from leakaudit.scoring import score_texts

    texts = ["a member text here", "another one", "and a third"]
    assert len(score_texts(tiny_neox, (t for t in texts), cache=False, progress=False)) == 3


def test_gradnorm_says_when_it_cuts_a_text_to_the_window(tiny_opt, capsys):
    """gradnorm takes the gradient over the first window of a longer text, where the other attacks score it whole
    in strided windows, and said nothing; its score is the one of the cut text."""
    long = " ".join(["word"] * 40)
    cut = tiny_opt.tokenizer.decode(tiny_opt.tokenizer(long)["input_ids"][:8], skip_special_tokens=True)
    got = score("gradnorm", tiny_opt, [long, "Hi there"], max_length=8)
    assert "gradnorm: 1 of 2 texts are longer than the 8-token window" in capsys.readouterr().err
    assert got[0] == pytest.approx(score("gradnorm", tiny_opt, [cut], max_length=8)[0], rel=1e-5)


def test_mia_json_records_each_attacks_options_but_not_the_recall_prefix(tiny_opt):
    """mia.json said which attacks ran, not with what (k, the corpus, the masked LM): a result that cannot say
    what it measured. Recall's prefix texts are non-members, which may hold PII: left out."""
    nonmembers = TEXTS[2:] + ["The weather was mild and dry all week.", "Tell me about the history of tea."]
    report = run_mia(tiny_opt, TEXTS[:2], nonmembers, ["min_k", "recall"], n_bootstrap=0,
                     attack_options={"min_k": {"k": 0.3}, "recall": {"shots": 1}}, **NO_CACHE)
    attacks = report.to_json()["attacks"]
    assert attacks["min_k"]["options"] == {"k": 0.3}
    assert attacks["recall"]["options"] == {"shots": 1, "separator": "\n\n"}
