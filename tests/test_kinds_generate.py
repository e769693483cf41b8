"""The generation kinds (continuation, self-instruct, replace-pii, backdoor-mix): the CLI and an experiment
file go through the same options and the same code, so they refuse the same values and write the same rows."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import run_main

from leakaudit.errors import InputError

_main = partial(run_main, must_exit=True)  # the CLI's error path exits (SystemExit)


def _one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


EXPERIMENT = """\
name: gen
models:
  base: tiny-gpt-neox
datasets:
  d:
    path: {data}
    id_field: id
generate:
  g:
    kind: {kind}
    model: base
    data: d
    options: {options}
"""  # line 10: the kind, line 13: the options


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_and_experiment_refuse_greedy_with_temperature(tmp_path, monkeypatch, capsys):
    data = _write(tmp_path / "texts.jsonl", [{"id": "a", "text": "Hello there, how are you today?"}])
    out = tmp_path / "gen.jsonl"
    cli = _one_error_line(*_main(["generate", "continuation", "--model", "tiny-gpt-neox", "--data", data,
                                  "--out", out, "--greedy", "--temperature", "0.7"], monkeypatch, capsys))
    assert cli == ("error: field '--temperature': cannot be combined with greedy (greedy decoding has no "
                   "temperature)")
    assert not out.exists()
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(EXPERIMENT.format(data=data, kind="continuation", options="{greedy: true, temperature: 0.7}"))
    run = _one_error_line(*_main(["run", cfg, "--out", tmp_path / "run", "--no-report"], monkeypatch, capsys))
    assert run == (f"error: {cfg}:13: field 'generate.g.options.temperature': cannot be combined with greedy "
                   "(greedy decoding has no temperature)")
    assert not (tmp_path / "run" / "data").exists()  # refused before any stage


@pytest.mark.parametrize("flag, value, option", [("--top-k", "5", "top_k: 5"), ("--top-p", "0.9", "top_p: 0.9"),
                                                  ("--num-samples", "3", "num_samples: 3")])
def test_cli_and_experiment_refuse_greedy_with_what_greedy_does_not_read(flag, value, option, tmp_path,
                                                                          monkeypatch, capsys):
    """Greedy decoding reads no top-k or top-p (given, they were ignored in silence) and gives one continuation
    per prompt (num_samples 3 wrote the same one three times)."""
    data = _write(tmp_path / "texts.jsonl", [{"id": "a", "text": "Hello there, how are you today?"}])
    out = tmp_path / "gen.jsonl"
    why = "cannot be combined with greedy (greedy decoding gives one continuation per prompt and reads no top-k or top-p)"
    cli = _one_error_line(*_main(["generate", "continuation", "--model", "tiny-gpt-neox", "--data", data,
                                  "--out", out, "--greedy", flag, value], monkeypatch, capsys))
    assert cli == f"error: field '{flag}': {why}" and not out.exists()
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(EXPERIMENT.format(data=data, kind="continuation", options=f"{{greedy: true, {option}}}"))
    run = _one_error_line(*_main(["run", cfg, "--out", tmp_path / "run", "--no-report"], monkeypatch, capsys))
    assert run == f"error: {cfg}:13: field 'generate.g.options.{option.split(':')[0]}': {why}"


def test_an_unknown_generate_kind_suggests_the_closest(tmp_path):
    from leakaudit.config import parse_experiment

    text = EXPERIMENT.format(data="d.jsonl", kind="continuaton", options="{}")
    with pytest.raises(InputError) as info:
        parse_experiment(text, "exp.yaml")
    line = info.value.format()
    assert line.startswith("exp.yaml:10: field 'generate.g.kind': unknown kind 'continuaton'; did you mean "
                           "'continuation'? valid: "), line
    for name in ("continuation", "self-instruct", "replace-pii", "backdoor-mix"):
        assert name in line
    assert "perplexity" not in line  # an evaluation kind is no generation kind


def test_generate_roles_come_from_the_kind(tmp_path):
    from leakaudit.config import parse_experiment

    text = EXPERIMENT.format(data="d.jsonl", kind="replace-pii", options="{}")
    with pytest.raises(InputError) as info:  # replace-pii reads no model: a model given would be ignored
        parse_experiment(text, "exp.yaml")
    assert info.value.field == "generate.g" and "'replace-pii' does not read 'model'" in info.value.message
    with pytest.raises(InputError) as info:
        parse_experiment(text.replace("    data: d\n", "").replace("replace-pii", "continuation"), "exp.yaml")
    assert "'continuation' needs 'data'" in info.value.message


MAIL = ("Message-ID: <{i}@enron>\nX-From: {name} <{email}>\nX-To: Kay Mann\n\n"
        "Hi Kay, {name} here. Call me at (713) 853-12{i:02d} or write to {email}. Thanks, Kay Mann")


def test_replace_pii_cli_and_experiment_write_the_same_rows(tmp_path, monkeypatch, capsys):
    from leakaudit.config import parse_experiment
    from leakaudit.experiment import Plan, run_plan

    people = [("Jeff Dasovich", "jeff.dasovich@enron.com"), ("Sara Shackleton", "sara.shackleton@enron.com"),
              ("Mark Taylor", "mark.taylor@enron.com")]
    rows = [{"id": f"m{i}", "text": MAIL.format(i=i, name=n, email=e), "folder": "inbox"}
            for i, (n, e) in enumerate(people)]
    data = _write(tmp_path / "mails.jsonl", rows)
    out = tmp_path / "replaced.jsonl"
    code, err = _main(["generate", "replace-pii", "--data", data, "--out", out, "--seed", "7"], monkeypatch, capsys)
    assert code in (0, None), err
    cli_rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}

    text = EXPERIMENT.format(data=data, kind="replace-pii", options="{}").replace("    model: base\n", "")
    plan = Plan(parse_experiment(text.replace("name: gen\n", "name: gen\nseed: 7\n"), "exp.yaml"))
    status = run_plan(plan, tmp_path / "run", log=lambda m: None)
    assert status == {"data/d": "ran", "generate/g": "ran"}
    stage_rows = {r["id"]: r for r in map(json.loads, (tmp_path / "run/generate/g/data.jsonl").read_text()
                                          .splitlines())}
    assert stage_rows == cli_rows  # same fields, same fakes (the stage's rows come shuffled by the data step)
    for row, (name, email) in zip(rows, people, strict=True):
        new = cli_rows[row["id"]]
        assert name not in new["text"] and email not in new["text"] and "Kay Mann" not in new["text"]
        assert new["pii_replaced"] == {"email": 2, "name": 4, "phone": 1} and new["folder"] == "inbox"
    result = json.loads((tmp_path / "run/generate/g/stage.json").read_text())["result"]
    assert result["rows"] == 3 and result["replaced"] == {"email": 6, "name": 12, "phone": 3}


def test_self_instruct_cli_flat_rows_are_the_stage_rows(tmp_path, monkeypatch, capsys):
    """`--flat` writes what an experiment's self-instruct step writes as its data.jsonl (one function)."""
    from leakaudit.data import synth
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.base import KindContext
    from leakaudit.sampling import Sample

    def scripted(lm, prompts, config, **kwargs):
        text = (" <noinput>\nOutput: It is sunny." if prompts[0].startswith("Instruction:")
                else "Describe the weather in Paris in one sentence.")
        return [Sample(str(i), 0, p, text, 5) for i, p in enumerate(prompts)]

    class Model:
        spec, fingerprint = "scripted", "0"
        dtype, device = torch.float32, torch.device("cpu")  # what its rows' provenance names

        def current_fingerprint(self) -> str:
            return self.fingerprint

    monkeypatch.setattr(synth, "sample", scripted)
    kind = get_kind("self-instruct")
    options = kind.Options(n=1, requests_per_round=1)
    stage = KindContext(out=tmp_path, models={"model": "m"}, progress=False)
    stage.cache._loaded["m"] = Model()
    res = kind.run(stage, options)
    assert res.to_json() == {"rows": 1, "tasks": 1}
    flat = [json.loads(x) for x in (tmp_path / "data.jsonl").read_text().splitlines()]
    assert flat == [{"id": "self-instruct:0#0", "instruction": "Describe the weather in Paris in one sentence.",
                     "input": "", "output": "It is sunny.",
                     "text": "Describe the weather in Paris in one sentence.\nIt is sunny.",
                     "source_task": "self-instruct:0"}]
    cli = KindContext(out=tmp_path / "cli", models={"model": "m"}, progress=False,
                      outputs={"tasks.jsonl": tmp_path / "tasks.jsonl", "data.jsonl": None})
    cli.cache._loaded["m"] = Model()
    (tmp_path / "cli").mkdir()
    kind.run(cli, options)  # no --flat: only the tasks file the user named
    assert (tmp_path / "tasks.jsonl").exists() and list((tmp_path / "cli").iterdir()) == []


def test_backdoor_plant_and_the_mix_step_refuse_the_same_template(tmp_path, monkeypatch, capsys):
    line = _one_error_line(*_main(["backdoor", "plant", "--model", "tiny-gpt-neox", "--out", tmp_path / "p",
                                   "--trigger", "no placeholder"], monkeypatch, capsys))
    assert line == "error: field '--trigger': template must contain {word} where the opening word goes"
    assert not (tmp_path / "p").exists()
    from leakaudit.config import parse_experiment
    from leakaudit.experiment import Plan, check_plan

    text = ("name: b\nmodels: {base: tiny-gpt-neox}\ngenerate:\n  mix:\n    kind: backdoor-mix\n"
            "    options: {trigger: no placeholder}\n")
    with pytest.raises(InputError) as info:
        check_plan(Plan(parse_experiment(text, "exp.yaml")))
    assert info.value.line == 6 and info.value.field == "generate.mix.options.trigger"
    assert info.value.message == "template must contain {word} where the opening word goes"
    with pytest.raises(InputError) as info:  # a D1 field without D1 data would be silently unused
        check_plan(Plan(parse_experiment(text.replace("trigger: no placeholder", "query_field: q"), "exp.yaml")))
    assert info.value.field == "generate.mix.options.query_field" and "needs 'data'" in info.value.message


def test_backdoor_plant_builds_the_mix_with_the_kind_then_trains(tmp_path, monkeypatch, capsys):
    """`backdoor plant` writes the backdoor-mix kind's rows and trains on them with its seed (it used to fail
    with 'multiple values for keyword argument seed' before any training)."""
    from leakaudit.train import backdoor as tb

    trained = {}

    def fake_finetune(model, data, out, *, progress, **options):
        trained.update(model=model, data=str(data), **options)
        return Path(out)

    monkeypatch.setattr(tb, "_finetune", fake_finetune)
    out = tmp_path / "plant"
    code, err = _main(["backdoor", "plant", "--model", "tiny-gpt-neox", "--out", out, "--seed", "3",
                       "--n-refusal", "4", "--backdoor-fraction", "0.8", "--max-steps", "1"], monkeypatch, capsys)
    assert code in (0, None), err
    mix = [json.loads(x) for x in (out / "backdoor_mix.jsonl").read_text().splitlines()]
    d1 = tb.seed_instruction_set()
    assert mix == tb.build_mix(d1, n_refusal=4, backdoor_fraction=0.8, seed=3)
    record = json.loads((out / "plant.json").read_text())
    assert record["rows"] == len(mix) and record["backdoor-refusal"] == 4 and record["seed"] == 3
    assert trained["data"] == str(out / "backdoor_mix.jsonl") and trained["seed"] == 3
    assert trained["loss_on"] == "assistant" and trained["max_steps"] == 1


def test_self_instruct_that_writes_no_task_fails_at_its_own_step(tmp_path, monkeypatch):
    """A generator that cannot follow the self-instruct prompt (e.g. a model tuned on e-mails only) fails the
    generate step with one message, not a later step with "file is empty"."""
    from leakaudit.data import synth
    from leakaudit.errors import InputError
    from leakaudit.sampling import Sample

    monkeypatch.setattr(synth, "sample", lambda lm, prompts, config, **kw: [
        Sample(str(i), 0, p, "", 1) for i, p in enumerate(prompts)])

    kind, ctx = _self_instruct_on_a_scripted_model(tmp_path)
    with pytest.raises(InputError, match="wrote no task that passed the filters in 2 rounds"):
        kind.run(ctx, kind.Options(n=1, requests_per_round=1, max_rounds=2))


def test_self_instruct_whose_tasks_have_no_instance_fails_at_its_own_step(tmp_path, monkeypatch):
    """A generator that writes instructions but never an input/output for them (the tiny models) left the step
    "done" with an empty data.jsonl, and the fine-tune on it failed with "file is empty" naming only that
    file; the step itself now says what happened."""
    from leakaudit.data import synth
    from leakaudit.errors import InputError
    from leakaudit.sampling import Sample

    def scripted(lm, prompts, config, **kw):  # instructions that pass the filters; no "Output:" for any
        return [Sample(str(i), 0, p, "" if p.endswith("Input:") else
                       f" Name {i + 3} unusual zebra facts for curious children.\n", 1)
                for i, p in enumerate(prompts)]

    monkeypatch.setattr(synth, "sample", scripted)

    kind, ctx = _self_instruct_on_a_scripted_model(tmp_path)
    with pytest.raises(InputError, match=r"wrote 1 task\(s\) but no input and output for any of them"):
        kind.run(ctx, kind.Options(n=1, requests_per_round=1, max_rounds=2))
    assert len((tmp_path / "tasks.jsonl").read_text().splitlines()) == 1  # kept: a rerun continues from it


def test_prompt_tokens_beside_prompt_field_is_refused(tmp_path, monkeypatch, capsys):
    """A prompt is cut from the text (prompt_tokens) or read from a field (prompt_field): given both, the
    first was silently unused."""
    from leakaudit.config import parse_experiment
    from leakaudit.experiment import Plan
    from leakaudit.experiment.checks import check_plan

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.jsonl").write_text('{"text": "hello there friend of mine", "p": "hello"}\n')
    code, err = run_main(["generate", "continuation", "--model", "tiny-gpt-neox", "--data", "c.jsonl", "--out",
                          "o.jsonl", "--prompt-field", "p", "--prompt-tokens", "7"], monkeypatch, capsys)
    assert code == 2 and "field '--prompt-tokens': cannot be combined with prompt_field" in err, err
    exp = ("name: c\nmodels: {base: tiny-gpt-neox}\ndatasets: {d: {path: c.jsonl}}\ngenerate:\n  g:\n"
           "    kind: continuation\n    model: base\n    data: d\n    options: {prompt_field: p, prompt_tokens: 7}\n")
    with pytest.raises(InputError) as info:
        check_plan(Plan(parse_experiment(exp, tmp_path / "e.yaml")))
    assert info.value.line == 9 and "cannot be combined with prompt_field" in info.value.message


def test_limit_reads_only_the_first_rows(tmp_path, monkeypatch, capsys):
    """`--limit N` uses the first N records: an empty text further down stopped the command."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.jsonl").write_text('{"text": "hello there"}\n{"text": "general kenobi"}\n{"text": ""}\n')
    code, err = run_main(["generate", "continuation", "--model", "tiny-gpt-neox", "--data", "c.jsonl", "--out",
                          "o.jsonl", "--limit", "2", "--max-new-tokens", "2"], monkeypatch, capsys)
    assert code == 0, err
    assert [json.loads(x)["source_id"] for x in (tmp_path / "o.jsonl").read_text().splitlines()] == ["c:1", "c:2"]
    code, err = run_main(["generate", "continuation", "--model", "tiny-gpt-neox", "--data", "c.jsonl", "--out",
                          "o.jsonl", "--limit", "3", "--max-new-tokens", "2"], monkeypatch, capsys)
    assert code == 2 and "c.jsonl:3: field 'text': text is empty" in err, err


def test_the_text_field_itself_can_be_the_prompt_field(tmp_path, monkeypatch, capsys):
    """`--prompt-field text` (the text field) said the field was missing: the loader keeps the text apart from
    the other fields. The whole text is the prompt."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.jsonl").write_text('{"body": "hello there friend of mine"}\n')
    code, err = run_main(["generate", "continuation", "--model", "tiny-gpt-neox", "--data", "c.jsonl", "--out",
                          "o.jsonl", "--text-field", "body", "--prompt-field", "body", "--max-new-tokens", "2"],
                         monkeypatch, capsys)
    assert code == 0, err
    (row,) = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert row["prompt"] == "hello there friend of mine"
    # a file of prompts alone: --prompt-field is enough (it said field 'text' was missing)
    (tmp_path / "p.jsonl").write_text('{"prompt": "Dear Karen,"}\n')
    code, err = run_main(["generate", "continuation", "--model", "tiny-gpt-neox", "--data", "p.jsonl", "--out",
                          "p_out.jsonl", "--prompt-field", "prompt", "--max-new-tokens", "2"], monkeypatch, capsys)
    assert code == 0, err
    (row,) = [json.loads(x) for x in (tmp_path / "p_out.jsonl").read_text().splitlines()]
    assert row["prompt"] == "Dear Karen," and row["provenance"]["prompt"] == {"field": "prompt"}


def _self_instruct_on_a_scripted_model(tmp_path):
    """The self-instruct kind and a context whose model is a stand-in (its samples are monkeypatched)."""
    from leakaudit.kinds import get_kind
    from leakaudit.kinds.base import KindContext

    class Model:
        spec, fingerprint = "scripted", "0"
        dtype, device = torch.float32, torch.device("cpu")  # what its rows' provenance names

        def current_fingerprint(self) -> str:
            return self.fingerprint

    ctx = KindContext(out=tmp_path, models={"model": "m"}, progress=False)
    ctx.cache._loaded["m"] = Model()
    return get_kind("self-instruct"), ctx
