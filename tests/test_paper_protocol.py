"""Study 1 at paper scale (experiments/fake-privacy-paper.yaml): the file plans with stand-in inputs, row
ranges cut the study's parts from a file in file order, each fine-tune is compared with its own base, and the
`ranges` dataset option and the `auto` sampling backend behave. No model is loaded (the models are hub ids)."""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from leakaudit import resources
from leakaudit.config import load_experiment, parse_experiment
from leakaudit.errors import InputError
from leakaudit.experiment import Plan, check_plan, model_identity, run_plan

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "leakaudit" / "resources" / "experiments" / "fake-privacy-paper.yaml"
MODELS = {"pythia-410m": "EleutherAI/pythia-410m", "pythia-1b": "EleutherAI/pythia-1b",
          "pythia-1.4b": "EleutherAI/pythia-1.4b", "pythia-2.8b": "EleutherAI/pythia-2.8b",
          "pythia-6.9b": "EleutherAI/pythia-6.9b", "opt-1.3b": "facebook/opt-1.3b", "opt-2.7b": "facebook/opt-2.7b"}
N_PIL = 3330  # the study's file: rows 1110 on are its last 2,220


def _quiet(_msg: str) -> None:
    pass


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture
def paper(tmp_path, monkeypatch):
    """The paper file copied into tmp_path with stand-in inputs in tmp_path/data (dataset paths resolve
    against the file, option paths against the working directory), loaded and planned."""
    shutil.copy(PAPER, tmp_path / "fake-privacy-paper.yaml")
    pil = [{"text": f"Message {i}: write to Person {i} at person{i}@enron.com",
            "pairs": [{"name": f"Person {i}", "email": f"person{i}@enron.com"}]} for i in range(N_PIL)]
    _write_jsonl(tmp_path / "data" / "pil-enron.jsonl", pil)
    _write_jsonl(tmp_path / "data" / "pile-members.jsonl", [{"text": f"member text {i}"} for i in range(20)])
    _write_jsonl(tmp_path / "data" / "pile-nonmembers.jsonl", [{"text": f"other text {i}"} for i in range(20)])
    shutil.copy(resources.path("self-instruct-seed", "seed_tasks.jsonl"), tmp_path / "data" / "seed_tasks.jsonl")
    monkeypatch.chdir(tmp_path)
    plan = Plan(load_experiment(tmp_path / "fake-privacy-paper.yaml"))
    return plan, pil, tmp_path


def test_paper_file_plans_with_stand_in_inputs_and_the_expected_stages(paper):
    plan, _, _ = paper
    check_plan(plan)  # every option known to its kind / FinetuneConfig; no model is resolved (hub ids, offline)
    exp = plan.exp
    assert exp.models == {"generator": "EleutherAI/pythia-12b", **MODELS}
    counts = Counter(s.kind for s in plan.stages.values())
    per_model = 1 + 3 * 3  # the base + 3 data sets x 3 methods
    assert counts == {"dataset": 3, "generate": 3, "finetune": 7 * 3 * 3, "pii": 7 * per_model,
                      "pii-logprob": 7 * per_model, "mia": 7 * per_model, "perplexity": 7 * per_model}

    tunes = [s for s in plan.stages.values() if s.kind == "finetune"]
    data_of = {"generate/gen": "gen", "generate/replaced": "replaced", "generate/selfinstruct": "selfinstruct"}
    grid = {(s.params["model"]["spec"], s.params["method"], data_of[s.params["data"][0]]) for s in tunes}
    assert grid == set(itertools.product(MODELS.values(), ["lora", "dora", "pissa"], data_of.values()))
    for s in tunes:
        o = s.params["options"]
        assert (o["lora_r"], o["lora_alpha"], o["lora_dropout"], o["learning_rate"], o["epochs"]) == (64, 16, 0.05,
                                                                                                     2e-6, 4)
        assert (o["batch_size"], o["gradient_accumulation"]) == (1, 8)
        linear = (["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"] if "opt" in s.params["model"]["spec"]
                  else ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])
        assert o["target_modules"] == linear
        if s.params["data"][0] == "generate/selfinstruct":
            assert o["format"] == "plain"
        else:
            assert (o["format"], o["prompt_field"], o["response_field"]) == ("instruction", "prompt", "generated")

    gen = plan.stages["generate/gen"]
    assert gen.params["model"] == {"spec": "EleutherAI/pythia-12b"} and gen.params["data"] == ["data/pil",
                                                                                                "prompts.jsonl"]
    assert gen.params["options"] == {"prompt_tokens": 50, "max_new_tokens": 1000, "temperature": 0.75,
                                     "top_k": 100, "backend": "auto"}
    assert plan.stages["generate/replaced"].params["data"] == ["generate/gen", "data.jsonl"]
    assert plan.stages["generate/selfinstruct"].params["options"]["seed_tasks"] == "data/seed_tasks.jsonl"

    evals = [s for s in plan.stages.values() if s.id.startswith("evaluate/")]
    for s in evals:
        roles = {r: s.params.get(r) for r in ("data", "members", "nonmembers") if s.params.get(r)}
        assert roles == {"pii": {"data": ["data/pil", "targets.jsonl"]},
                         "pii-logprob": {"data": ["data/pil", "targets.jsonl"]},
                         "perplexity": {"data": ["data/pil", "ppl.jsonl"]},
                         "mia": {"members": ["data/pile-members", "all.jsonl"],
                                 "nonmembers": ["data/pile-nonmembers", "all.jsonl"]}}[s.kind]
    pii = [s for s in evals if s.kind == "pii"]
    assert all(s.params["options"]["temperatures"] == [0.01, 0.1, 0.2, 0.5, 0.75, 1.0, 1.25, 1.5] for s in pii)


def test_each_fine_tune_is_compared_with_its_own_base(paper):
    """compare_to names a target of the same evaluation, and every other target of it is a fine-tune of
    exactly that model: no variant is paired with another model's base."""
    plan, _, _ = paper
    groups: dict[str, list] = {}
    for s in plan.stages.values():
        if s.kind in ("pii", "pii-logprob", "mia"):
            groups.setdefault(s.params["evaluation"], []).append(s)
    assert len(groups) == 3 * 7
    for stages in groups.values():
        (base,) = {s.params["options"]["compare_to"] for s in stages}
        labels = [s.params["target_label"] for s in stages]
        assert base in labels and len(labels) == 10
        for s in stages:
            if s.params["target_label"] != base:
                tuned = plan.stages[s.params["target"]["stage"]]
                assert tuned.params["model"] == {"spec": model_identity(plan.exp.models[base])}


def test_row_ranges_cut_the_study_parts_in_file_order(paper):
    """Only the dataset stages, through the engine: targets = rows 0-999, ppl = rows 0-1109, prompts = rows
    1110 on (the last 2,220 of the study's 3,330), in file order with every field kept."""
    plan, pil, tmp = paper
    plan.stages = {sid: s for sid, s in plan.stages.items() if s.kind == "dataset"}
    assert run_plan(plan, tmp / "out", log=_quiet) == {"data/pil": "ran", "data/pile-members": "ran",
                                                       "data/pile-nonmembers": "ran"}
    d = tmp / "out" / "data" / "pil"
    texts = {p: [r["text"] for r in _read_jsonl(d / f"{p}.jsonl")] for p in ("all", "targets", "ppl", "prompts")}
    file_texts = [r["text"] for r in pil]
    assert texts["all"] == file_texts  # not shuffled: row i is file row i
    assert texts["targets"] == file_texts[:1000] and texts["ppl"] == file_texts[:1110]
    assert texts["prompts"] == file_texts[1110:] == file_texts[-2220:]
    assert _read_jsonl(d / "targets.jsonl")[7]["pairs"] == pil[7]["pairs"]  # the targets' pairs travel along
    assert len(_read_jsonl(tmp / "out" / "data" / "pile-members" / "all.jsonl")) == 20


SMALL = "name: x\nmodels: {base: tiny-gpt-neox}\ndatasets:\n  P:\n    path: p.jsonl\n"


def test_ranges_follow_python_slices_and_an_empty_range_is_one_error(tmp_path):
    _write_jsonl(tmp_path / "p.jsonl", [{"text": f"t{i}"} for i in range(10)])
    (tmp_path / "e.yaml").write_text(SMALL + "    ranges: {head: [null, 3], tail: [-2, null], mid: [-5, 8],"
                                              " all_but_last: [0, -1]}\n")
    plan = Plan(load_experiment(tmp_path / "e.yaml"))
    run_plan(plan, tmp_path / "out", log=_quiet)
    got = {p: [r["text"] for r in _read_jsonl(tmp_path / "out" / "data" / "P" / f"{p}.jsonl")]
           for p in ("head", "tail", "mid", "all_but_last")}
    rows = [f"t{i}" for i in range(10)]
    assert got == {"head": rows[:3], "tail": rows[-2:], "mid": rows[-5:8], "all_but_last": rows[:-1]}
    (tmp_path / "e.yaml").write_text(SMALL + "    ranges: {late: [20, null]}\n")
    with pytest.raises(InputError) as exc:
        run_plan(Plan(load_experiment(tmp_path / "e.yaml")), tmp_path / "out2", log=_quiet)
    assert (exc.value.message, exc.value.field) == ("stage data/P: range 'late' is empty (10 rows in all)",
                                                  "datasets.P.ranges.late")
    lines = (tmp_path / "e.yaml").read_text().splitlines()  # a stage's error names the key's line too
    assert exc.value.file == str(tmp_path / "e.yaml") and lines[exc.value.line - 1].strip().startswith("ranges:")


@pytest.mark.parametrize(("extra", "field", "message"), [
    ("    split: {a: 0.5}\n    ranges: {b: [0, 3]}\n", "datasets.P.ranges", "cannot be combined with 'split'"),
    ("    unions: {u: [a]}\n    ranges: {b: [0, 3]}\n", "datasets.P.ranges", "cannot be combined with 'unions'"),
    ("    split_by: user\n    holdout_per_user: 2\n    ranges: {b: [0, 3]}\n", "datasets.P.ranges",
     "cannot be combined with 'holdout_per_user'"),
    ("    ranges: {a: [0]}\n", "datasets.P.ranges", "range of 'a' must be [start, end]"),
    ("    ranges: {a: [0, 1, 2]}\n", "datasets.P.ranges", "range of 'a' must be [start, end]"),
    ("    ranges: {a: [5, 2]}\n", "datasets.P.ranges", "range of 'a' is empty: start 5 is not before end 2"),
    ("    ranges: {a: [0, 1.5]}\n", "datasets.P.ranges.a[1]", "valid integer"),
    ("    ranges: {a: [0, true]}\n", "datasets.P.ranges.a[1]", "valid integer"),
    ("    ranges: {all: [0, 2]}\n", "datasets.P.ranges", "part 'all' is the whole dataset"),
    ("    ranges: {a.b: [0, 2]}\n", "datasets.P.ranges.a.b", "invalid name"),
    ("    ranges: [0, 2]\n", "datasets.P.ranges", "valid dictionary"),
])
def test_invalid_ranges_are_one_line_errors_naming_the_field(extra, field, message):
    with pytest.raises(InputError) as exc:
        parse_experiment(SMALL + extra, "e.yaml")
    assert exc.value.field == field and message in exc.value.message
    assert exc.value.line == (SMALL + extra).splitlines().index(next(
        x for x in (SMALL + extra).splitlines() if x.strip().startswith("ranges"))) + 1
    assert "\n" not in str(exc.value)


def test_invalid_ranges_from_the_command_line_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    from leakaudit.cli import main

    (tmp_path / "e.yaml").write_text(SMALL + "    split: {a: 0.5}\n    ranges: {b: [0, 3]}\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(sys, "argv", ["leakaudit", "run", str(tmp_path / "e.yaml"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {tmp_path / 'e.yaml'}:7: field 'datasets.P.ranges': cannot be combined")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output dir made


def test_datasets_without_ranges_keep_their_stage_keys():
    """Keys of dataset stages written before `ranges` existed (main at 9b574ee): an upgrade reruns nothing."""
    text = ("name: k\nmodels: {base: tiny-gpt-neox}\ndatasets:\n"
            "  P: {builtin: enron-exposure, limit: 50, split: {targets: 0.5, nonmembers: 0.5}}\n"
            "  Q: {builtin: dolly, limit: 10}\n")
    plan = Plan(parse_experiment(text))
    assert (plan.stages["data/P"].key, plan.stages["data/Q"].key) == ("f3bb83b3712f5dbeaf649bd9",
                                                                      "417b2b5b5ea10fa4e1a542b5")
    assert "ranges" not in plan.stages["data/P"].params


# ----------------------------------------------------------------------------------------- backend: auto
class _Lm:
    spec = "some/model"
    device = torch.device("cuda")

    @staticmethod
    def changed_since_loaded() -> bool:
        return False


def test_auto_backend_takes_vllm_only_where_it_can_run(monkeypatch):
    import importlib.util

    import torch

    import leakaudit.models
    from leakaudit.kinds.continuation import ContinuationOptions
    from leakaudit.sampling import resolve_backend

    assert ContinuationOptions(backend="auto").backend == "auto"
    with pytest.raises(ValueError, match="'hf', 'vllm' or 'auto'"):
        ContinuationOptions(backend="fast")
    real_find_spec = importlib.util.find_spec
    installed = {"vllm": True}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" and installed["vllm"] else real_find_spec(name, *a))
    gpu = {"on": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu["on"])
    kind = {"of": "dir"}
    monkeypatch.setattr(leakaudit.models, "resolve_spec", lambda spec: (kind["of"], spec))
    assert resolve_backend(_Lm(), "auto") == "vllm"
    kind["of"] = "adapter"  # the vLLM adapter takes full saved models only
    assert resolve_backend(_Lm(), "auto") == "hf"
    kind["of"], gpu["on"] = "dir", False
    assert resolve_backend(_Lm(), "auto") == "hf"
    gpu["on"], installed["vllm"] = True, False
    assert resolve_backend(_Lm(), "auto") == "hf"
    assert resolve_backend(_Lm(), "vllm") == "vllm" and resolve_backend(_Lm(), "hf") == "hf"
