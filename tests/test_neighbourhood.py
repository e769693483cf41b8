"""The neighbourhood attack: its neighbours (one whole word swapped, in the text's case, seeded), its score
against NLLs computed by hand, batched = unbatched, and the errors of a missing or wrong masked LM."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import run_main, torch_threads
from test_attacks import hand

from leakaudit.attacks import ScoringContext, get_attack
from leakaudit.attacks.mia import run_mia
from leakaudit.attacks.neighbourhood import load_masked_lm, neighbours
from leakaudit.errors import InputError

TEXTS = ["Alice Smith sent the quarterly report to John on Monday.",
         "Give three tips for staying healthy and happy.",
         "What is the capital of France?"]
NO_CACHE = {"cache": False, "progress": False}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


def test_each_neighbour_swaps_one_word_or_piece_in_the_words_case(mlm):
    for text in TEXTS:
        got = neighbours(mlm, text, n=8)
        assert 0 < len(got) <= 8 and len(set(got)) == len(got) and text not in got
        for new in got:
            a, b = _words(text), _words(new)
            assert len(a) == len(b), (text, new)
            diff = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
            assert len(diff) == 1, (text, new)
            old, swapped = diff[0]
            assert swapped.lower() != old.lower() and swapped[:1].isupper() == old[:1].isupper(), diff
    assert neighbours(mlm, TEXTS[0], n=8) == neighbours(mlm, TEXTS[0], n=8)  # seeded
    assert neighbours(mlm, TEXTS[0], n=8, seed=1) != neighbours(mlm, TEXTS[0], n=8)
    # the positions a batch holds do not change what is proposed
    assert neighbours(mlm, TEXTS[0], n=8, batch_size=1) == neighbours(mlm, TEXTS[0], n=8, batch_size=64)
    assert neighbours(mlm, "!!! ...") == []  # no word to swap


def test_score_is_the_mean_neighbour_nll_minus_the_texts_by_hand(tiny_opt, mlm, tiny_mlm_dir):
    """neighbourhood = mean_j NLL(x̃_j) − NLL(x), each NLL from one unbatched float64 pass."""
    ctx = ScoringContext(tiny_opt, TEXTS, score_options=NO_CACHE)
    got = get_attack("neighbourhood", model=str(tiny_mlm_dir), n_neighbours=5).score(ctx)
    want = []
    for text in TEXTS:
        nll = [-hand(tiny_opt, t)["logp"].mean() for t in neighbours(mlm, text, n=5)]
        want.append(np.mean(nll) + hand(tiny_opt, text)["logp"].mean())
    assert np.allclose(got, want, rtol=1e-4, atol=1e-5), (got, want)
    one = ScoringContext(tiny_opt, TEXTS, score_options={**NO_CACHE, "batch_size": 1})
    assert np.allclose(get_attack("neighbourhood", model=str(tiny_mlm_dir), n_neighbours=5).score(one), got,
                       rtol=1e-4, atol=1e-5)


def test_a_missing_or_causal_masked_lm_is_one_clear_error(tmp_path, tiny_mlm_dir):
    with pytest.raises(InputError, match="needs a masked language model") as err:
        get_attack("neighbourhood")
    assert err.value.field == "model"
    with pytest.raises(InputError, match="is not a masked language model"):
        get_attack("neighbourhood", model="tiny-gpt-neox")
    with pytest.raises(InputError, match="path not found"):
        get_attack("neighbourhood", model=str(tmp_path / "nothing-here"))
    with pytest.raises(InputError, match="is not a masked language model \\(an untrained causal model\\)"):
        get_attack("neighbourhood", model="random:pythia-160m")
    with pytest.raises(InputError, match="greater than or equal to 1"):
        get_attack("neighbourhood", model=str(tiny_mlm_dir), n_neighbours=0)


def test_a_text_without_a_word_to_swap_is_named(tiny_opt, tiny_mlm_dir):
    with pytest.raises(InputError) as err:
        run_mia(tiny_opt, TEXTS[:2], [TEXTS[2], "!!! ... ???"], ["neighbourhood"],
                attack_options={"neighbourhood": {"model": str(tiny_mlm_dir)}}, n_bootstrap=0, **NO_CACHE)
    assert str(err.value).startswith("nonmembers[1] has no word the masked LM can swap"), err.value


def _as_rank_one_of_two(monkeypatch, ctx, rank_zero_flags: dict[int, float]) -> list[list[float]]:
    """Score as process 1 of 2 (the shared pass computed first, as one process): each gather returns this
    process's values at its texts and `rank_zero_flags` (else 0) at rank 0's; the gathers' inputs are recorded."""
    import leakaudit.distributed as dist

    assert ctx.target_scores
    gathered: list[list[float]] = []

    def gather(local, n):
        gathered.append(list(local))
        out = np.zeros(n)
        out[1::2] = local
        for i, v in rank_zero_flags.items():
            out[i] = v
        return out

    monkeypatch.setattr(dist, "gather_floats", gather)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    return gathered


def test_under_a_launcher_every_process_raises_the_same_no_neighbour_error(tiny_opt, tiny_mlm_dir, monkeypatch):
    """A text without a neighbour in one process's shard: that process raised while the others waited in the
    gather (left to the launcher's kill). Every process now checks every text before proposing, and a text
    the masked LM proposed nothing for is agreed on in a gather before the neighbours are scored."""
    from leakaudit.attacks import neighbourhood
    from leakaudit.attacks.neighbourhood import NoNeighbourError

    attack = get_attack("neighbourhood", model=str(tiny_mlm_dir), n_neighbours=3)
    ctx = ScoringContext(tiny_opt, ["!!! ... ???", *TEXTS[:2]], score_options=NO_CACHE)
    gathered = _as_rank_one_of_two(monkeypatch, ctx, {})
    with pytest.raises(NoNeighbourError) as err:  # rank 0's text 0: found by process 1 too, before proposing
        attack.score(ctx)
    assert err.value.index == 0 and gathered == []
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")

    ctx = ScoringContext(tiny_opt, TEXTS, score_options=NO_CACHE)
    gathered = _as_rank_one_of_two(monkeypatch, ctx, {0: 1.0})  # rank 0 proposed nothing for text 0
    real = neighbourhood.neighbours
    monkeypatch.setattr(neighbourhood, "neighbours", lambda mlm, text, **kw: [] if text == TEXTS[0]
                        else real(mlm, text, **kw))
    with pytest.raises(NoNeighbourError) as err:
        attack.score(ctx)
    assert err.value.index == 0 and gathered == [[0.0]]  # its own text 1 had neighbours; no score was gathered


def test_cli_takes_the_masked_lm_and_refuses_its_flags_without_the_attack(tmp_path, monkeypatch, capsys,
                                                                          tiny_mlm_dir):
    import json

    members, nonmembers = tmp_path / "m.jsonl", tmp_path / "n.jsonl"
    members.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:2]))
    nonmembers.write_text("".join(json.dumps({"text": t}) + "\n" for t in [TEXTS[2], "The cat sat on the mat."]))
    base = ["mia", "--model", "tiny-opt", "--members", str(members), "--nonmembers", str(nonmembers),
            "--n-bootstrap", "0", "--no-cache"]
    code, err = run_main([*base, "--out", str(tmp_path / "a"), "--attacks", "loss,neighbourhood"], monkeypatch,
                         capsys)
    assert code == 2 and err.startswith("error: field '--neighbour-model': ") and "needs a masked" in err, err
    code, err = run_main([*base, "--out", str(tmp_path / "b"), "--neighbour-model", str(tiny_mlm_dir)],
                         monkeypatch, capsys)
    assert code == 2 and "field '--neighbour-model': no attack that runs takes it" in err, err
    code, err = run_main([*base, "--out", str(tmp_path / "b"), "--neighbours", "4"], monkeypatch, capsys)
    assert code == 2 and "field '--neighbours': no attack that runs takes it" in err, err
    code, err = run_main([*base, "--out", str(tiny_mlm_dir / "out"), "--attacks", "neighbourhood",
                          "--neighbour-model", str(tiny_mlm_dir)], monkeypatch, capsys)
    assert code == 2 and "inside the --neighbour-model directory" in err, err
    code, err = run_main([*base, "--out", str(tmp_path / "c"), "--attacks", "loss,neighbourhood",
                          "--neighbour-model", str(tiny_mlm_dir), "--neighbours", "4"], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "c" / "mia.json").read_text())
    assert set(res["attacks"]) == {"loss", "neighbourhood"}
    options = res["attacks"]["neighbourhood"]["options"]
    assert options["n_neighbours"] == 4 and options["model"] == str(tiny_mlm_dir), options
    rows = [json.loads(x) for x in (tmp_path / "c" / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(np.isfinite(r["neighbourhood"]) for r in rows)


def test_user_inference_has_no_neighbourhood_flags(tmp_path, monkeypatch, capsys, tiny_mlm_dir):
    """user-inference runs no attack of `--attacks`: its --neighbour-model and --neighbours were accepted and
    read by nothing (a flag that does nothing is refused, as mia refuses them without the attack)."""
    for flag, value in (("--neighbour-model", str(tiny_mlm_dir)), ("--neighbours", "4")):
        code, err = run_main(["user-inference", "--target", "tiny-opt", "--reference", "tiny-opt", "--data",
                              str(tmp_path / "missing.jsonl"), "--user-field", "user", "--out", str(tmp_path / "o"),
                              flag, value], monkeypatch, capsys)
        assert code == 2 and "no such option" in err.lower() and flag in err, err


def test_an_experiment_names_the_missing_masked_lm_and_runs_with_one(tmp_path, tiny_mlm_dir):
    """The experiment file's route: the option's key path in the error, and the masked LM's folder in the
    stage's key (an edited proposer reruns the stage, as an edited dc_pdd corpus does)."""
    from leakaudit.config import parse_experiment
    from leakaudit.experiment import Plan, run_experiment
    from leakaudit.experiment.checks import check_plan

    def study(options: str) -> str:
        return ("name: nb\nmodels: {base: tiny-opt}\ndatasets:\n  d: {builtin: enron-synthetic, limit: 8, "
                "max_chars: 120, split: {members: 0.5, nonmembers: 0.5}}\nevaluate:\n  m:\n    kind: mia\n"
                f"    targets: [base]\n    members: d.members\n    nonmembers: d.nonmembers\n    options: {options}\n")

    bad = study("{attacks: [loss, neighbourhood], n_bootstrap: 0}")
    with pytest.raises(InputError) as err:
        check_plan(Plan(parse_experiment(bad, tmp_path / "bad.yaml")), (tmp_path / "out", None))
    assert "attack_options.neighbourhood.model" in err.value.format() and "needs a masked" in err.value.format()
    good = study("{attacks: [loss, neighbourhood], n_bootstrap: 0, attack_options: {neighbourhood: "
                 f"{{model: '{tiny_mlm_dir}', n_neighbours: 3}}}}}}")
    plan = Plan(parse_experiment(good, tmp_path / "good.yaml"))
    key = plan.stages["evaluate/m/base"].key
    run_experiment(parse_experiment(good, tmp_path / "good.yaml"), tmp_path / "out", log=lambda m: None,
                   report=False)
    import json

    res = json.loads((tmp_path / "out" / "evaluate/m/base/mia.json").read_text())
    assert set(res["attacks"]) == {"loss", "neighbourhood"}
    (tiny_mlm_dir / "config.json").write_text((tiny_mlm_dir / "config.json").read_text() + "\n")
    try:
        assert Plan(parse_experiment(good, tmp_path / "good.yaml")).stages["evaluate/m/base"].key != key
    finally:
        (tiny_mlm_dir / "config.json").write_text((tiny_mlm_dir / "config.json").read_text()[:-1])


def test_a_text_longer_than_the_masked_lms_positions_is_swapped_in_its_first_tokens(tiny_opt, tiny_mlm_dir,
                                                                                     mlm, capsys):
    """A text past the masked LM's 256 positions failed inside BERT ("expanded size of the tensor"): only its
    first tokens are swapped now, with a warning; its loss is the whole text's."""
    long = "Alice Smith sent the quarterly report to John on Monday. " * 30
    got = neighbours(mlm, long, n=5)
    assert len(got) == 5 and all(g[-200:] == long[-200:] for g in got)
    ctx = ScoringContext(tiny_opt, [long, TEXTS[0]], score_options=NO_CACHE)
    scores = get_attack("neighbourhood", model=str(tiny_mlm_dir), n_neighbours=3).score(ctx)
    assert np.isfinite(scores).all()
    assert "neighbourhood: 1 of 2 texts are longer than the masked LM's 254-token window" in capsys.readouterr().err


def test_a_masked_lm_folder_that_cannot_load_is_one_line_naming_it(tmp_path, tiny_mlm_dir):
    import shutil

    broken = tmp_path / "mlm"
    shutil.copytree(tiny_mlm_dir, broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(InputError) as err:
        get_attack("neighbourhood", model=str(broken))
    assert err.value.field == "model" and str(broken) in err.value.message and "\n" not in err.value.format()


def test_the_output_layer_at_the_swapped_position_alone_proposes_what_the_full_one_does(mlm, monkeypatch):
    """`_head_at` gives the masked LM's output layer one row's hidden state at its position, not all of them."""
    from contextlib import nullcontext

    from leakaudit.attacks import neighbourhood

    fast = [neighbours(mlm, t, n=10) for t in TEXTS]
    monkeypatch.setattr(neighbourhood, "_head_at", lambda *a: nullcontext())
    assert [neighbours(mlm, t, n=10) for t in TEXTS] == fast


def test_a_piece_of_an_all_caps_word_is_swapped_in_capitals(mlm):
    """A swap at one piece of "DUE" ("DU|E") took the piece's own case: "E" alone is not all caps, so the swap
    came out "DUAmes", and one at "D" came out "SomeUE"."""
    text = "THE QUARTERLY REPORT IS DUE, SAID ALICE."
    got = neighbours(mlm, text, n=40)
    assert len(got) == 40
    for new in got:
        swapped = [y for x, y in zip(_words(text), _words(new), strict=True) if x != y]
        assert len(swapped) == 1 and swapped[0] == swapped[0].upper(), (text, new)


def test_an_encoder_decoder_masked_lm_is_refused_before_it_runs(tmp_path, monkeypatch):
    """transformers maps BART to a masked LM, but its logits need decoder inputs: it passed the checks and failed
    in its forward pass with a traceback, after the target had scored (a hub id is refused once loaded)."""
    from transformers import BartConfig, BartForConditionalGeneration

    from leakaudit.models import spec
    from leakaudit.models.factories import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    BartForConditionalGeneration(BartConfig(vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                               decoder_ffn_dim=32, max_position_embeddings=64)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(InputError, match="'bart' is an encoder-decoder model") as err:
        get_attack("neighbourhood", model=str(tmp_path))
    assert err.value.field == "model"
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["is_encoder_decoder"]  # a hand-written config: BART's own default says encoder-decoder
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="'bart' is an encoder-decoder model"):
        get_attack("neighbourhood", model=str(tmp_path))
    monkeypatch.setattr(spec, "check_model_dir", lambda *a, **k: None)  # as a hub id goes unchecked
    with pytest.raises(InputError, match="'bart' is an encoder-decoder model"):
        load_masked_lm(str(tmp_path), torch.device("cpu"))


def test_counting_the_texts_past_the_window_does_not_warn_of_indexing_errors(tiny_opt, tiny_mlm_dir, mlm,
                                                                             monkeypatch, caplog):
    """The count behind the window's warning tokenised each text whole, and transformers warned that running a
    text past the tokenizer's limit (BERT's 512) "will result in indexing errors"; only its window is run."""
    monkeypatch.setattr(mlm.tokenizer, "model_max_length", 300)
    monkeypatch.setattr(mlm.tokenizer, "deprecation_warnings", {})
    ctx = ScoringContext(tiny_opt, ["Alice Smith sent the quarterly report to John on Monday. " * 30, TEXTS[0]],
                         score_options=NO_CACHE)
    assert np.isfinite(get_attack("neighbourhood", model=str(tiny_mlm_dir), n_neighbours=2,
                                     max_length=32).score(ctx)).all()
    assert "indexing errors" not in caplog.text


def test_a_character_split_into_bytes_is_not_swapped(mlm):
    """A character the byte-level vocabulary lacks is several tokens with the same offsets ("鬱": three bytes):
    a swap at one byte replaced the whole character, several tokens for the masked LM's guess at one."""
    for text, char in [("He felt 鬱 today", "鬱"), ("Łódź is big", "Ł")]:
        got = neighbours(mlm, text, n=60)
        assert got and all(char in new for new in got), (text, [new for new in got if char not in new])


@pytest.fixture(scope="module")
def sentencepiece_mlm(tmp_path_factory):
    """A tiny XLM-R masked LM (random, seeded) with a SentencePiece-style tokenizer (Unigram, "▁" marks, a
    Metaspace pre-tokenizer) over a hand-made vocabulary: no "▁東", so "東京" at a text's start is "▁", "東", "京"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaForMaskedLM

    words = ["▁is", "▁big", "▁the", "▁cat", "▁dog", "▁city", "▁old", "▁new"]
    pieces = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "▁", "東", "京", "大", "阪", "x", "y", *words]
    tok = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=3))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")
    torch.manual_seed(0)
    model = XLMRobertaForMaskedLM(XLMRobertaConfig(vocab_size=len(pieces), hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32,
                                                   max_position_embeddings=34, pad_token_id=1))
    out = tmp_path_factory.mktemp("tiny-sp-mlm")
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return load_masked_lm(str(out), torch.device("cpu"))


def test_sentencepieces_bare_mark_before_a_texts_first_character_is_not_swapped(sentencepiece_mlm):
    """SentencePiece's bare "▁" before a first character it has no "▁" piece for carries that character's
    offsets: a word swapped there replaced "東" ("the京 is big"), a piece of a word for a word. "東" itself, a
    piece, is still swapped for pieces."""
    text = "東京 is big"
    pieces = sentencepiece_mlm.tokenizer.convert_ids_to_tokens(sentencepiece_mlm.tokenizer(text)["input_ids"])
    assert pieces[1:4] == ["▁", "東", "京"], pieces
    got = neighbours(sentencepiece_mlm, text, n=100)
    first = {new[:-len(text) + 1] for new in got if new.endswith(text[1:]) and not new.startswith("東")}
    assert first and first <= {"京", "大", "阪", "x", "y"}, first


def test_a_word_after_a_space_is_swapped_not_only_the_first_word_and_pieces(mlm):
    """A byte-level token "Ġsent" has the space in its offsets (" sent"): without the space left out it was no
    word, and only the text's first token and the pieces inside words were ever swapped."""
    from leakaudit.attacks.neighbourhood import _swappable_span

    assert _swappable_span(" sent", 0, 5) == (1, 5) and _swappable_span("sent  ", 0, 6) == (0, 4)
    assert _swappable_span(" Monday.", 0, 8) is None and _swappable_span("   ", 0, 3) is None  # not a word
    text = "Alice Smith sent the report"
    swapped = {x for new in neighbours(mlm, text, n=1000)
               for x, y in zip(_words(text), _words(new), strict=True) if x != y}
    assert {"Smith", "sent", "the"} <= swapped, swapped


def test_each_swap_is_scored_p_swap_over_one_minus_p_word_best_first(mlm):
    """_swaps at one token, on a hand-made distribution: p(w) / (1 - p(original)), per_position kept, the
    original, its case-only variant, a special token and a token of another kind (a piece for a word) left out
    even where they are likelier."""
    from leakaudit.attacks.neighbourhood import _swaps

    tok = mlm.tokenizer
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("Ġthe", "ĠThe", "Ġa", "Ġsent", "ĠSmith", "ing", "U", "ice")}
    special = set(tok.all_special_ids)
    text = "Alice Smith sent the report"
    probs = torch.zeros(len(tok))
    for w, p in (("Ġthe", 0.5), ("ĠThe", 0.3), ("ing", 0.15), ("Ġa", 0.1), ("Ġsent", 0.05), ("ĠSmith", 0.02)):
        probs[ids[w]] = p
    probs[next(iter(special))] = 0.2
    got = _swaps(tok, text, (17, 20), ids["Ġthe"], probs, 2, special, 7)
    assert [(round(s.score, 6), s.position, s.apply(text)) for s in got] == [
        (0.2, 7, "Alice Smith sent a report"), (0.1, 7, "Alice Smith sent sent report")], got
    assert [s[2:] for s in got] == [(17, 20, "a"), (17, 20, "sent")]  # spans of the text, not new texts
    # a piece of an all-caps word at the text's second character: the whole word "DU" is upper case
    probs = torch.zeros(len(tok))
    probs[ids["U"]], probs[ids["ice"]] = 0.5, 0.25
    got = _swaps(tok, "DU is", (1, 2), ids["U"], probs, 1, special, 1)
    assert [(s.score, s.position, s.apply("DU is")) for s in got] == [(0.5, 1, "DICE is")]


def test_the_neighbours_are_the_best_scored_over_all_tokens_ties_to_the_earlier(mlm, monkeypatch):
    from leakaudit.attacks import neighbourhood

    monkeypatch.setattr(neighbourhood, "_swaps", lambda tok, text, span, original, probs, per_position, special,
                        position: [neighbourhood.Swap(0.5 if position % 2 else 0.9, position, len(text), len(text),
                                                      f" #{position}")])
    got = [int(t.rsplit("#", 1)[1]) for t in neighbours(mlm, TEXTS[0], n=1000)]
    assert got == sorted(got, key=lambda p: (p % 2, p)) and len(got) > 4, got
    assert [int(t.rsplit("#", 1)[1]) for t in neighbours(mlm, TEXTS[0], n=3)] == got[:3]


def test_the_swapped_tokens_embedding_gets_dropout_and_no_other(mlm, monkeypatch):
    """The paper's proposal: the word stays in view, its embedding's entries dropped with p `dropout` and the
    rest scaled by 1 / (1 - dropout); every other token's embedding as it is."""
    from leakaudit.attacks.neighbourhood import _swappable_tokens

    seen = []
    handle = mlm.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["inputs_embeds"].clone()),
                                                 with_kwargs=True)
    try:
        neighbours(mlm, TEXTS[0], n=5, dropout=0.7)
    finally:
        handle.remove()
    ids, spans = _swappable_tokens(mlm, TEXTS[0], 512)
    with torch.no_grad():
        base = mlm.model.get_input_embeddings()(torch.tensor([ids]))[0]
    rows = torch.cat(seen)
    assert rows.shape[0] == len(spans)
    dropped = []
    for row, p in zip(rows, spans, strict=True):
        others = [i for i in range(len(ids)) if i != p]
        assert torch.equal(row[others], base[others])
        ratio = row[p] / base[p]
        dropped.append(float((ratio == 0).float().mean()))
        assert torch.allclose(ratio[ratio != 0], torch.tensor(1 / 0.3), rtol=1e-5)
    assert 0.6 < np.mean(dropped) < 0.8, np.mean(dropped)


def test_the_output_layer_gets_one_hidden_state_per_row(mlm):
    """`_head_at` is what spares the output layer's work: it sees (rows, hidden), not (rows, tokens, hidden)."""
    shapes = []
    handle = mlm.model.get_output_embeddings().register_forward_hook(lambda m, a, o: shapes.append(a[0].dim()))
    try:
        neighbours(mlm, TEXTS[1], n=3)
    finally:
        handle.remove()
    assert shapes and set(shapes) == {2}, shapes


def test_the_window_is_the_least_of_max_length_the_positions_and_the_tokenizers_limit(mlm, monkeypatch):
    from leakaudit.attacks.neighbourhood import window

    assert window(mlm, 512) == 254 and window(mlm, 40) == 40 and window(mlm, 1) == 2
    monkeypatch.setattr(mlm.tokenizer, "model_max_length", 100)
    assert window(mlm, 512) == 100


def test_a_text_of_exactly_the_window_is_not_counted_past_it(tiny_opt, tiny_mlm_dir, mlm, capsys):
    n = len(mlm.tokenizer(TEXTS[0])["input_ids"])
    ctx = ScoringContext(tiny_opt, [TEXTS[0], "The cat sat."], score_options=NO_CACHE)
    get_attack("neighbourhood", model=str(tiny_mlm_dir), n_neighbours=2, max_length=n).score(ctx)
    assert "longer than the masked LM's" not in capsys.readouterr().err
    get_attack("neighbourhood", model=str(tiny_mlm_dir), n_neighbours=2, max_length=n - 1).score(ctx)
    assert f"1 of 2 texts are longer than the masked LM's {n - 1}-token window" in capsys.readouterr().err


def test_the_masked_lm_folder_saved_again_is_loaded_again(tmp_path, tiny_mlm_dir):
    """The loaded-model cache is keyed by the folder's content: a masked LM saved again in place (a study's
    stage rerun for it, its key changed) must not be proposed with by the one loaded before."""
    import shutil

    from transformers import BertForMaskedLM

    where = tmp_path / "mlm"
    shutil.copytree(tiny_mlm_dir, where)
    first = load_masked_lm(str(where), torch.device("cpu"))
    assert load_masked_lm(str(where), torch.device("cpu")) is first
    torch.manual_seed(1)
    BertForMaskedLM(first.model.config).save_pretrained(where)
    again = load_masked_lm(str(where), torch.device("cpu"))
    assert again is not first
    assert not torch.equal(again.model.get_input_embeddings().weight, first.model.get_input_embeddings().weight)


def test_the_first_text_without_a_neighbour_is_named_and_only_rank_zero_draws_the_bar(tiny_opt, tiny_mlm_dir,
                                                                                     monkeypatch):
    from leakaudit.attacks import neighbourhood
    from leakaudit.attacks.neighbourhood import NoNeighbourError

    bars = []
    real = neighbourhood._propose
    monkeypatch.setattr(neighbourhood, "_propose", lambda mlm, make, texts, mine, cfg, progress, unit: (
        bars.append(progress), real(mlm, make, texts, mine, cfg, False, unit))[1])
    attack = get_attack("neighbourhood", model=str(tiny_mlm_dir), n_neighbours=2)
    attack.score(ScoringContext(tiny_opt, TEXTS[:2], score_options={"cache": False}))
    assert bars == [True]  # progress unless told otherwise, as every scoring pass
    ctx = ScoringContext(tiny_opt, TEXTS, score_options={"cache": False})
    _as_rank_one_of_two(monkeypatch, ctx, {0: 1.0, 2: 1.0})  # rank 0 proposed nothing for texts 0 and 2
    with pytest.raises(NoNeighbourError) as err:
        attack.score(ctx)
    assert err.value.index == 0 and bars == [True, False]


@pytest.fixture(scope="module")
def wordpiece_mlm(tmp_path_factory):
    """A tiny uncased BERT (random, seeded) with a WordPiece tokenizer over a hand-made vocabulary, as
    bert-base-uncased (the paper's) splits: "quarterly" is "quart", "##erly"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "the", "cat", "dog", "report", "quart", "is", "big",
              "old", "new", "##erly", "##ing", "##s", "##ed"]
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(pieces), hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32, max_position_embeddings=32))
    out = tmp_path_factory.mktemp("tiny-wp-mlm")
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return load_masked_lm(str(out), torch.device("cpu"))


def test_a_wordpiece_piece_is_swapped_for_a_piece_and_a_word_for_a_word(wordpiece_mlm):
    """WordPiece marks a piece that goes on a word ("##erly"), not a word: a swap at "##erly" is another piece
    without its "##" ("quarting"), never a whole word glued on ("quartdog"); one at "quart" a word
    ("dogerly"); an uncased proposal takes the text's case."""
    text = "The quarterly report is big."
    tok = wordpiece_mlm.tokenizer
    assert tok.convert_ids_to_tokens(tok(text)["input_ids"])[1:4] == ["the", "quart", "##erly"]
    words = {"the", "cat", "dog", "report", "quart", "is", "big", "old", "new"}
    got = neighbours(wordpiece_mlm, text, n=200)
    assert got and not any("#" in new for new in got), got
    at = {}
    for new in got:
        (old, swapped), = [(x, y) for x, y in zip(_words(text), _words(new), strict=True) if x != y]
        at.setdefault(old, set()).add(swapped)
    assert at["quarterly"] and at["quarterly"] <= ({"quarting", "quarts", "quarted"}
                                                   | {w + "erly" for w in words - {"quart"}}), at["quarterly"]
    assert at["quarterly"] & {"quarting", "quarts", "quarted"} and at["quarterly"] - {"quarting", "quarts",
                                                                                          "quarted"}
    assert at["The"] and all(w[:1].isupper() and w[1:].islower() and w.lower() in words for w in at["The"])


def test_a_one_letter_capital_word_is_not_all_caps():
    """"I" and "A" are upper case but not shouting: a swap for them is capitalised ("We"), not "WE"."""
    from leakaudit.attacks.neighbourhood import _cased

    assert _cased("we", "I", "I") == "We" and _cased("the", "A", "A") == "The"
    assert _cased("we", "I", "IT") == "WE" and _cased("One", "a", "a") == "one"


def test_proposing_shows_its_count_of_texts(mlm, tiny_mlm_dir, monkeypatch, capsys):
    """One masked-LM pass per token of each text: minutes for a thousand texts on a CPU, counted as it goes."""
    from leakaudit.attacks.neighbourhood import _propose, neighbours

    monkeypatch.setenv("LEAKAUDIT_PROGRESS_INTERVAL", "0.001")
    cfg = get_attack("neighbourhood", model=str(tiny_mlm_dir), n_neighbours=2).config
    _propose(mlm, neighbours, TEXTS, [0, 1, 2], cfg, True, "texts")
    err = capsys.readouterr().err
    assert "1/3 texts" in err and "2/3 texts" in err, err
    _propose(mlm, neighbours, TEXTS, [0, 1, 2], cfg, False, "texts")
    assert capsys.readouterr().err == ""


def test_a_text_whose_neighbours_all_score_no_token_is_named_not_nan(tiny_neox, tiny_mlm_dir, monkeypatch):
    """A neighbour of one token has no scored token under a target without a BOS (a swap that merged a short
    text's two tokens): the mean over no neighbour was NaN, an AUC of garbage. Such neighbours are left out, and
    a text with no other is named."""
    from leakaudit.attacks import neighbourhood
    from leakaudit.attacks.neighbourhood import UnscoredNeighboursError
    from leakaudit.scoring import score_texts

    one = next(w for w in ("a", "the", "I", "x") if score_texts(tiny_neox, [w], **NO_CACHE)[0].n_tokens == 0)
    real = neighbourhood.neighbours
    monkeypatch.setattr(neighbourhood, "neighbours", lambda mlm, text, **kw: [one, *real(mlm, text, **kw)]
                        if text == TEXTS[0] else [one] * 3 if text == TEXTS[1] else real(mlm, text, **kw))
    attack = get_attack("neighbourhood", model=str(tiny_mlm_dir), n_neighbours=3)
    with pytest.raises(UnscoredNeighboursError) as err:
        attack.score(ScoringContext(tiny_neox, TEXTS, score_options=NO_CACHE))
    assert err.value.index == 1
    got = attack.score(ScoringContext(tiny_neox, [TEXTS[0], TEXTS[2]], score_options=NO_CACHE))
    mlm = load_masked_lm(str(tiny_mlm_dir), torch.device("cpu"))
    want = np.mean([-hand(tiny_neox, t)["logp"].mean() for t in real(mlm, TEXTS[0], n=3)])
    assert np.isfinite(got).all() and got[0] == pytest.approx(want + hand(tiny_neox, TEXTS[0])["logp"].mean(),
                                                               rel=1e-4, abs=1e-5)


def test_the_texts_neighbours_are_those_proposed_before_swaps_were_spans(mlm):
    """The neighbours of texts as proposed before the swaps became spans that a conversation's neighbours are
    built from too (recorded from that code, commit 87f627a, with this fixture's masked LM): the same texts,
    in the same order. Every one, for five texts, is checked by its digest."""
    import hashlib
    import json

    assert neighbours(mlm, TEXTS[0], n=6) == [
        "Aallice Smith sent the quarterly report to John on Monday.",
        "Alice Smith sent the quarterly report to John on Sentonday.",
        "Ronlice Smith sent the quarterly report to John on Monday.",
        "Alice Smith sent the quarterly report to John on Monise.",
        "Alice Smith sent the quarterly report to John on Monames.",
        "Alice Smith sent the quarterly report to Jrown on Monday."]
    assert neighbours(mlm, "Blue.\nGreen, like the grass.", n=6) == [
        "Ballue.\nGreen, like the grass.", "Thlinklue.\nGreen, like the grass.", "Blue.\nGreen, like the grvel.",
        "Blue.\nUrrentreen, like the grass.", "Blue.\nAgereen, like the grass.", "Blue.\nGreen, lron the grass."]
    every = [neighbours(mlm, t, n=1000) for t in [*TEXTS, "Blue.\nGreen, like the grass.",
                                                   "THE REPORT IS DUE, SAID ALICE."]]
    assert [len(x) for x in every] == [142, 180, 107, 86, 210]
    assert hashlib.sha256(json.dumps(every, ensure_ascii=False).encode()).hexdigest() == (
        "ea667d15ee9813b2d379a907635e34a9462bccb61e0edbc77f53d2f7baef27e1")
