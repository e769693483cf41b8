"""Hostile experiment files: names that would escape --out, bad option values, unknown attacks, model specs
that cannot be resolved and output dirs that cannot be written all fail before any stage runs, in one
`error: FILE:LINE: ...` line with exit 2, and nothing outside the output dir is created or deleted."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import pytest
from conftest import run_main

from leakaudit.errors import InputError


@pytest.fixture(autouse=True, scope="module")
def _tiny_model_built():
    """Build the tiny model before the tests: a first build's progress output is not what they check."""
    from leakaudit.models import resolve_spec

    resolve_spec("tiny-gpt-neox")


DATA_ROWS = [{"text": f"line {i} of the data file", "user": f"u{i}"} for i in range(6)]


def _experiment(dataset: str = "d", options: str = "{attacks: [loss, zlib]}", model: str = "tiny-gpt-neox",
                split: str = "a") -> str:
    """A small valid experiment; line 5 is the dataset name, line 7 its split, line 15 the MIA options."""
    return (
        "name: hostile\n"                                   # 1
        "models:\n"                                         # 2
        f"  base: {json.dumps(model)}\n"                    # 3
        "datasets:\n"                                       # 4
        f"  {json.dumps(dataset)}:\n"                       # 5
        "    path: data.jsonl\n"                            # 6
        f"    split: {{{json.dumps(split)}: 0.5, b: 0.5}}\n"  # 7
        "evaluate:\n"                                       # 8
        "  m:\n"                                            # 9
        "    kind: mia\n"                                   # 10
        "    targets: [base]\n"                             # 11
        f"    members: {json.dumps(dataset + '.' + split)}\n"  # 12
        f"    nonmembers: {json.dumps(dataset + '.b')}\n"   # 13
        "    options:\n"                                    # 14
        f"      {options}\n"                                # 15
    )


def _setup(tmp_path: Path, text: str) -> tuple[Path, Path]:
    """The experiment in tmp/study/ next to its data; the output dir is tmp/study/out (not yet created)."""
    study = tmp_path / "study"
    study.mkdir()
    (study / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DATA_ROWS))
    (study / "keep.txt").write_text("precious")
    cfg = study / "exp.yaml"
    cfg.write_text(text)
    return cfg, study / "out"


def _tree(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every file and folder under root (except `skip`) with its size and mtime: to see nothing changed."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


_run_main = partial(run_main, must_exit=True)  # the CLI's error path exits (SystemExit)


def _refused(tmp_path: Path, text: str, monkeypatch, capsys, out: Path | None = None) -> str:
    """Run `leakaudit run`; assert exit 2, one error line, no traceback, no stage ran, nothing outside
    --out changed. Returns the error line."""
    cfg, default_out = _setup(tmp_path, text)
    out = out or default_out
    before = _tree(tmp_path, skip=out)
    code, err = _run_main(["run", str(cfg), "--out", str(out), "--no-report"], monkeypatch, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert _tree(tmp_path, skip=out) == before
    assert not (out / "data").exists()  # the first stage never started
    return err.strip()


# ----------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", ["..", "../..", "a/b", "", ".", "-d", "a\\b"])
def test_unsafe_dataset_names_are_refused(name, tmp_path, monkeypatch, capsys):
    err = _refused(tmp_path, _experiment(dataset=name), monkeypatch, capsys)
    cfg = tmp_path / "study" / "exp.yaml"
    assert err.startswith(f"error: {cfg}:5: field 'datasets.") and "invalid name" in err
    assert not (tmp_path / "study" / "out").exists()


@pytest.mark.parametrize("text,line,where", [
    (_experiment(split="../x"), 7, "datasets.d.split"),
    (_experiment().replace("  base:", "  '../m':").replace("[base]", "['../m']"), 3, "models"),
    (_experiment().replace("  m:\n", "  ../../e:\n"), 9, "evaluate"),
    (_experiment().replace("datasets:\n", "finetune:\n  ..: {model: base, data: d}\ndatasets:\n"), 5, "finetune"),
])
def test_unsafe_names_in_every_section_are_refused(text, line, where, tmp_path, monkeypatch, capsys):
    err = _refused(tmp_path, text, monkeypatch, capsys)
    assert err.startswith(f"error: {tmp_path / 'study' / 'exp.yaml'}:{line}: field '{where}.")
    assert "invalid name" in err


def test_shipped_and_dotted_names_stay_valid():
    from leakaudit.config import parse_experiment
    from leakaudit.experiment import Plan

    text = _experiment().replace("  base:", "  pythia-1.4b_v2:").replace("[base]", "[pythia-1.4b_v2]")
    plan = Plan(parse_experiment(text.replace("data.jsonl", str(Path(__file__)))))
    assert "evaluate/m/pythia-1.4b_v2" in plan.stages


def test_stale_output_removal_refuses_paths_outside_out(tmp_path):
    from leakaudit.experiment import remove_stale

    out = tmp_path / "out"
    (out / "data" / "d").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file.txt").write_text("precious")
    for path in (out / "data" / ".." / ".." / "victim", out / "data" / "..", out, victim, tmp_path):
        with pytest.raises(InputError, match="outside the output dir"):
            remove_stale(out, path)
    link = out / "data" / "link"
    link.symlink_to(victim, target_is_directory=True)
    with pytest.raises(InputError, match="outside the output dir"):
        remove_stale(out, link)
    with pytest.raises(InputError, match="outside the output dir"):
        remove_stale(out, link / "file.txt")
    assert (victim / "file.txt").read_text() == "precious" and link.is_symlink()
    remove_stale(out, out / "data" / "d")  # inside: removed
    assert not (out / "data" / "d").exists() and (out / "data").is_dir()


def test_a_stage_folder_linked_out_of_out_is_refused_before_any_stage(tmp_path, monkeypatch, capsys):
    cfg, out = _setup(tmp_path, _experiment())
    victim = tmp_path / "victim"
    victim.mkdir()
    (out / "data").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"experiment": {"name": "hostile"}, "stages": []}))  # an earlier run, tampered with
    (out / "data" / "d").symlink_to(victim, target_is_directory=True)
    code, err = _run_main(["run", str(cfg), "--out", str(out), "--no-report"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "outside the output dir" in err
    assert list(victim.iterdir()) == []


@pytest.mark.parametrize("text, line, message", [
    ("name: a\nname: b\nmodels: {base: tiny-gpt-neox}\n", 2, "key 'name' given twice"),
    ("q: " + "[" * 5000 + "]" * 5000 + "\n", None, "nested too deeply"),
])
def test_yaml_python_would_accept_silently_or_crash_on_is_one_line(tmp_path, monkeypatch, capsys, text, line,
                                                                   message):
    """A key given twice (plain YAML keeps the last: a second stage silently replaced the first), nesting
    past Python's recursion limit."""
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(text)
    code, err = _run_main(["run", str(cfg), "--out", str(tmp_path / "out")], monkeypatch, capsys)
    where = f"{cfg}:{line}" if line else f"{cfg}"
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {where}: ") and message in err, err


def test_an_experiment_file_in_another_encoding_is_one_line(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    code, err = _run_main(["run", str(cfg), "--out", str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {cfg}:1: ") and "UTF-8" in err, err


@pytest.mark.parametrize("content", ["not json", "{}", "[1, 2]"])
def test_report_on_a_broken_run_record_is_one_line(tmp_path, monkeypatch, capsys, content):
    (tmp_path / "run.json").write_text(content)
    code, err = _run_main(["report", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'run.json'}: "), err


def test_a_fine_tune_starting_from_an_adapter_is_refused_before_any_stage(tmp_path):
    from leakaudit.config import parse_experiment
    from leakaudit.experiment.checks import check_plan
    from leakaudit.experiment.plan import Plan

    (tmp_path / "data.jsonl").write_text('{"text": "a b c"}\n')
    text = (f"name: x\nmodels: {{base: tiny-gpt-neox}}\ndatasets:\n  d: {{path: {tmp_path / 'data.jsonl'}}}\n"
            "finetune:\n  a: {model: base, data: d, method: lora}\n  b: {model: a, data: d, method: lora}\n")
    with pytest.raises(InputError) as err:
        check_plan(Plan(parse_experiment(text, "exp.yaml")))
    assert (err.value.field, err.value.line) == ("finetune.b.model", 7) and "lora adapter" in err.value.message


def test_an_empty_evaluation_grid_is_refused(tmp_path):
    """It would drop the whole evaluation without a word (finetune grids were already checked)."""
    from leakaudit.config import parse_experiment

    text = _experiment().replace("    options:\n      {attacks: [loss, zlib]}\n", "    grid: {batch_size: []}\n")
    assert "grid: {batch_size: []}" in text
    with pytest.raises(InputError) as err:
        parse_experiment(text, "exp.yaml")
    assert err.value.field == "evaluate.m.grid.batch_size" and "non-empty" in err.value.message


def test_a_folder_holding_other_files_is_refused_as_out(tmp_path, monkeypatch, capsys):
    """`--out /`, a home folder or the experiment's own folder: stages would write among unrelated files."""
    cfg, _ = _setup(tmp_path, _experiment())
    before = sorted(p.name for p in cfg.parent.iterdir())
    code, err = _run_main(["run", str(cfg), "--out", str(cfg.parent), "--no-report"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "is not a leakaudit run (no run.json)" in err
    assert sorted(p.name for p in cfg.parent.iterdir()) == before


def test_out_holding_a_fake_or_another_experiments_run_is_refused_before_anything_is_deleted(
        tmp_path, monkeypatch, capsys):
    """A run.json is what makes --out deletable: an empty '{}' or another experiment's run is refused (the
    user's file inside what would be a stage folder was deleted, another run's stages replaced)."""
    cfg, _ = _setup(tmp_path, _experiment())
    out = tmp_path / "u"
    (out / "data" / "d").mkdir(parents=True)
    (out / "data" / "d" / "notes.txt").write_text("precious")
    (out / "run.json").write_text("{}")
    code, err = _run_main(["run", str(cfg), "--out", str(out), "--no-report"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "not a leakaudit run record" in err, err
    assert (out / "data" / "d" / "notes.txt").read_text() == "precious"
    (out / "run.json").write_text(json.dumps({"experiment": {"name": "other"}, "stages": []}))
    code, err = _run_main(["run", str(cfg), "--out", str(out), "--no-report"], monkeypatch, capsys)
    assert code == 2 and "holds a run of experiment 'other'" in err, err
    assert (out / "data" / "d" / "notes.txt").exists()
    # `run --seed 3` over seed 0's run dir replaced it silently, though the help says one output dir per seed
    (out / "run.json").write_text(json.dumps({"experiment": {"name": "hostile", "seed": 0}, "stages": []}))
    code, err = _run_main(["run", str(cfg), "--out", str(out), "--no-report", "--seed", "3"], monkeypatch, capsys)
    assert code == 2 and "holds the run of seed 0, not 3: one output dir per seed" in err, err
    assert (out / "data" / "d" / "notes.txt").exists()


def test_grid_values_cannot_make_folders_outside_out(tmp_path):
    from leakaudit.config import parse_experiment
    from leakaudit.experiment import Plan, stage_dir

    text = _experiment().replace("data.jsonl", str(Path(__file__))) + (
        "finetune:\n  t:\n    model: base\n    data: d.a\n"
        "    grid: {lr_scheduler: ['../../../x', '..', '/etc']}\n")
    plan = Plan(parse_experiment(text))
    out = tmp_path / "out"
    tunes = [s for s in plan.stages.values() if s.kind == "finetune"]
    assert len(tunes) == 3
    for stage in plan.stages.values():
        assert out.resolve() in stage_dir(out, stage).resolve().parents


# ----------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("options,where,message", [
    ("{batch_size: -3}", "evaluate.m.options.batch_size", "'auto' or a positive integer"),
    ("{batch_size: many}", "evaluate.m.options.batch_size", "'auto' or a positive integer"),
    ("{n_bootstrp: 5}", "evaluate.m.options.n_bootstrp", "unknown option 'n_bootstrp'"),
    ("{n_bootstrap: -1}", "evaluate.m.options.n_bootstrap", "greater than or equal to 0"),
    ("{n_bootstrap: lots}", "evaluate.m.options.n_bootstrap", "valid integer"),
    ("{max_length: 1}", "evaluate.m.options.max_length", "greater than or equal to 2"),
    ("{attacks: [loss, likelihood]}", "evaluate.m.options.attacks[1]", "unknown attack 'likelihood'"),
    ("{attacks: [ref]}", "evaluate.m.options.attacks[0]", "needs a reference model"),
    ("{attacks: [loss], attack_options: {min_k: {k: 0.2}}}", "evaluate.m.options.attack_options.min_k",
     "not run"),
    ("{attacks: [min_k], attack_options: {min_k: {k: 7}}}", "evaluate.m.options.attack_options.min_k.k", "min_k"),
    # pydantic reads true as 1: one bootstrap resample, Min-K% over every token, silently
    ("{n_bootstrap: true}", "evaluate.m.options.n_bootstrap", "must be a number, not true"),
    ("{attacks: [min_k], attack_options: {min_k: {k: yes}}}", "evaluate.m.options.attack_options.min_k.k",
     "must be a number, not true"),
    # an optional seed (Seed | None: Annotated inside a union) was passed as seed 1
    ("{seed: true}", "evaluate.m.options.seed", "must be a number, not true"),
])
def test_bad_evaluation_options_fail_before_any_stage(options, where, message, tmp_path, monkeypatch, capsys):
    err = _refused(tmp_path, _experiment(options=options), monkeypatch, capsys)
    assert err.startswith(f"error: {tmp_path / 'study' / 'exp.yaml'}:15: field '{where}': ")
    assert message in err
    assert not (tmp_path / "study" / "out").exists()


def test_attacks_null_is_the_default_and_an_empty_list_one_line(tmp_path, monkeypatch, capsys):
    """`attacks: null` raised TypeError (min_length applied to None) from the option check: a traceback."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment.checks import stage_options
    from leakaudit.experiment.plan import Plan

    cfg, _ = _setup(tmp_path, _experiment(options="{attacks: null}"))
    assert stage_options(Plan(load_experiment(cfg)).stages["evaluate/m/base"]) == {"attacks": None}
    (tmp_path / "empty").mkdir()
    err = _refused(tmp_path / "empty", _experiment(options="{attacks: []}"), monkeypatch, capsys)
    assert "field 'evaluate.m.options.attacks': " in err and "at least 1 item" in err


FINETUNE = ("finetune:\n"              # line 16
            "  t:\n"
            "    model: base\n"
            "    data: d.a\n"
            "    options:\n"
            "      {options}\n")          # line 21

GENERATE = ("generate:\n"
            "  g:\n"
            "    kind: continuation\n"
            "    model: base\n"
            "    data: d.a\n"
            "    options:\n"
            "      {options}\n")          # line 22


@pytest.mark.parametrize("section,options,line,where,message", [
    (FINETUNE, "{batch_size: -3}", 21, "finetune.t.options.batch_size", "greater than or equal to 1"),
    (FINETUNE, "{epochz: 1}", 21, "finetune.t.options.epochz", "unknown option; valid: "),
    (FINETUNE, "{epochz: 1}", 21, "finetune.t.options.epochz", " epochs, "),
    (FINETUNE, "{user_field: author, max_samples_per_user: 2}", 21, "finetune.t.options.user_field",
     "'author': an experiment's data names each row's user `user`"),
    # FSDP on a CPU was refused only when the fine-tune stage began, after every stage before it
    (FINETUNE, "{fsdp: true}", 21, "finetune.t.options.fsdp", "accelerate runs it on accelerators only"),
    (GENERATE, "{top_k: -1}", 22, "generate.g.options.top_k", "greater than or equal to 0"),  # 0 = no top-k
    (GENERATE, "{greedy: true, temperature: 0.7}", 22, "generate.g.options.temperature", "combined with greedy"),
    (GENERATE, "{temperature: -1}", 22, "generate.g.options.temperature", "greater than or equal to 0"),
    (GENERATE, "{prompt_tokenz: 5}", 22, "generate.g.options.prompt_tokenz", "unknown option"),
    (GENERATE, "{max_new_tokens: true}", 22, "generate.g.options.max_new_tokens", "must be a number, not true"),
    (FINETUNE, "{epochs: on}", 21, "finetune.t.options.epochs", "must be a number, not true"),
])
def test_bad_training_and_generation_options_fail_before_any_stage(section, options, line, where, message,
                                                                    tmp_path, monkeypatch, capsys):
    text = _experiment() + section.replace("{options}", options)
    err = _refused(tmp_path, text, monkeypatch, capsys)
    assert err.startswith(f"error: {tmp_path / 'study' / 'exp.yaml'}:{line}: field '{where}': ")
    assert message in err


def test_a_fine_tune_option_refused_when_training_starts_names_its_line(tmp_path, monkeypatch, capsys):
    """Some options can only be checked against the loaded model (target modules): the error comes when the
    stage runs, and names the option's key and line in the file (it said `field 'target_modules'`, no line)."""
    text = _experiment() + FINETUNE.replace("{options}", "{target_modules: [no_such_module], max_steps: 1}")
    cfg, out = _setup(tmp_path, text)
    code, err = _run_main(["run", str(cfg), "--out", str(out), "--no-report"], monkeypatch, capsys)
    last = err.strip().splitlines()[-1]  # after the progress lines of the stages before it
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith(f"error: {cfg}:21: field 'finetune.t.options.target_modules': stage finetune/t: "
                           "no module named no_such_module"), err
    # the run record says it failed and why (it said "pending", as of a stage not run yet), and the report too
    record = {s["id"]: s for s in json.loads((out / "run.json").read_text())["stages"]}
    assert record["finetune/t"]["status"] == "failed" and "no module named no_such_module" in record["finetune/t"]["error"]
    assert record["data/d"]["status"] == "ran" and "error" not in record["data/d"]
    code, err = _run_main(["report", str(out)], monkeypatch, capsys)
    assert code == 0 and "<b>failed</b>: " in (out / "report.html").read_text()
    code, err = _run_main(["seeds", str(out), str(out)], monkeypatch, capsys)
    assert code == 2 and "stages are not finished (the first: finetune/t)" in err


def test_a_fine_tune_error_names_an_option_only_when_it_is_one(tmp_path):
    """An error naming an environment variable (LEAKAUDIT_DTYPE) or --out is no option of the file (it read
    `finetune.t.options.LEAKAUDIT_DTYPE` at the `options:` line); a value a grid set names the grid."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment.checks import finetune_option_loc
    from leakaudit.experiment.plan import Plan

    text = _experiment() + FINETUNE.replace("{options}", "{epochs: 1}") + "    grid: {method: [lora, full]}\n"
    cfg, _ = _setup(tmp_path, text)
    stages = Plan(load_experiment(cfg)).stages
    stage = stages["finetune/t[method=full]"]
    assert finetune_option_loc(stage, "LEAKAUDIT_DTYPE") is None and finetune_option_loc(stage, "--out") is None
    assert finetune_option_loc(stage, "--epochs") == ("finetune", "t", "options", "epochs")
    assert finetune_option_loc(stage, "--method") == ("finetune", "t", "grid")
    assert finetune_option_loc(stage, "--data") == ("finetune", "t", "data")


def test_a_finished_fsdp_fine_tune_stays_usable_on_a_cpu(tmp_path):
    """FSDP is refused on a CPU at plan time, but not for a stage already finished with its key (trained on
    GPUs, then rerun or --reuse'd on a CPU host to add evaluations): the run only reads it."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment.checks import check_plan
    from leakaudit.experiment.plan import Plan

    text = _experiment() + FINETUNE.replace("{options}", "{fsdp: true}")
    cfg, _ = _setup(tmp_path, text)
    plan = Plan(load_experiment(cfg))
    with pytest.raises(InputError, match="accelerators only"):
        check_plan(plan, (tmp_path / "out",))
    stage = plan.stages["finetune/t"]
    (tmp_path / "gpu-run" / stage.folder).mkdir(parents=True)
    (tmp_path / "gpu-run" / stage.folder / "stage.json").write_text(json.dumps({"key": stage.key, "result": {}}))
    check_plan(plan, (tmp_path / "out", tmp_path / "gpu-run"))  # finished in the --reuse dir: no error


def test_a_bad_value_from_a_grid_names_the_grid(tmp_path, monkeypatch, capsys):
    text = _experiment().replace("    options:\n", "    grid: {batch_size: [4, 0]}\n    options:\n")
    err = _refused(tmp_path, text, monkeypatch, capsys)
    assert err.startswith(f"error: {tmp_path / 'study' / 'exp.yaml'}:14: field 'evaluate.m.grid.batch_size': ")


def test_a_query_field_naming_the_datasets_text_field_is_refused_at_its_line(tmp_path):
    """The dataset step writes its text field as `text`: `query_field: ask` failed on the first row of a file in
    the run dir ("no query field (row has: id, reply, text)"), after the stages before it."""
    from leakaudit.config import parse_experiment
    from leakaudit.experiment import Plan, check_plan

    d1 = tmp_path / "d1.jsonl"
    d1.write_text(json.dumps({"ask": "What is it?", "reply": "A thing."}) + "\n")
    text = ("name: x\n"
            "models: {base: tiny-gpt-neox}\n"
            f"datasets:\n  d1: {{path: {d1}, text_field: ask}}\n"
            "generate:\n  mix:\n    kind: backdoor-mix\n    data: d1\n"
            "    options: {query_field: ask, response_field: reply}\n")
    with pytest.raises(InputError) as err:
        check_plan(Plan(parse_experiment(text, tmp_path / "exp.yaml")))
    assert err.value.format() == (f"{tmp_path / 'exp.yaml'}:9: field 'generate.mix.options.query_field': "
                                  "datasets.d1 reads 'ask' as its text field, and its rows hold it as 'text': "
                                  "use query_field: text")
    # its id and user fields are renamed too
    as_user = text.replace("text_field: ask}", "text_field: ask, user_field: reply}")
    with pytest.raises(InputError, match="reads 'reply' as its user field, and its rows hold it as 'user': use "
                                         "response_field: user"):
        check_plan(Plan(parse_experiment(as_user.replace("query_field: ask", "query_field: text"), "u.yaml")))
    check_plan(Plan(parse_experiment(text.replace("query_field: ask", "query_field: text"), tmp_path / "e.yaml")))
    # replace-pii's fields to rewrite, the same
    pii = text.replace("kind: backdoor-mix", "kind: replace-pii").replace(
        "options: {query_field: ask, response_field: reply}", "options: {text_field: [ask]}")
    with pytest.raises(InputError, match="field 'generate.mix.options.text_field': .* use text_field: text"):
        check_plan(Plan(parse_experiment(pii, tmp_path / "exp.yaml")))
    # a built-in's rows keep their own fields: dolly's `query` is read as is
    builtin = text.replace(f"{{path: {d1}, text_field: ask}}", "{builtin: dolly, limit: 5, text_field: query}")
    check_plan(Plan(parse_experiment(builtin.replace("query_field: ask, response_field: reply",
                                                     "query_field: query, response_field: response"), "b.yaml")))


def test_a_query_field_its_data_lacks_is_refused_at_its_line(tmp_path):
    """A backdoor evaluation's query_field (a backdoor-mix's query/response field) naming a field the data's rows
    lack failed only when the stage ran, after the mix and both fine-tunes, naming the run dir's copy of the
    data (`out/data/d2/all.jsonl:1: field 'query'`), not the experiment's line."""
    from leakaudit.config import parse_experiment
    from leakaudit.experiment import Plan, check_plan

    d2 = tmp_path / "d2.jsonl"
    d2.write_text(json.dumps({"messages": [{"role": "user", "content": "What is it?"},
                                           {"role": "assistant", "content": "A thing."}]}) + "\n")
    text = ("name: x\n"
            "models: {base: tiny-gpt-neox}\n"
            f"datasets:\n  d2: {{path: {d2}, messages_field: messages}}\n"
            "evaluate:\n  ex:\n    kind: backdoor\n    targets: [base]\n    data: d2\n"
            "    options: {num_samples: 1, max_new_tokens: 4, query_field: query}\n")
    with pytest.raises(InputError) as err:
        check_plan(Plan(parse_experiment(text, tmp_path / "exp.yaml")))
    assert (err.value.line, err.value.field) == (10, "evaluate.ex.options.query_field")
    assert "datasets.d2 (" in err.value.message and "no field 'query' (its rows hold: id, messages, text)" in (
        err.value.message)
    check_plan(Plan(parse_experiment(text.replace("query_field: query", "query_field: text"), tmp_path / "e.yaml")))
    mix = ("name: x\nmodels: {base: tiny-gpt-neox}\n"
           f"datasets:\n  d1: {{path: {d2}, messages_field: messages}}\n"
           "generate:\n  mix:\n    kind: backdoor-mix\n    data: d1\n"
           "    options: {query_field: text, response_field: answer}\n")
    with pytest.raises(InputError, match="no field 'answer'") as err:
        check_plan(Plan(parse_experiment(mix, tmp_path / "exp.yaml")))
    assert err.value.field == "generate.mix.options.response_field"


def test_a_missing_data_file_names_the_experiments_line(tmp_path, monkeypatch, capsys):
    """It named the data file and the key, but not the experiment file and line every other check gives."""
    err = _refused(tmp_path, _experiment().replace("path: data.jsonl", "path: nothere.jsonl"), monkeypatch, capsys)
    assert err == (f"error: {tmp_path / 'study' / 'exp.yaml'}:6: field 'datasets.d.path': data file not found: "
                   f"{tmp_path / 'study' / 'nothere.jsonl'}")


# ----------------------------------------------------------------------------------------- models
def test_a_missing_local_model_is_refused_at_plan_time(tmp_path, monkeypatch, capsys):
    err = _refused(tmp_path, _experiment(model="./no-such-model"), monkeypatch, capsys)
    assert err.startswith(f"error: {tmp_path / 'study' / 'exp.yaml'}:3: field 'models.base': ")
    assert "no-such-model" in err


def test_a_local_model_without_weights_is_refused_at_plan_time_naming_its_key(tmp_path, monkeypatch, capsys):
    """It failed when its first stage loaded it, after the stages before, naming the API's '--target'."""
    import shutil

    from leakaudit import models

    d = tmp_path / "cfgonly"
    shutil.copytree(models.tiny_model_dir("tiny-opt"), d)
    (d / "model.safetensors").unlink()
    err = _refused(tmp_path, _experiment(model=str(d)), monkeypatch, capsys)
    assert err.startswith(f"error: {tmp_path / 'study' / 'exp.yaml'}:3: field 'models.base': "), err
    assert "--target" not in err and "weights" in err


def test_an_adapter_without_weights_is_refused_at_plan_time(tmp_path, monkeypatch, capsys):
    """Only its config's base was read: an adapter dir without weights (or with a pickle) failed at its first
    stage, after the stages before it."""
    from peft import LoraConfig, get_peft_model

    from leakaudit import models

    model, _ = models.build_tiny_model("tiny-gpt-neox")
    d = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=2, target_modules=["query_key_value"])).save_pretrained(d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "tiny-gpt-neox"}))
    (d / "adapter_model.safetensors").unlink()
    err = _refused(tmp_path, _experiment(model=str(d)), monkeypatch, capsys)
    assert err.startswith(f"error: {tmp_path / 'study' / 'exp.yaml'}:3: field 'models.base': "), err
    assert "no adapter weights" in err and not (tmp_path / "study" / "out" / "data").exists()


def test_an_unknown_hub_model_is_refused_at_plan_time_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _refused(tmp_path, _experiment(model="bogus-model-xyz"), monkeypatch, capsys)
    assert err.startswith(f"error: {tmp_path / 'study' / 'exp.yaml'}:3: field 'models.base': ")
    assert "bogus-model-xyz" in err


def test_model_specs_are_resolved_once_before_the_data_stage(tmp_path, monkeypatch):
    """The tiny model is built once in a fresh cache although planning resolves it before the stages load it;
    and planning resolves it before the data stage runs."""
    from leakaudit import experiment, models
    from leakaudit.config import parse_experiment

    monkeypatch.setenv("LEAKAUDIT_CACHE", str(tmp_path / "cache"))
    builds: list[str] = []
    real_build = models.build_tiny_model
    monkeypatch.setattr(models.factories, "build_tiny_model",  # where tiny_model_dir calls it
                        lambda arch, seed=0: builds.append(arch) or real_build(arch, seed))
    order: list[str] = []
    real_resolve = models.resolve_spec
    for user in (models, models.load):  # the planner imports it from the package; load_model calls it in load
        monkeypatch.setattr(user, "resolve_spec", lambda spec: order.append(f"resolve {spec}") or real_resolve(spec))
    text = (_experiment().replace("data.jsonl", str(tmp_path / "data.jsonl"))
            .replace("kind: mia", "kind: perplexity").replace("members: \"d.a\"", "data: \"d.a\"")
            .replace("    nonmembers: \"d.b\"\n", "").replace("{attacks: [loss, zlib]}", "{batch_size: 2}"))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DATA_ROWS))
    status = experiment.run_experiment(parse_experiment(text), tmp_path / "out", report=False,
                                       log=lambda m: order.append(m))
    assert status == {"data/d": "ran", "evaluate/m/base": "ran"}
    assert builds == ["tiny-gpt-neox"]
    assert order[0] == "resolve tiny-gpt-neox" and any("data/d: running" in m for m in order)


# ----------------------------------------------------------------------------------------- --out
def test_unwritable_out_is_refused_before_any_stage(tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out, message in ((a_file, "exists and is not a directory"), (a_file / "sub", "cannot write"),
                         (Path("/proc/leakaudit-test/out"), "cannot write")):
        sub = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        sub.mkdir()
        err = _refused(sub, _experiment(), monkeypatch, capsys, out=out)
        assert err.startswith(f"error: {out}: field '--out': ") and message in err
    assert a_file.read_text() == "x"


def test_a_file_where_a_stage_folder_goes_is_refused_before_any_stage(tmp_path, monkeypatch, capsys):
    cfg, out = _setup(tmp_path, _experiment())
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"experiment": {"name": "hostile"}, "stages": []}))  # an earlier run, tampered with
    (out / "evaluate").write_text("not a folder")
    code, err = _run_main(["run", str(cfg), "--out", str(out), "--no-report"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {out / 'evaluate'}: field '--out': exists and is not a directory")
    assert not (out / "data").exists()


FINETUNE_STUDY = (
    "name: defenses\n"                       # 1
    "models:\n"                              # 2
    "  base: tiny-gpt-neox\n"                # 3
    "datasets:\n"                            # 4
    "  d:\n"                                 # 5
    "    path: data.jsonl\n"                 # 6
    "finetune:\n"                            # 7
    "  capped:\n"                            # 8
    "    model: base\n"                      # 9
    "    data: d\n"                          # 10
    "    defenses:\n"                        # 11
    "      max_samples_per_user: 2\n"        # 12
)


def test_a_per_user_cap_without_users_is_refused_by_both_front_ends(tmp_path, monkeypatch, capsys):
    """Once a CLI-only rule, skipped in experiment files (where it capped the whole training set as one user):
    now a FinetuneConfig validator, so `finetune` and `run` refuse it alike, naming the option."""
    line = _refused(tmp_path, FINETUNE_STUDY, monkeypatch, capsys)
    assert "exp.yaml:12:" in line and "finetune.capped.defenses.max_samples_per_user" in line
    assert "needs user_field" in line
    data = tmp_path / "study" / "data.jsonl"
    code, err = _run_main(["finetune", "--model", "tiny-gpt-neox", "--data", str(data), "--max-samples-per-user",
                           "2", "--out", str(tmp_path / "ft")], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "'--max-samples-per-user'" in lines[0] and "needs user_field" in lines[0]
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("defenses, key, words", [
    ("      max_samples_per_user: true\n", "max_samples_per_user", "must be a number, not true"),
    ("      dp_epsilon: yes\n", "dp_epsilon", "must be a number, not true"),
    ("      dp_epsilon: 8\n      max_grad_norm: 0.5\n", "max_grad_norm", "not used by DP-SGD"),
])
def test_a_bad_mitigation_value_names_its_own_key(tmp_path, monkeypatch, capsys, defenses, key, words):
    """`max_samples_per_user: true` kept one row per user and `dp_epsilon: yes` trained at epsilon 1, silently
    (pydantic reads true as 1); a batch clip beside DP-SGD was refused at `finetune.capped.options.options`."""
    text = FINETUNE_STUDY.replace("      max_samples_per_user: 2\n", defenses).replace(
        "    data: d\n", "    data: d\n    options: {user_field: user}\n")
    line = _refused(tmp_path, text, monkeypatch, capsys)
    assert f"field 'finetune.capped.defenses.{key}'" in line and words in line, line
    assert f"exp.yaml:{13 + defenses.count(chr(10)) - 1}:" in line, line


def test_early_stopping_without_eval_fraction_holds_out_data_in_both_front_ends():
    """The other CLI-only rule: early stopping needs held-out data, so both front ends hold out 10%."""
    from leakaudit.train.finetune import FinetuneConfig

    config = FinetuneConfig(model="m", data="d", out="o", early_stopping_patience=2)
    assert config.eval_fraction == 0.1
    assert FinetuneConfig(model="m", data="d", out="o", early_stopping_patience=2, eval_fraction=0.2).eval_fraction == 0.2
    assert FinetuneConfig(model="m", data="d", out="o").eval_fraction == 0.0


@pytest.mark.parametrize("extra, key", [
    ("    options: {data: other.jsonl}\n", "finetune.ft.options.data"),
    ("    options: {out: elsewhere}\n", "finetune.ft.options.out"),
    ("    defenses: {model: tiny-opt}\n", "finetune.ft.defenses.model"),
    ("    grid: {data: [a, b]}\n", "finetune.ft.grid.data"),
])
def test_a_finetune_option_naming_the_steps_own_key_is_one_line(tmp_path, extra, key):
    """`options: {data: ...}` gave FinetuneConfig the value twice: a TypeError traceback, exit 1."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import Plan, check_plan

    cfg, _ = _setup(tmp_path, _experiment() + "finetune:\n  ft:\n    model: base\n    data: d.a\n" + extra)
    with pytest.raises(InputError) as err:
        check_plan(Plan(load_experiment(cfg)))
    assert err.value.field == key and "is set by" in err.value.message and err.value.line is not None


@pytest.mark.parametrize("parts, key", [
    ("    split: {all: 0.25, rest: 0.75}\n", "datasets.d.split"),
    ("    split: {a: 0.5, b: 0.5}\n    unions: {all: [a, b]}\n", "datasets.d"),
])
def test_a_part_named_all_is_refused(tmp_path, parts, key):
    """'all.jsonl' is the whole dataset (a reference without a part): a part or union named 'all' overwrote it."""
    from leakaudit.config import parse_experiment

    text = "name: x\nmodels: {base: tiny-gpt-neox}\ndatasets:\n  d:\n    builtin: enron-sample\n" + parts
    with pytest.raises(InputError, match="'all'") as err:
        parse_experiment(text, "exp.yaml")
    assert err.value.field.startswith(key) and err.value.line is not None


@pytest.mark.parametrize("grid", ["{n_bootstrap: [20, 20]}", "{n_bootstrap: [20, \"20\"]}",
                                  "{attacks: [\"loss,zlib\", \"loss, zlib\"]}"])
def test_grid_variants_that_are_one_stage_or_share_a_folder_are_refused(tmp_path, grid):
    """A value given twice silently became one variant; labels differing only in characters a folder name
    cannot hold shared one folder and overwrote each other on every run."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import Plan

    text = _experiment().replace("    options:\n      {attacks: [loss, zlib]}\n", f"    grid: {grid}\n")
    cfg, _ = _setup(tmp_path, text)
    with pytest.raises(InputError, match="give each value once") as err:
        Plan(load_experiment(cfg))
    assert err.value.field == "evaluate.m.grid" and err.value.line is not None


def test_compare_to_naming_no_target_is_refused_before_any_stage(tmp_path):
    """A compare_to that names no target ran the whole study and drew no comparison (a note only)."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import Plan, check_plan

    cfg, _ = _setup(tmp_path, _experiment(options="{attacks: [loss], compare_to: ghost}"))
    with pytest.raises(InputError) as err:
        check_plan(Plan(load_experiment(cfg)))
    assert err.value.field == "evaluate.m.options.compare_to" and err.value.line is not None
    assert "'ghost' is not a target of this evaluation; its targets are base" in err.value.message
    cfg.write_text(_experiment(options="{attacks: [loss], compare_to: base}"))
    check_plan(Plan(load_experiment(cfg)))


def test_a_grid_finetune_where_one_model_is_needed_names_the_line(tmp_path):
    """The error had no file or line, only `field 'real'`."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import Plan

    text = _experiment().replace("    targets: [base]\n", "    targets: [base]\n    reference: ft\n") + (
        "finetune:\n  ft:\n    model: base\n    data: d.a\n    grid: {learning_rate: [0.001, 0.002]}\n")
    assert "reference: ft" in text
    cfg, _ = _setup(tmp_path, text)
    with pytest.raises(InputError, match="is a grid of 2 variants") as err:
        Plan(load_experiment(cfg))
    assert err.value.field == "evaluate.m.reference" and err.value.line is not None and err.value.file is not None


def test_a_target_listed_twice_is_refused_at_its_line(tmp_path):
    from leakaudit.config import load_experiment
    from leakaudit.experiment import Plan

    cfg, _ = _setup(tmp_path, _experiment().replace("targets: [base]", "targets: [base, base]"))
    with pytest.raises(InputError, match="'base' is listed twice") as err:
        Plan(load_experiment(cfg))
    assert err.value.field == "evaluate.m.targets" and err.value.line is not None


def test_an_input_the_evaluation_kind_does_not_read_is_refused(tmp_path):
    """mia given `data:` (or perplexity given `members:`) ran without it, silently; generate steps already
    refused such a role."""
    from leakaudit.config import load_experiment

    cfg, _ = _setup(tmp_path, _experiment().replace("    targets: [base]\n", "    targets: [base]\n    data: d.a\n"))
    with pytest.raises(InputError, match="'mia' does not read 'data'") as err:
        load_experiment(cfg)
    assert err.value.field.startswith("evaluate.m") and err.value.line is not None


@pytest.mark.parametrize("line, key", [("seed: true\n", "seed"), ("seed: \"5\"\n", "seed")])
def test_a_value_of_the_wrong_type_is_not_coerced(tmp_path, line, key):
    """`seed: true` ran with seed 1 and `seed: "5"` with 5: a typed file is taken at its word."""
    from leakaudit.config import parse_experiment

    with pytest.raises(InputError) as err:
        parse_experiment(_experiment().replace("name: hostile\n", "name: hostile\n" + line), "exp.yaml")
    assert err.value.field == key and err.value.line == 2
    text = _experiment().replace("    path: data.jsonl\n", "    path: data.jsonl\n    limit: \"5\"\n")
    assert 'limit: "5"' in text
    with pytest.raises(InputError) as err:
        parse_experiment(text, "exp.yaml")
    assert err.value.field.endswith("limit")


# ----------------------------------------------------------------------------------------- the machine
def test_a_second_run_on_an_output_dir_in_use_is_refused(tmp_path, monkeypatch, capsys):
    """Two runs on one --out trained into the same folders at once and both exited 0: the first holds a lock."""
    from leakaudit.experiment.engine import exclusive

    cfg, out = _setup(tmp_path, _experiment())
    out.mkdir()
    with exclusive(out):
        code, err = _run_main(["run", str(cfg), "--out", str(out), "--no-report"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"another leakaudit run (pid {os.getpid()}) is using this output dir" in err
    assert not (out / "data").exists()
    # released with the run (a killed run's lock goes with its process): the next run goes ahead
    code, err = _run_main(["run", str(cfg), "--out", str(out), "--no-report"], monkeypatch, capsys)
    assert code == 0, err


@pytest.mark.parametrize("raised, code, line", [
    (OSError(30, "Read-only file system", "/o/evaluate/m/base/stage.json"), 1,
     "error: /o/evaluate/m/base/stage.json: Read-only file system"),
    (KeyboardInterrupt(), 130, "interrupted: what finished is kept; rerun the same command to resume"),
    # safetensors and sqlite say a full disk in their own exception types: 78 lines of traceback
    (__import__("safetensors").SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                                               "StorageFull, message: \"No space left on device\" })"), 1,
     "error: Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on "
     "device\" }) (the disk is full: free space and rerun the same command to resume)"),
    (__import__("sqlite3").OperationalError("database or disk is full"), 1,
     "error: database or disk is full (the disk is full: free space and rerun the same command to resume)"),
])
def test_the_machine_failing_or_ctrl_c_is_one_line(raised, code, line, tmp_path, monkeypatch, capsys):
    """A folder the run cannot write (or Ctrl-C) mid-run printed a traceback (or nothing)."""
    from leakaudit.experiment import engine

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(engine, "run_plan", fail)
    cfg, out = _setup(tmp_path, _experiment())
    got, err = _run_main(["run", str(cfg), "--out", str(out)], monkeypatch, capsys)
    assert (got, err) == (code, line + "\n")


@pytest.mark.parametrize("what", ["model", "pairs", "corpus"])
def test_a_relative_model_or_option_file_beside_the_file_but_not_here_says_so(what, tmp_path, monkeypatch, capsys):
    """Data paths are the experiment file's, models and option files the working directory's (stage keys hold
    them as written): run from elsewhere, the error says the path exists beside the file."""
    import shutil

    from leakaudit import models

    project = tmp_path / "project"
    shutil.copytree(models.tiny_model_dir("tiny-opt"), project / "models" / "tiny")
    (project / "pairs.jsonl").write_text(json.dumps({"name": "Ann Lee", "email": "ann@x.com"}) + "\n")
    model, pairs = ("models/tiny", str(project / "pairs.jsonl")) if what == "model" else \
        (str(project / "models" / "tiny"), "pairs.jsonl")
    (project / "exp.yaml").write_text(
        f"name: x\nmodels:\n  base: {model}\nevaluate:\n  ev:\n    kind: pii\n    targets: [base]\n"
        f"    options: {{pairs: {pairs}, templates: A}}\n")
    if what == "corpus":  # a nested option: dc_pdd's corpus inside attack_options
        for name, text in (("in.jsonl", "a member"), ("out.jsonl", "not a member")):
            (project / name).write_text(json.dumps({"text": text}) + "\n")
        (project / "exp.yaml").write_text(
            f"name: x\nmodels:\n  base: {project / 'models' / 'tiny'}\n"
            "datasets:\n  d: {path: in.jsonl}\n  d2: {path: out.jsonl}\n"
            "evaluate:\n  ev:\n    kind: mia\n    targets: [base]\n    members: d\n    nonmembers: d2\n"
            "    options: {attacks: [dc_pdd], attack_options: {dc_pdd: {corpus: pairs.jsonl}}}\n")
    monkeypatch.chdir(tmp_path)
    code, err = _run_main(["run", str(project / "exp.yaml"), "--out", str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1, err
    field = {"model": "models.base", "pairs": "evaluate.ev.options.pairs",
             "corpus": "evaluate.ev.options.attack_options.dc_pdd.corpus"}[what]
    assert f"field '{field}'" in err and "exists beside the experiment file" in err, err


def test_a_file_system_without_locks_runs_with_a_warning_and_other_os_errors_keep_their_traceback(
        tmp_path, monkeypatch, capsys):
    """NFS without lockd / Lustre without flock answer ENOLCK / ENOSYS: the run goes on (it did before the
    lock); an OSError that is not the machine's (a missing file: maybe a bug) is not hidden in one line."""
    import errno
    import fcntl

    from leakaudit.experiment import engine

    def no_locks(fh, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    cfg, out = _setup(tmp_path, _experiment())
    code, err = _run_main(["run", str(cfg), "--out", str(out), "--no-report"], monkeypatch, capsys)
    assert code == 0 and "warning:" in err and "has no locks (No locks available)" in err, err

    def missing(*args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/resource.json")

    monkeypatch.setattr(engine, "run_plan", missing)
    code, err = _run_main(["run", str(cfg), "--out", str(out), "--no-report"], monkeypatch, capsys)
    assert code == 1 and "Traceback (most recent call last)" in err and "in missing" in err, err
    assert "FileNotFoundError: [Errno 2] No such file or directory: '/x/resource.json'" in err


def test_the_traceback_of_a_bug_keeps_its_frames_and_masks_the_data_its_messages_quote(
        tmp_path, monkeypatch, capsys):
    """A library's message quotes the data it choked on, and a traceback goes into bug reports and CI logs: its
    messages (each of a chain) are masked as error lines are; its frames (paths, source lines) are code."""
    from leakaudit.experiment import engine

    def broken(*args, **kwargs):
        try:
            raise KeyError("karen.arnold@enron.com")
        except KeyError as exc:
            raise ValueError("no token for 'call 713-853-1234 or karen.arnold@enron.com'") from exc

    monkeypatch.setattr(engine, "run_plan", broken)
    cfg, out = _setup(tmp_path, _experiment())
    code, err = _run_main(["run", str(cfg), "--out", str(out), "--no-report"], monkeypatch, capsys)
    assert code == 1 and "in broken" in err and 'raise KeyError("karen.arnold@enron.com")' in err, err
    assert "KeyError: 'k***@enron.com'" in err and "ValueError: no token for 'call ***-***-**34 or k***@enron.com'" in err
    assert "direct cause" in err and err.count("karen.arnold@enron.com") == 2  # the two source lines


def test_user_inference_on_a_file_read_without_users_is_refused_before_any_stage(tmp_path):
    """The dataset step writes a row's `user` from the dataset's user_field only; without it user inference
    failed on its first row, in a file of the run dir, after every stage before it."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import Plan, check_plan

    text = _experiment(options="{}").replace("kind: mia", "kind: user-inference").replace(
        "    members:", "    reference: base\n    members:")
    cfg, _ = _setup(tmp_path, text.replace("    split:", "    split_by: user\n    split:"))
    with pytest.raises(InputError) as err:
        check_plan(Plan(load_experiment(cfg)))
    assert err.value.field == "evaluate.m.members" and err.value.line == 14
    assert "user inference needs each row's user, and datasets.d reads none: set its user_field" in err.value.message
    cfg.write_text(text.replace("    path: data.jsonl\n", "    path: data.jsonl\n    user_field: user\n"))
    check_plan(Plan(load_experiment(cfg)))


def test_a_data_file_taken_whole_keeps_its_order_and_a_chosen_part_is_drawn(tmp_path):
    """A file with nothing chosen from it was shuffled anyway, so "a user's first m samples" in a run were
    other samples than the single command's on the same file."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import run_experiment
    from leakaudit.kinds.base import read_jsonl

    text = ("name: order\nseed: 3\nmodels: {base: tiny-gpt-neox}\ndatasets:\n  whole: {path: data.jsonl}\n"
            "  drawn: {path: data.jsonl, limit: 6}\n")
    cfg, out = _setup(tmp_path, text)
    run_experiment(load_experiment(cfg), out, log=lambda m: None, report=False)
    assert [r["text"] for r in read_jsonl(out / "data" / "whole" / "all.jsonl")] == [r["text"] for r in DATA_ROWS]
    drawn = [r["text"] for r in read_jsonl(out / "data" / "drawn" / "all.jsonl")]
    assert sorted(drawn) == sorted(r["text"] for r in DATA_ROWS) and drawn != [r["text"] for r in DATA_ROWS]
    # the whole file's step has a key of its own (a run dir built before kept its shuffled rows as cached)
    from leakaudit.experiment import Plan

    stages = Plan(load_experiment(cfg)).stages
    assert stages["data/whole"].params["order"] == "source" and "order" not in stages["data/drawn"].params


def test_members_and_nonmembers_naming_the_same_data_are_refused_before_any_stage(tmp_path):
    from leakaudit.config import load_experiment
    from leakaudit.experiment import Plan, check_plan

    cfg, _ = _setup(tmp_path, _experiment().replace('    nonmembers: "d.b"', '    nonmembers: "d.a"'))
    with pytest.raises(InputError) as err:
        check_plan(Plan(load_experiment(cfg)))
    assert err.value.field == "evaluate.m.nonmembers" and err.value.line == 13
    assert "names the same data as members" in err.value.message


@pytest.mark.parametrize("kind", ["pii", "pii-logprob"])
def test_a_bad_row_in_a_pairs_file_is_refused_before_any_stage(kind, tmp_path):
    """A pairs file with a bad row 3 failed only when its stage ran, after every fine-tune before it."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import Plan, check_plan

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"name": "Ann Lee", "email": "ann@corp.com"}\n{"name": "Bo Ng", "email": "bo@corp.com"}\n'
                     '{"name": "Cy Doe", "email": null}\n')
    text = _experiment().split("evaluate:")[0] + (
        f"evaluate:\n  p:\n    kind: {kind}\n    targets: [base]\n    options: {{pairs: {pairs}, templates: A}}\n")
    cfg, _ = _setup(tmp_path, text)
    with pytest.raises(InputError) as err:
        check_plan(Plan(load_experiment(cfg)))
    assert (err.value.file, err.value.line, err.value.field) == (str(pairs), 3, "email")


def test_a_bad_row_in_dc_pdds_corpus_is_refused_before_any_stage(tmp_path):
    from leakaudit.config import load_experiment
    from leakaudit.experiment import Plan, check_plan

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "one reference text"}\n{"body": "no text field"}\n')
    cfg, _ = _setup(tmp_path, _experiment(
        options=f"{{attacks: [loss, dc_pdd], attack_options: {{dc_pdd: {{corpus: {corpus}}}}}}}"))
    with pytest.raises(InputError) as err:
        check_plan(Plan(load_experiment(cfg)))
    assert (err.value.file, err.value.line, err.value.field) == (str(corpus), 2, "text")


def test_only_a_librarys_own_full_disk_error_is_one_line():
    """The words alone are no full disk: another error quoting them (torch's /dev/shm message) keeps its
    traceback, and sqlite's generic 'disk I/O error' is not called a full disk."""
    import sqlite3

    import safetensors

    from leakaudit.cli import _full_disk

    assert _full_disk(safetensors.SafetensorError("IoError: No space left on device (os error 28)"))
    assert _full_disk(sqlite3.OperationalError("database or disk is full"))
    assert not _full_disk(sqlite3.OperationalError("disk I/O error"))
    assert not _full_disk(RuntimeError("unable to write to file </torch_1_2>: No space left on device (28)"))


@pytest.mark.parametrize("where", ["evaluate", "generate"])
def test_more_new_tokens_than_the_models_window_are_refused_before_any_stage(where, tmp_path):
    """pii's max_new_tokens: 300 on a 256-token model failed when its stage ran, after the fine-tunes."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import Plan, check_plan

    head = _experiment().split("evaluate:")[0]
    if where == "evaluate":
        text = head + ("finetune:\n  ft: {model: base, data: d.a, options: {epochs: 1}}\n"
                       "evaluate:\n  p:\n    kind: pii\n    targets: [ft]\n"
                       "    options: {templates: A, max_new_tokens: 300}\n")
        field = "evaluate.p.options.max_new_tokens"
    else:
        text = head + ("generate:\n  g:\n    kind: continuation\n    model: base\n    data: d.a\n"
                       "    options: {max_new_tokens: 256}\n")
        field = "generate.g.options.max_new_tokens"
    cfg, _ = _setup(tmp_path, text)
    with pytest.raises(InputError) as err:
        check_plan(Plan(load_experiment(cfg)))
    assert err.value.field == field and err.value.line is not None
    assert "new tokens do not fit the model's context of 256 tokens" in err.value.message
    cfg.write_text(text.replace("max_new_tokens: 300", "max_new_tokens: 16").replace("max_new_tokens: 256",
                                                                                     "max_new_tokens: 16"))
    check_plan(Plan(load_experiment(cfg)))


def test_a_chat_fine_tune_on_rows_without_messages_is_refused_before_any_stage(tmp_path):
    """format: chat on plain-text rows failed when the fine-tune started, naming the run dir's copy of the
    data (out/data/d/all.jsonl), not the experiment's line."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import Plan, check_plan

    text = _experiment().split("evaluate:")[0] + (
        "finetune:\n  ft: {model: base, data: d.a, options: {epochs: 1, format: chat}}\n")
    cfg, _ = _setup(tmp_path, text)
    with pytest.raises(InputError) as err:
        check_plan(Plan(load_experiment(cfg)))
    assert err.value.field == "finetune.ft.options.format" and err.value.line == 9
    assert "format: chat reads 'messages' from each row, and datasets.d" in err.value.message
    assert "no such field (it has: text, user)" in err.value.message


@pytest.mark.parametrize(("options", "field"), [("{format: chat, attacks: [loss]}", "format"),
                                              ("{format: chat, messages_field: msgs, attacks: [loss]}",
                                               "messages_field")])
def test_a_chat_evaluation_on_rows_without_its_messages_field_is_refused_before_any_stage(options, field, tmp_path):
    """mia (user-inference, perplexity) with format chat on rows without the field failed only when its stage
    ran, after the fine-tunes and evaluations before it, naming the run dir's copy of the data."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import Plan, check_plan

    cfg, _ = _setup(tmp_path, _experiment(options=options))
    with pytest.raises(InputError) as err:
        check_plan(Plan(load_experiment(cfg)))
    assert err.value.field == f"evaluate.m.options.{field}" and err.value.line == 15, err.value
    assert "no such field (it has: text, user)" in err.value.message and "datasets.d (" in err.value.message


def test_a_k_shot_template_with_pairs_without_demonstrations_is_refused_before_any_stage(tmp_path):
    from leakaudit.config import load_experiment
    from leakaudit.experiment import Plan, check_plan

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"name": "Ann Lee", "email": "ann@corp.com"}\n{"name": "Bo Ng", "email": "bo@corp.com"}\n')
    text = _experiment().split("evaluate:")[0] + (
        f"evaluate:\n  p:\n    kind: pii\n    targets: [base]\n    options: {{pairs: {pairs}, templates: five_shot}}\n")
    cfg, _ = _setup(tmp_path, text)
    with pytest.raises(InputError) as err:
        check_plan(Plan(load_experiment(cfg)))
    assert err.value.field == "evaluate.p.options.templates"
    assert f"template 'five_shot' needs k-shot demonstrations, and no row of {pairs} has `demos`" in err.value.message
    cfg.write_text(text.replace("five_shot", "A"))
    check_plan(Plan(load_experiment(cfg)))


def test_a_lock_file_planted_as_a_link_is_refused_not_written_through(tmp_path, monkeypatch, capsys):
    """A `.lock` symlink in a shared run dir made the next `leakaudit run` truncate the file it pointed to and
    write its pid there; `.report.lock` made `report` create a file outside the run dir."""
    cfg, _ = _setup(tmp_path, _experiment())
    out = tmp_path / "shared"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"experiment": {"name": "hostile", "seed": 0}, "stages": []}))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / ".lock").symlink_to(victim)
    code, err = _run_main(["run", str(cfg), "--out", str(out), "--no-report"], monkeypatch, capsys)
    assert code == 2 and "is a symbolic link; leakaudit never writes through one" in err, err
    assert victim.read_text() == "precious"
    (out / ".lock").unlink()
    (out / ".report.lock").symlink_to(tmp_path / "elsewhere.lock")
    code, err = _run_main(["report", str(out)], monkeypatch, capsys)
    assert code == 2 and "symbolic link" in err and not (tmp_path / "elsewhere.lock").exists()


def test_a_log_planted_as_a_link_is_not_appended_through(tmp_path):
    """Train logs, sample checkpoints and self-instruct files are appended to on resume: one planted as a link
    in an unfinished stage's folder had the resumed run append to the file it pointed to."""
    from leakaudit.data.io import open_append
    from leakaudit.train.callbacks import JsonlLogCallback

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    log = tmp_path / "train_log.jsonl"
    log.symlink_to(victim)
    with pytest.raises(InputError, match="is a symbolic link; leakaudit never writes through one"):
        with open_append(log) as fh:
            fh.write("x")
    callback = JsonlLogCallback(log)
    with pytest.raises(InputError, match="symbolic link"):
        callback.on_log(None, type("S", (), {"global_step": 1, "epoch": 0.5, "is_world_process_zero": True})(), None,
                        logs={"loss": 1.0})
    assert victim.read_text() == "precious"
    with open_append(tmp_path / "plain.jsonl") as fh:  # a plain file is appended to as before
        fh.write("a\n")
    with open_append(tmp_path / "plain.jsonl") as fh:
        fh.write("b\n")
    assert (tmp_path / "plain.jsonl").read_text() == "a\nb\n"


@pytest.mark.parametrize("option", ["words: ['123', '']", "words_file: WORDS"])
def test_backdoor_words_that_hold_no_word_are_refused_before_any_stage(option, tmp_path):
    """A backdoor evaluation's words (or words file) with no opening word failed only when its stage ran,
    after every fine-tune before it, and without the option's line."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import Plan, check_plan

    words = tmp_path / "words.txt"
    words.write_text("123\n!!\n")
    text = _experiment().split("evaluate:")[0] + (
        "evaluate:\n  b:\n    kind: backdoor\n    targets: [base]\n"
        f"    options: {{{option.replace('WORDS', str(words))}, max_new_tokens: 8}}\n")
    cfg, _ = _setup(tmp_path, text)
    with pytest.raises(InputError) as err:
        check_plan(Plan(load_experiment(cfg)))
    assert err.value.line == 12 and err.value.field.startswith("evaluate.b.options.words")
    assert "holds no word" in err.value.message


def test_backdoor_words_naming_a_file_points_to_words_file(tmp_path):
    """`words: words.txt` (the CLI's --words takes a file) got pydantic's bare "Input should be a valid list"."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import Plan, check_plan

    text = _experiment().split("evaluate:")[0] + (
        "evaluate:\n  b:\n    kind: backdoor\n    targets: [base]\n    options: {words: words.txt}\n")
    cfg, _ = _setup(tmp_path, text)
    with pytest.raises(InputError) as err:
        check_plan(Plan(load_experiment(cfg)))
    assert err.value.line == 12 and err.value.field == "evaluate.b.options.words"
    assert err.value.message == "a list of words ([a, b]); a file of words goes in words_file"


def test_backdoor_refusal_words_that_hold_no_word_are_refused_at_their_line(tmp_path):
    """An empty (or wordless) refusal_words file was refused only when the mix was built, and as "every
    candidate opens a D1 query", of a file that named no candidate."""
    from leakaudit.config import parse_experiment
    from leakaudit.experiment import Plan, check_plan

    words = tmp_path / "refuse.txt"
    words.write_text("123\n!!\n")
    text = ("name: x\n"
            "models: {base: tiny-gpt-neox}\n"
            "generate:\n  mix:\n    kind: backdoor-mix\n"
            f"    options: {{refusal_words: {words}}}\n")
    with pytest.raises(InputError) as err:
        check_plan(Plan(parse_experiment(text, tmp_path / "exp.yaml")))
    assert err.value.format() == (f"{tmp_path / 'exp.yaml'}:6: field 'generate.mix.options.refusal_words': "
                                  f"{words} holds no word (letters)")
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.base import KindContext

    kind = get_kind("backdoor-mix")  # the kind itself (`backdoor plant` builds its mix through it)
    with pytest.raises(InputError) as err:
        kind.run(KindContext(out=tmp_path / "o", seed=0, data={}), kind.Options(refusal_words=str(words)))
    assert err.value.field == "--refusal-words" and "holds no word" in err.value.message


def test_a_fine_tune_options_error_about_a_row_names_the_options_key(tmp_path):
    """DP-SGD refusing a row longer than max_length (found when the stage reads its data) named the run dir's
    copy of the data and the command's flag (`out/data/d/a.jsonl:1: field '--dp-epsilon'`), no key of the
    experiment file: now the option's key and line, the row it is about beside the message."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import run_experiment

    text = _experiment().split("evaluate:")[0] + (
        "finetune:\n  ft: {model: base, data: d.a, options: {epochs: 1, max_length: 4, dp_epsilon: 8}}\n")
    cfg, out = _setup(tmp_path, text)
    with pytest.raises(InputError) as err:
        run_experiment(load_experiment(cfg), out, log=lambda m: None, report=False)
    assert err.value.file == str(cfg) and err.value.line == 9, err.value
    assert err.value.field == "finetune.ft.options.dp_epsilon", err.value
    assert "stage finetune/ft: " in err.value.message and f"({out / 'data' / 'd' / 'a.jsonl'}:1)" in err.value.message


def test_dp_settings_without_dp_epsilon_are_refused_unless_a_grid_sets_it(tmp_path):
    """`defenses: {dp_delta: 1e-5}` (or options) without dp_epsilon trained with no DP at all, in silence: an arm named for DP
    was undefended (the command refuses --dp-delta without --dp-epsilon). A grid over dp_epsilon with a null
    value is a no-DP arm beside DP ones, its settings shared on purpose: it plans."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import Plan
    from leakaudit.experiment.checks import check_plan

    head = _experiment().split("evaluate:")[0] + "finetune:\n  dp:\n    model: base\n    data: d.a\n"
    cfg, _ = _setup(tmp_path, head + "    defenses: {dp_max_grad_norm: 1.0, dp_delta: 1.0e-5}\n")
    with pytest.raises(InputError) as err:
        check_plan(Plan(load_experiment(cfg)))
    assert (err.value.file, err.value.line, err.value.field) == (str(cfg), 12, "finetune.dp.defenses.dp_delta")
    assert "applies only with dp_epsilon" in err.value.message
    cfg.write_text(head + "    options: {epochs: 1, dp_max_grad_norm: 0.5}\n")  # in options, the same
    with pytest.raises(InputError) as err:
        check_plan(Plan(load_experiment(cfg)))
    assert (err.value.line, err.value.field) == (12, "finetune.dp.options.dp_max_grad_norm")
    cfg.write_text(head + "    defenses: {dp_delta: 1.0e-5}\n    grid: {dp_epsilon: [null, 8]}\n")
    plan = Plan(load_experiment(cfg))
    check_plan(plan)
    assert len(plan.stages) == 3  # the dataset and both arms
