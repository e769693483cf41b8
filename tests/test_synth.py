"""Continuation data (prompts, provenance, resume) and the self-instruct loop (filters, ROUGE-L dedup, resume)."""

from __future__ import annotations

import json

import pytest

from leakaudit import resources
from leakaudit.data import synth
from leakaudit.data.io import Record
from leakaudit.errors import InputError
from leakaudit.sampling import Sample, SamplingConfig

SOURCE = [Record("a", "Please send the signed gas storage contract to the legal team before Friday."),
          Record("b", "The quarterly budget review moved to room 32C on Tuesday afternoon.", extra={"p": "Dear"})]


def test_continuation_prompt_is_first_n_tokens(tiny_neox):
    prompts = synth.continuation_prompts(tiny_neox, SOURCE, prompt_tokens=4)
    for r, p in zip(SOURCE, prompts, strict=True):
        ids = tiny_neox.tokenizer(r.text, add_special_tokens=False)["input_ids"]
        assert p == tiny_neox.tokenizer.decode(ids[:4])
        assert r.text.startswith(p) and len(p) < len(r.text)
    with pytest.raises(InputError) as err:
        synth.continuation_prompts(tiny_neox, SOURCE, prompt_field="p", source="src.jsonl")
    assert (err.value.field, err.value.file) == ("p", "src.jsonl")


def test_a_prompt_is_always_the_start_of_its_record(tiny_neox):
    """Byte-level tokens can end inside a character; the cut steps back a token instead of ending in U+FFFD."""
    text = "Hi \U0001F600 caf\u00e9 \u65e5\u672c\u8a9e end"
    record = Record(id="a", text=text, line=1)
    n_ids = len(tiny_neox.tokenizer(text, add_special_tokens=False)["input_ids"])
    prompts = [synth.continuation_prompts(tiny_neox, [record], prompt_tokens=n)[0] for n in range(1, n_ids + 1)]
    assert all(text.startswith(p) and p for p in prompts) and prompts[-1] == text
    for first in ("\U0001F642 hello", "\u65e5\u672c\u8a9e\u306e\u30e1\u30fc\u30eb", "\u00e9 is here"):
        # the first character alone is more than one token: a one-token prompt runs to its end
        prompt = synth.continuation_prompts(tiny_neox, [Record(id="b", text=first, line=1)], prompt_tokens=1)[0]
        assert prompt and first.startswith(prompt) and "\ufffd" not in prompt, (first, prompt)


def test_continuations_carry_provenance_and_resume(tiny_neox, tmp_path):
    out = tmp_path / "gen.jsonl"
    cfg = SamplingConfig(max_new_tokens=6, top_k=100, num_samples=2, seed=4)
    rows = synth.generate_continuations(tiny_neox, SOURCE, out, cfg, prompt_tokens=5, progress=False)
    assert [r["id"] for r in rows] == ["a#0", "a#1", "b#0", "b#1"]
    on_disk = [json.loads(line) for line in out.read_text().splitlines()]
    assert on_disk == rows
    for r in rows:
        assert r["text"] == r["prompt"] + r["generated"]
        assert r["provenance"]["generator"] == "tiny-gpt-neox"
        assert r["provenance"]["generator_fingerprint"] == tiny_neox.fingerprint
        assert r["provenance"]["sampling"]["top_k"] == 100
        assert r["provenance"]["prompt"] == {"first_tokens": 5}
        assert (r["provenance"]["backend"], r["provenance"]["dtype"]) == ("hf", "float32")  # rows move with both
    assert not (tmp_path / "gen.jsonl.partial").exists()
    # the study's defaults
    assert (synth.CONTINUATION_DEFAULTS.top_k, synth.CONTINUATION_DEFAULTS.max_new_tokens) == (100, 1000)
    # a checkpoint left by a killed run is reused: same rows again
    partial = tmp_path / "again.jsonl.partial"
    partial.write_text("".join(json.dumps({**{k: v for k, v in r.items() if k in ("prompt", "n_new_tokens")},
                                           "prompt_id": r["source_id"], "sample_index": r["sample_index"],
                                           "text": r["generated"], "run": _run_key(tiny_neox, cfg)}) + "\n"
                               for r in rows[:2]))
    again = synth.generate_continuations(tiny_neox, SOURCE, tmp_path / "again.jsonl", cfg, prompt_tokens=5,
                                         progress=False)
    assert [(r["id"], r["generated"]) for r in again] == [(r["id"], r["generated"]) for r in rows]


def _run_key(lm, cfg):
    from leakaudit.sampling import run_key

    return run_key(lm, cfg, "hf")


def test_seed_tasks_both_layouts(tmp_path):
    shipped = synth.load_seed_tasks(resources.path("self-instruct-seed", "seed_tasks.jsonl"))
    assert len(shipped) == 175 and all(t.instruction and t.instances for t in shipped)
    f = tmp_path / "seeds.jsonl"
    f.write_text(json.dumps({"instruction": "Add the numbers.", "examples": [{"input": "2 3", "output": "5"}]})
                 + "\n" + json.dumps({"instruction": "Say hi.", "examples": [{"input": 3, "output": "hi"}]}) + "\n")
    with pytest.raises(InputError) as err:
        synth.load_seed_tasks(f)
    assert (err.value.line, err.value.field) == (2, "examples")
    f.write_text(json.dumps({"instruction": "Add the numbers.", "examples": [{"input": "2 3", "output": "5"}]}))
    [task] = synth.load_seed_tasks(f)
    assert task.instances == [{"input": "2 3", "output": "5"}]


def test_rouge_filter_rejects_near_copy():
    f = synth.RougeFilter(["Give three tips for staying healthy."])
    # hand-computed: LCS 6 words; P = 6/7, R = 6/6, F1 = 12/13 = 0.923 > 0.7
    assert f.max_similarity("Give three tips for staying very healthy.") == pytest.approx(12 / 13)
    assert not f.accept("Give three tips for staying very healthy.")
    assert f.accept("Translate the sentence into French.")
    assert not f.accept("Translate this sentence into French.")  # now in the pool: LCS 4, F1 = 0.8
    assert len(f.pool) == 2


def test_parsers_and_quality_filter():
    assert synth.parse_instructions(" Name a red fruit.\n10. Sort the list of numbers.\n11 . Tell a joke") == [
        "Name a red fruit.", "Sort the list of numbers.", "Tell a joke"]
    assert synth.parse_instance(" 3, 1, 2\nOutput: 1, 2, 3\n\nInstruction: next") == {"input": "3, 1, 2",
                                                                                          "output": "1, 2, 3"}
    assert synth.parse_instance(" <noinput>\nOutput: hello") == {"input": "", "output": "hello"}
    assert synth.parse_instance("no output here") is None
    assert synth.passes_quality("Sort the list of numbers.")
    assert not synth.passes_quality("Draw a picture of a cat.")
    assert not synth.passes_quality("Hi there")
    assert not synth.passes_quality("- Sort the list of numbers.")


SCRIPT = {
    "instructions": "Describe the weather in Paris in one sentence.\n10. Give three tips for staying very healthy."
                    "\n11. Name a fruit that is red and sweet.\n12. Describe the weather in Paris in a sentence.",
    "instance": " <noinput>\nOutput: It is sunny.",
}


def _scripted_sample(lm, prompts, config, **kwargs):
    """Stands in for the model: fixed instruction lists, then instances; lets the loop logic be checked."""
    key = "instance" if prompts[0].startswith("Instruction:") else "instructions"
    return [Sample(str(i), 0, p, SCRIPT[key], 5) for i, p in enumerate(prompts)]


def test_self_instruct_loop_dedups_and_resumes(tiny_neox, tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "sample", _scripted_sample)
    seeds = [synth.Task("Give three tips for staying healthy.", [{"input": "", "output": "Sleep."}]),
             synth.Task("Sort the numbers in ascending order.", [{"input": "3 1 2", "output": "1 2 3"}])]
    out = tmp_path / "tasks.jsonl"
    rows = synth.self_instruct(tiny_neox, seeds, out, n=1, requests_per_round=2)
    assert [r["instruction"] for r in rows] == ["Describe the weather in Paris in one sentence."]
    assert rows[0]["instances"] == [{"input": "", "output": "It is sunny."}]
    # rerun with a larger n resumes from the file; the near-copies of seeds and of kept tasks are rejected
    rows = synth.self_instruct(tiny_neox, seeds, out, n=5, requests_per_round=2, max_rounds=3)
    instructions = [r["instruction"] for r in rows]
    assert instructions == ["Describe the weather in Paris in one sentence.", "Name a fruit that is red and sweet."]
    assert [json.loads(line)["instruction"] for line in out.read_text().splitlines()] == instructions
    assert synth.instruction_rows(rows)[0] == {  # one row per instance, the same from the CLI and a stage
        "id": "self-instruct:0#0", "instruction": instructions[0], "input": "", "output": "It is sunny.",
        "text": f"{instructions[0]}\nIt is sunny.", "source_task": "self-instruct:0"}


def test_self_instruct_redoes_a_round_cut_short_and_refuses_other_options(tiny_neox, tmp_path, monkeypatch):
    """A kill can cut a round's write short (a half line, or whole lines missing): the rerun redoes that round
    and the file ends as a straight run's. A file from other options is refused, never mixed in."""
    monkeypatch.setattr(synth, "sample", _scripted_sample)
    seeds = [synth.Task("Give three tips for staying healthy.", [{"input": "", "output": "Sleep."}])]
    straight = synth.self_instruct(tiny_neox, seeds, tmp_path / "straight.jsonl", n=2, requests_per_round=2)
    assert [r["round"] for r in straight] == [0, 0]  # one round wrote both tasks
    text = (tmp_path / "straight.jsonl").read_text(encoding="utf-8")
    first_line = text.index("\n") + 1
    for cut in (first_line + 20, first_line):  # inside the round's second line; after its first line
        out = tmp_path / f"cut{cut}.jsonl"
        out.write_text(text[:cut], encoding="utf-8")
        assert synth.self_instruct(tiny_neox, seeds, out, n=2, requests_per_round=2) == straight
        assert out.read_text(encoding="utf-8") == text
    # a round missing a row that is not the last round (a hand edit): it and every later round are redone, not
    # kept with a duplicate id (only the last round's count was checked)
    rows = [json.loads(x) for x in text.splitlines()]
    later = {**rows[0], "round": 1, "round_rows": 1}
    gapped = tmp_path / "gapped.jsonl"
    gapped.write_text("".join(json.dumps(r) + "\n" for r in (rows[1], later)), encoding="utf-8")
    assert synth._read_generated_tasks(gapped, rows[0]["provenance"]) == [] and gapped.read_bytes() == b""
    before = (tmp_path / "straight.jsonl").read_bytes()
    for changed in ({"seed": 1}, {"temperature": 0.9}, {"requests_per_round": 3}):
        with pytest.raises(InputError) as err:
            synth.self_instruct(tiny_neox, seeds, tmp_path / "straight.jsonl", n=3,
                                **{"requests_per_round": 2, **changed})
        assert err.value.field == "--out" and err.value.line == 1 and next(iter(changed)) in str(err.value)
    assert (tmp_path / "straight.jsonl").read_bytes() == before


def test_a_larger_n_continues_to_what_a_straight_run_of_it_writes(tiny_neox, tmp_path, monkeypatch):
    """A run's last round keeps only what `n` leaves room for; continued with a larger `n`, the next round was
    drawn without the rest of it, and the file differed from a straight run's from that round on."""
    monkeypatch.setattr(synth, "sample", _scripted_sample)
    seeds = [synth.Task("Give three tips for staying healthy.", [{"input": "", "output": "Sleep."}])]
    synth.self_instruct(tiny_neox, seeds, tmp_path / "straight.jsonl", n=2, requests_per_round=2)
    out = tmp_path / "grown.jsonl"
    first = synth.self_instruct(tiny_neox, seeds, out, n=1, requests_per_round=2)
    assert [(r["round"], r["round_rows"], r["round_accepted"]) for r in first] == [(0, 1, 2)]
    assert synth.self_instruct(tiny_neox, seeds, out, n=1, requests_per_round=2) == first  # the same n: kept
    synth.self_instruct(tiny_neox, seeds, out, n=2, requests_per_round=2)
    assert out.read_bytes() == (tmp_path / "straight.jsonl").read_bytes()


def test_self_instruct_refuses_to_resume_in_another_dtype(tiny_neox, tmp_path, monkeypatch):
    """Rows name the dtype and backend that sampled them (bf16 moves picks): a file begun in fp32 was resumed in
    bf16 with no word, its rounds mixed. A file of a release that did not write them is still resumed."""
    from leakaudit.models import load_model

    monkeypatch.setattr(synth, "sample", _scripted_sample)
    seeds = [synth.Task("Give three tips for staying healthy.", [{"input": "", "output": "Sleep."}])]
    out = tmp_path / "tasks.jsonl"
    rows = synth.self_instruct(tiny_neox, seeds, out, n=1, requests_per_round=2)
    assert {k: rows[0]["provenance"][k] for k in ("backend", "dtype")} == {"backend": "hf", "dtype": "float32"}
    with pytest.raises(InputError) as err:
        synth.self_instruct(load_model("tiny-gpt-neox", dtype="bf16"), seeds, out, n=2, requests_per_round=2)
    assert err.value.field == "--out" and "(dtype)" in str(err.value)
    old = [{**r, "provenance": {k: v for k, v in r["provenance"].items() if k not in synth.LATER_KEYS}} for r in rows]
    out.write_text("".join(json.dumps(r) + "\n" for r in old), encoding="utf-8")
    assert [r["instruction"] for r in synth.self_instruct(tiny_neox, seeds, out, n=2, requests_per_round=2)] == [
        "Describe the weather in Paris in one sentence.", "Name a fruit that is red and sweet."]


def test_self_instruct_runs_on_a_real_model(tiny_neox, tmp_path):
    seeds = synth.load_seed_tasks(resources.path("self-instruct-seed", "seed_tasks.jsonl"))
    rows = synth.self_instruct(tiny_neox, seeds, tmp_path / "t.jsonl", n=3, requests_per_round=2, max_rounds=1,
                               max_new_tokens=16, temperature=1.0, top_p=1.0)
    pool = synth.RougeFilter([s.instruction for s in seeds])
    for r in rows:  # whatever the random model wrote, every kept task passed the filters
        assert synth.passes_quality(r["instruction"])
        assert pool.accept(r["instruction"])
        assert r["provenance"]["generator"] == "tiny-gpt-neox"
    assert len(rows) <= 3


def test_rouge_filter_reads_every_script_and_matches_rouge_score_on_ascii():
    """rouge-score's tokenizer keeps [a-z0-9] only: two identical Chinese instructions scored 0 and both
    passed the duplicate filter."""
    from rouge_score import rouge_scorer

    from leakaudit.data.synth import RougeFilter

    assert RougeFilter(["写一首关于秋天的诗"]).max_similarity("写一首关于秋天的诗") == 1.0
    assert not RougeFilter(["Напиши стихотворение об осени"]).accept("Напиши стихотворение об осени")
    plain = rouge_scorer.RougeScorer(["rougeL"])
    for a, b in (("Give three tips for staying healthy.", "Give me 3 tips to stay healthy!"),
                 ("Sort the list: [3, 1, 2]", "sort_the list 3 1 2"), ("What's 2+2?", "what is 2 + 2")):
        assert RougeFilter([a]).max_similarity(b) == pytest.approx(plain.score(a, b)["rougeL"].fmeasure)
