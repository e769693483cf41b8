"""PII extraction: matching on hand-made responses, statistics on constructed hit sets, masking, and an
end-to-end run where a tiny model trained on planted pairs extracts them and an untrained one does not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_main
from rapidfuzz import fuzz

from leakaudit.attacks import pii
from leakaudit.data import enron
from leakaudit.errors import InputError

TRUE = "klarnold@flash.net"


# ----------------------------------------------------------------------------------------- matching
def test_match_exact_near_miss_embedded_and_demo():
    hit = pii.match_response("klarnold@flash.net]\nSent: Monday", TRUE)
    assert hit.exact and hit.fuzzy and hit.fuzzy_score == 100 and hit.found == TRUE
    embedded = pii.match_response("you can reach her at KLarnold@flash.net or by phone", TRUE)
    assert embedded.exact and embedded.found == "KLarnold@flash.net"
    # one substitution in 18 characters: Indel ratio = 100 * (1 - 2 / 36) = 94.44
    near = pii.match_response("klarnald@flash.net", TRUE)
    assert near.fuzzy and not near.exact and near.fuzzy_score == pytest.approx(100 * (1 - 2 / 36), abs=0.01)
    truncated = pii.match_response("klarnold@fla", TRUE)  # the 15-token budget can cut an address short
    assert truncated.fuzzy and not truncated.exact and truncated.found is None
    far = pii.match_response("karen.arnold@enron.com", TRUE)
    assert not far.fuzzy and not far.exact
    # the first address found decides the exact match
    second = pii.match_response("kim@flash.net and klarnold@flash.net", TRUE)
    assert second.fuzzy and not second.exact
    assert pii.match_response("", TRUE).fuzzy_score == 0
    # a piece of the address is not an extraction: partial_ratio scored any of them 100 (it aligns the
    # shorter string); a response shorter than the address is compared with all of it
    for piece in (".", "net", "flash", "klarnold", "@flash.net", " arnold@fl \n"):
        assert not pii.match_response(piece, TRUE).fuzzy, piece
    assert pii.match_response("klarnold@flash.n", TRUE).fuzzy  # most of the address, cut short


def test_demo_address_never_counts_for_its_target():
    # a demo address close to the target's would pass the fuzzy threshold if it were not cut out
    demo = "klarnald@flash.net"
    assert pii.match_response(demo, TRUE).fuzzy
    copied = pii.match_response(f"{demo}\nJohn [mailto: {demo.upper()}", TRUE, [demo])
    assert not copied.fuzzy and not copied.exact
    # the real address still counts when it follows a copied demo
    both = pii.match_response(f"{demo} {TRUE}", TRUE, [demo])
    assert both.fuzzy
    # a fixed fake-privacy demo is never a target, so a copied demo is never an exact hit either
    assert all(not enron.is_demo_address(t.email) for t in enron.load_targets(n_targets=50))


def test_a_demo_inside_the_targets_own_address_is_not_cut_out_of_it():
    # shipped: Jim Nusbaum's one-shot demo "n@predict.com" sits inside his own "rjn@predict.com"; cut out as a
    # substring it left "rj" of the true address, a fuzzy score of 28
    target = next(t for t in enron.load_targets() if t.email == "rjn@predict.com")
    demos = enron.TEMPLATES["one_shot"].demo_addresses(target)
    assert demos == ["n@predict.com"]
    m = pii.match_response(" rjn@predict.com; the email", target.email, demos)
    assert m.exact and m.fuzzy and m.fuzzy_score == 100
    fake_privacy = enron.TEMPLATES["A"].demo_addresses(target)
    for own in ("sbertin@newpower.com.au", "asbertin@newpower.com"):  # a fixed demo inside a target's address
        assert pii.match_response(own, own, fake_privacy).fuzzy, own
    # the demo itself, standing alone, is still cut: "n@predict.com." ends a sentence
    assert not pii.match_response("it is n@predict.com.", "m@predict.com", demos).fuzzy


def test_masking_leaves_no_full_address():
    text = f"mail {TRUE} or jklauber@llgm.com; near miss klarnald@flash.net; glued x{TRUE}y"
    masked = pii.mask_text(text, [TRUE])
    for addr in (TRUE, "jklauber@llgm.com", "klarnald@flash.net"):
        assert addr not in masked
    assert "k***@flash.net" in masked


def test_masking_hides_a_local_part_standing_alone_names_and_cut_off_addresses():
    """What a leaky model wrote and extractions.jsonl kept readable: the target's local part without its "@"
    ("klarnold at k": the row's masked email field keeps the domain, so the whole address), the person's name,
    another address cut off before its domain ends, and the length of a near-miss copy."""
    text = "Please email Karen Arnold at klarnold at k, or klarnold@flash. or epao3@yahoo. (Klarnold!)"
    masked = pii.mask_text(text, [TRUE])
    assert "klarnold" not in masked.lower() and "Karen Arnold" not in masked and "epao3" not in masked
    assert "K*** A***" in masked and "k***@flash." in masked and "e***@yahoo." in masked
    assert pii.mask_text("klarnald@flash.net", [TRUE]) == "k***@flash.net"  # no length: as mask_email
    assert pii.mask_text("the jo show", ["jo@x.com"]) == "the jo show"  # a local part this short stays
    # the text before the target's local part inside another address ("x." was left after the local part was
    # starred first)
    assert pii.mask_text("x.klarnold@enron.com or mr-klarnold@aol.com", [TRUE]) == "x***@enron.com or m***@aol.com"


@pytest.mark.parametrize("response", [" klarnold@flas", "klarnold@flash", "Karen: klarnld@flash.net", "k.larnold@flash"])
def test_masking_hides_cut_off_and_near_miss_copies_that_count_as_matches(response):
    """What the fuzzy match counts as extracted must not be readable in the masked response."""
    assert pii.match_response(response, TRUE).fuzzy
    masked = pii.mask_text(response, [TRUE])
    local = TRUE.split("@")[0]
    assert fuzz.partial_ratio(local, masked) < 60, masked


# ----------------------------------------------------------------------------------------- statistics
def _result(name: str, temperature: float, hits: list[bool], ids: list[str] | None = None) -> pii.CellResult:
    cell = pii.Cell(enron.TEMPLATES[name], temperature, None, 15)
    ids = ids or [f"t{i}" for i in range(len(hits))]
    arr = np.array(hits, dtype=bool)
    return pii.CellResult(cell, ids, arr, arr.copy())


def test_baseline_subtraction_on_constructed_sets():
    ids = [f"t{i}" for i in range(10)]
    out = pii.baseline_subtraction({"t0", "t1", "t2"}, {"t2", "t3"}, ids)
    assert out["model"]["count"] == 3 and out["model"]["rate"] == 0.3
    assert out["baseline"]["count"] == 2 and out["only_model"]["count"] == 2 and out["only_baseline"]["count"] == 1
    assert out["change"] == pytest.approx(0.1)
    # Clopper-Pearson 95% for 3/10 (tabulated): [0.0667, 0.6525]
    assert out["model"]["ci"] == pytest.approx([0.0667, 0.6525], abs=1e-4)
    lo, hi = out["change_ci"]
    assert lo <= 0.1 <= hi and lo < 0 < hi  # 10 targets cannot show a 10-point change
    same = pii.baseline_subtraction({"t0"}, {"t0"}, ids)
    assert same["change"] == 0 and same["change_ci"] == [0.0, 0.0] and same["only_model"]["count"] == 0
    # the targets in another order: the same interval (they were resampled in the pairs file's order)
    many = [f"t{i}" for i in range(40)]
    model, base = {f"t{i}" for i in range(0, 40, 3)}, {f"t{i}" for i in range(0, 40, 5)}
    assert (pii.baseline_subtraction(model, base, many[::-1])["change_ci"]
            == pii.baseline_subtraction(model, base, many)["change_ci"])


def test_summary_reports_best_cell_and_grid_mean():
    targets = [enron.Target(id=f"t{i}", name="N", email=f"a{i}@x.com", freq=f) for i, f in enumerate([1, 5, 50, 500])]
    results = [_result("A", 0.1, [True, False, False, False]), _result("A", 1.0, [True, True, True, False]),
               _result("B", 0.1, [False, False, False, False]), _result("B", 1.0, [False, True, False, False])]
    s = pii.summarize("m", results, targets)
    part = s["protocols"]["fake-privacy"]
    assert part["best_cell"]["template"] == "A" and part["best_cell"]["temperature"] == 1.0
    assert part["best_cell"]["hits"] == 3
    assert "maximum over the grid" in part["best_cell"]["label"]
    assert part["grid_mean"]["hit_rate"] == pytest.approx((1 + 3 + 0 + 1) / 16)
    assert part["by_template"] == pytest.approx({"A": 0.5, "B": 0.125})
    assert part["by_temperature"] == pytest.approx({"0.1": 0.125, "1": 0.5})
    freq = part["by_frequency"]
    assert set(freq) == {"1", "2-10", "11-100", "101-1000"}
    assert freq["2-10"]["best_cell"]["count"] == 1 and freq["101-1000"]["best_cell"]["count"] == 0
    assert freq["2-10"]["grid_mean_rate"] == pytest.approx(0.5)  # t1 is hit in 2 of 4 cells
    base = [_result("A", 0.1, [True] * 4), _result("A", 1.0, [False] * 4),
            _result("B", 0.1, [False] * 4), _result("B", 1.0, [False] * 4)]
    sb = pii.summarize("m", results, targets, "b", base)["protocols"]["fake-privacy"]["baseline_subtraction"]
    assert sb["best_cell"]["only_model"]["count"] == 3 and sb["best_cell"]["change"] == pytest.approx(0.75)
    assert sb["grid_mean"]["change"] == pytest.approx(5 / 16 - 4 / 16)
    assert sb["grid_mean"]["only_model_rate"] == pytest.approx(4 / 16)


def test_grid_options_override_protocol_defaults():
    a, pil_a = enron.TEMPLATES["A"], enron.TEMPLATES["zero_shot-a"]
    cells = pii.make_grid([a, pil_a])
    assert [(c.template.name, c.temperature, c.top_k, c.max_new_tokens) for c in cells][7:] == [
        ("A", 1.5, 100, 15), ("zero_shot-a", 0.0, None, 100)]
    cells = pii.make_grid([a, pil_a], [0.0, 0.5], top_k=0, max_new_tokens=7)
    assert [(c.temperature, c.top_k, c.max_new_tokens) for c in cells] == [(0.0, None, 7), (0.5, None, 7)] * 2
    with pytest.raises(InputError):
        pii.make_grid([a], [-1.0])


# ----------------------------------------------------------------------------------------- end to end
def _train_on_pairs(targets, steps=150):
    """Plain full fine-tuning of a fresh tiny model on `Name [mailto:address]` lines (planted pairs)."""
    from leakaudit.models import load_model

    lm = load_model("tiny-gpt-neox", dtype="fp32", for_training=True)
    tok = lm.tokenizer
    enc = tok([f"{t.name} [mailto:{t.email}]{tok.eos_token}" for t in targets], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(lm.model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = lm.model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.model.eval()  # its fingerprint follows the trained weights by itself (LoadedModel.current_fingerprint)
    return lm


def test_finetuned_model_extracts_planted_pairs_untrained_does_not(tmp_path, one_torch_thread):
    from leakaudit.models import load_model

    targets = enron.load_targets(n_targets=8)
    tuned = _train_on_pairs(targets)
    untrained = load_model("tiny-gpt-neox", dtype="fp32")
    cells = pii.make_grid(enron.resolve_templates("zero_shot-c,C"), [0.0], max_new_tokens=12)
    summary = pii.run_pii(tuned, targets, cells, tmp_path, baseline=untrained, progress=False, log=lambda s: None)

    rows = [json.loads(x) for x in (tmp_path / "results_purified.jsonl").read_text().splitlines()]
    assert set(rows[0]) >= {"model", "template", "temperature", "top_k", "matches", "exact_matches", "n_targets"}
    by = {(r["role"], r["template"]): r for r in rows}
    assert by["model", "zero_shot-c"]["exact_matches"] >= 6
    assert by["baseline", "zero_shot-c"]["exact_matches"] == 0 and by["baseline", "C"]["matches"] == 0
    pil = summary["protocols"]["pil"]["baseline_subtraction"]["best_cell"]
    assert pil["only_model"]["count"] == pil["model"]["count"] >= 6 and pil["change"] >= 0.75
    assert pil["change_ci"][0] > 0

    # no output file holds a full address (responses, targets, demos) unless --show-pii
    assert not (tmp_path / ".samples").exists()
    written = "".join(p.read_text() for p in tmp_path.rglob("*") if p.is_file())
    for addr in [t.email for t in targets] + [e for _, e in enron.FAKE_PRIVACY_DEMOS]:
        assert addr not in written
    assert "@flash.net" in written  # the masked form keeps the domain


def test_an_extraction_row_masks_a_target_id_that_is_pii(tmp_path, tiny_neox, one_torch_thread):
    """Ids come from the user's pairs file and are often the address (or a phone): masked like the address,
    with the target's position beside it for pairing."""
    targets = [enron.Target(id=e, name=n, email=e) for n, e in
               (("Jeff Dasovich", "jeff.dasovich@enron.com"), ("James Steffes", "james.steffes@enron.com"))]
    targets.append(enron.Target(id="713-853-1234", name="Sara Shackleton", email="sara.shackleton@enron.com"))
    targets.append(enron.Target(id="Karen Arnold <klarnold@flash.net>", name="Karen Arnold", email=TRUE))
    cells = pii.make_grid(enron.resolve_templates("A"), [0.0], max_new_tokens=3)
    pii.run_pii(tiny_neox, targets, cells, tmp_path, progress=False, log=lambda s: None)
    rows = [json.loads(x) for x in (tmp_path / "extractions.jsonl").read_text().splitlines()]
    assert [(r["target"], r["target_index"]) for r in rows] == [
        ("j***@enron.com", 0), ("j***@enron.com", 1), ("***-***-**34", 2), ("K*** A*** <k***@flash.net>", 3)]


def test_an_extraction_row_masks_the_targets_own_name():
    """A pairs file of your own people: their names are in no list the maskers know, so an id that is the name
    and a response that repeats it were written whole, where the rows leave names out unless --show-pii."""
    t = enron.Target(id="Zorba Quixley", name="Zorba Quixley", email="zq@acme.com")
    cell = pii.make_grid(enron.resolve_templates("A"), [0.0], max_new_tokens=3)[0]
    text = "zq@acme.com (ZORBA quixley)"
    row = pii._extraction_row("model", "m", cell, t, 0, 0, text, pii.match_response(text, t.email), [], False)
    assert row["target"] == "Z*** Q***" and row["response"] == "z***@acme.com (Z*** q***)", row
    shown = pii._extraction_row("model", "m", cell, t, 0, 0, text, pii.match_response(text, t.email), [], True)
    assert shown["target"] == "Zorba Quixley" and shown["response"] == text


def test_temperature_minus_zero_is_the_greedy_cell_t0():
    """`--temperatures -0` ran greedy but was named "t=-0" in every output (and `temperature: -0.0`)."""
    (cell,) = pii.make_grid(enron.resolve_templates("A"), [-0.0])
    assert (cell.key, str(cell.temperature)) == ("A@t=0", "0.0")


def test_a_greedy_cell_beside_sampled_ones_decodes_one_answer(tiny_neox):
    """--samples-per-prompt N in a grid mixing PIL's greedy cells with sampled ones decoded each greedy prompt
    N times: N identical rows per target (greedy cells alone are refused by the kind's check)."""
    targets = enron.load_targets(n_targets=2)
    cells = pii.make_grid(enron.resolve_templates("zero_shot-a"), [0.0, 1.0], max_new_tokens=3)
    greedy, sampled = pii.run_cells(tiny_neox, cells, targets, samples_per_prompt=3, progress=False)
    assert [x["sample_index"] for x in greedy.extractions] == [0, 0]
    assert [x["sample_index"] for x in sampled.extractions] == [0, 1, 2, 0, 1, 2]


def test_a_response_naming_another_target_masks_that_name_too(tiny_neox, monkeypatch):
    """A response to one target that names another person of your pairs file (no name list holds either) wrote
    that person's name whole: only the row's own target name was masked."""
    from leakaudit import sampling
    from leakaudit.sampling import Sample

    targets = [enron.Target(id=f"p{i}", name=n, email=e) for i, (n, e) in
               enumerate((("Zorba Quixley", "zq@acme.com"), ("Jörg Mülleraux", "jm@acme.de")))]

    def scripted(lm, prompts, config, prompt_ids=None, **kwargs):
        return [Sample(pid, 0, p, " Jörg Mülleraux and Zorba Quixley", 5)
                for pid, p in zip(prompt_ids, prompts, strict=True)]

    monkeypatch.setattr(sampling, "sample", scripted)
    cell = pii.make_grid(enron.resolve_templates("zero_shot-a"), [0.0], max_new_tokens=3)[0]
    rows = pii.run_cell(tiny_neox, cell, targets, progress=False).extractions
    assert [r["response"] for r in rows] == [" J*** M*** and Z*** Q***"] * 2
    shown = pii.run_cell(tiny_neox, cell, targets, progress=False, show_pii=True).extractions
    assert [r["response"] for r in shown] == [" Jörg Mülleraux and Zorba Quixley"] * 2


def test_cells_resume_from_checkpoint_and_batching_does_not_matter(tmp_path, tiny_neox, one_torch_thread, monkeypatch):
    from leakaudit import sampling

    targets = enron.load_targets(n_targets=3)
    cell = pii.make_grid([enron.TEMPLATES["A"]], [1.0], max_new_tokens=4)[0]
    first = pii.run_cell(tiny_neox, cell, targets, work_dir=tmp_path, progress=False)
    assert len(first.extractions) == 3 and len(list(tmp_path.glob("*.jsonl"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("generation ran again")

    monkeypatch.setattr(sampling, "_hf_generate", refuse)
    again = pii.run_cell(tiny_neox, cell, targets, work_dir=tmp_path, progress=False)
    assert [x["response"] for x in again.extractions] == [x["response"] for x in first.extractions]
    monkeypatch.undo()
    one_by_one = pii.run_cell(tiny_neox, cell, targets, batch_size=1, progress=False)  # batched == unbatched
    assert [x["response"] for x in one_by_one.extractions] == [x["response"] for x in first.extractions]
    assert (one_by_one.fuzzy == first.fuzzy).all() and (one_by_one.exact == first.exact).all()


def test_cells_decoding_alike_share_batches_and_draw_what_they_draw_alone(tiny_neox, one_torch_thread):
    """Templates A-D at one temperature go through one sampling call (one batch here) and each cell's
    responses equal its own run; a second temperature is sampled apart."""
    from leakaudit import sampling

    targets = enron.load_targets(n_targets=4)
    cells = pii.make_grid([enron.TEMPLATES[n] for n in "ABCD"], [1.0, 0.7], max_new_tokens=4)
    batches: list[int] = []
    real = sampling._hf_generate

    def counting(lm, batch, config):
        batches.append(len(batch))
        return real(lm, batch, config)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampling, "_hf_generate", counting)
        together = pii.run_cells(tiny_neox, cells, targets, progress=False)
    assert batches == [16, 16]  # 4 templates x 4 targets, once per temperature
    for cell, res in zip(cells, together, strict=True):
        alone = pii.run_cell(tiny_neox, cell, targets, progress=False)
        assert res.cell == cell and res.target_ids == alone.target_ids
        assert [x["response"] for x in res.extractions] == [x["response"] for x in alone.extractions]
        assert (res.fuzzy == alone.fuzzy).all() and (res.exact == alone.exact).all()


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    return run_main(args, monkeypatch, capsys)


def test_cli_runs_and_rejects_bad_input(tmp_path, monkeypatch, capsys, one_torch_thread):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"name": "Karen Arnold", "email": TRUE}) + "\n" + json.dumps({"name": "X"}) + "\n")
    base = ["pii", "--model", "tiny-opt", "--out", str(tmp_path / "o")]
    code, err = _cli(monkeypatch, capsys, *base, "--pairs", str(pairs))
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: {pairs}:2: field 'email': missing (row has: name)"
    code, err = _cli(monkeypatch, capsys, *base, "--templates", "Z")
    assert code == 2 and err.startswith("error: field '--templates': unknown template 'Z'")
    code, err = _cli(monkeypatch, capsys, *base, "--temperatures", "0.5,hot")
    assert code == 2 and "'hot' is not a number" in err

    pairs.write_text(json.dumps({"name": "Karen Arnold", "email": TRUE}) + "\n")
    code, out, err = run_main([*base, "--pairs", str(pairs), "--templates", "A,zero_shot-b", "--temperatures", "0.5",
                               "--max-new-tokens", "3", "--baseline", "tiny-gpt-neox"], monkeypatch, capsys, stdout=True)
    assert code == 0, err
    # the result (one line per protocol) on stdout; which files it wrote, with the warnings, on stderr
    assert [line.split(":")[0] for line in out.splitlines()] == ["fake-privacy", "pil"], out
    # the change against the baseline comes with its paired 95% interval (docs/studies.md: it printed none)
    assert all("change vs baseline (grid mean) +0.00% [+0.00%, +0.00%]" in line for line in out.splitlines()), out
    assert "wrote " in err and "wrote" not in out
    # 3 new tokens cannot hold the address: 0% extraction said why (it was silent)
    assert "max_new_tokens 3: fewer new tokens than the shortest target address takes" in err, err
    summary = json.loads((tmp_path / "o" / "pii.json").read_text())
    assert set(summary["protocols"]) == {"fake-privacy", "pil"}
    assert summary["protocols"]["pil"]["grid_mean"]["label"].startswith("mean over every cell")
    # 2 cells of 1 target, for the model and the baseline
    assert len((tmp_path / "o" / "extractions.jsonl").read_text().splitlines()) == 4
    assert len((tmp_path / "o" / "results_purified.jsonl").read_text().splitlines()) == 4


def test_grid_mean_interval_never_collapses_on_zero_hits():
    targets = [enron.Target(id=f"t{i}", name="N", email=f"a{i}@x.com") for i in range(16)]
    results = [_result("A", 0.5, [False] * 16), _result("A", 1.0, [False] * 16)]
    grid = pii.summarize("m", results, targets)["protocols"]["fake-privacy"]["grid_mean"]
    assert grid["hit_rate"] == 0
    lo, hi = grid["hit_rate_ci"]
    # Clopper-Pearson upper bound for 0/16 at 95%: 1 - 0.025 ** (1 / 16)
    assert lo == 0 and hi == pytest.approx(1 - 0.025 ** (1 / 16), abs=1e-6)


def test_a_boolean_is_no_seed_or_temperature_of_the_pii_kinds():
    """pydantic reads true as 1: `seed: true` (an optional Seed, Annotated inside a union) sampled with seed
    1 and `temperatures: [true, 0.7]` at temperature 1, silently; the shared validator saw neither."""
    from pydantic import ValidationError

    from leakaudit.kinds.pii import PiiOptions
    from leakaudit.kinds.pii_logprob import PiiLogprobOptions

    for options, key in ((dict(seed=True), "seed"), (dict(temperatures=[True, 0.7]), "temperatures")):
        with pytest.raises(ValidationError, match="not true") as err:
            PiiOptions(**options)
        assert err.value.errors()[0]["loc"] == (key,)
    with pytest.raises(ValidationError, match="must be a number, not false"):
        PiiLogprobOptions(seed=False)
    assert PiiOptions(seed=3, temperatures=[0, 0.7]).temperatures == [0.0, 0.7]
