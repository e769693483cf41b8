"""`leakaudit run` under a launcher (torchrun, 2 CPU processes, gloo): the experiment's output is the one a single
process writes — generation and the other single-process stages byte for byte (rank 0 runs them alone), the
fine-tune (DDP, the step's batch shared by the processes; here a step batch that divides the data, and
packed rows) and the scores within DDP's summation-order noise — and a launched rerun resumes from the files
rank 0 recorded.

Both fine-tunes train in fp32 whatever LEAKAUDIT_DTYPE says (`bf16: false`), as in tests/test_ddp.py: under
bf16 autocast Adam turns rounding noise into whole +-lr steps, and no tolerance would tell a bug from it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_experiment import STUDY as TINY_STUDY

from leakaudit.config import parse_experiment
from leakaudit.distributed import alone, world
from leakaudit.errors import InputError
from leakaudit.experiment import Plan, run_experiment
from leakaudit.experiment.checks import check_plan

REPO = Path(__file__).resolve().parent.parent

# test_experiment's tiny study up to its continuation step (data and one generation), then what this file
# needs: a fine-tune every process trains and a DP-SGD one rank 0 trains alone
STUDY = TINY_STUDY[:TINY_STUDY.index("  replaced:")].replace("name: tiny-study", "name: launched") + """\
finetune:
  real:
    model: base
    data: emails.members
    method: lora
    options: &train {epochs: 2, learning_rate: 0.001, batch_size: 4, gradient_accumulation: 1, max_length: 64,
                     lora_dropout: 0.0, bf16: false}
  private:
    model: base
    data: emails.members
    method: lora
    options: {epochs: 2, learning_rate: 0.001, batch_size: 4, gradient_accumulation: 1, max_length: 112,
              lora_dropout: 0.0, bf16: false}  # a whole row per example: DP-SGD refuses rows it would split
    defenses: {dp_epsilon: 8}
"""
# and its evaluations (mia, user inference, perplexity), perplexity of both fine-tunes
STUDY += TINY_STUDY[TINY_STUDY.index("evaluate:"):TINY_STUDY.index("  pii:")].replace(
    "targets: [real]\n    data: emails.nonmembers", "targets: [real, private]\n    data: emails.nonmembers")
STUDY += """\
  logprob:
    kind: pii-logprob
    targets: [real]
    baseline: base
    options: {templates: A, n_targets: 5, n_candidates: 3}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`leakaudit ARGS` under torchrun with 2 CPU processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LEAKAUDIT_DTYPE": "fp32", "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "leakaudit", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)


def _results(out: Path) -> dict[str, dict]:
    return {s["id"]: s for s in json.loads((out / "run.json").read_text())["stages"]}


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_launched_run_writes_what_one_process_writes_and_resumes(tmp_path, monkeypatch, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(STUDY)
    one, two = tmp_path / "one", tmp_path / "two"
    monkeypatch.setenv("LEAKAUDIT_DTYPE", "fp32")  # as the launched processes score: the suite may force bf16
    run_experiment(parse_experiment(STUDY, exp), one, log=lambda m: None, report=False)
    proc = _launch(tmp_path, "run", str(exp), "--out", str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone reports: one progress line per stage event, one closing line
    assert proc.stderr.count("[1/9] data/emails: running") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("9 stages (9 ran, 0 reused, 0 cached)") == 1

    files = {d: sorted(str(p.relative_to(d)) for p in d.rglob("*")
                       if p.is_file() and p.name not in (".lock", ".report.lock", "report.html", "summary.json"))
             for d in (one, two)}
    assert files[one] == files[two]
    for rel in ("data/emails/members.jsonl", "data/emails/nonmembers.jsonl", "generate/continued/data.jsonl"):
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel  # rank 0 ran them alone, same seed
    r1, r2 = _results(one), _results(two)
    assert set(r1) == set(r2) and all(s["status"] == "ran" for s in r2.values())
    # a launched fine-tune is not quite one process's (a short last step, length groups per process): the
    # number of processes is in its key and in every key after it; DP-SGD and the stages before are as one's
    assert [sid for sid in r1 if r1[sid]["key"] != r2[sid]["key"]] == [
        "finetune/real", "evaluate/mia/real", "evaluate/users/real", "evaluate/ppl/real", "evaluate/logprob/real"]
    for sid in ("finetune/real", "finetune/private"):
        assert r1[sid]["result"]["n_train_examples"] == r2[sid]["result"]["n_train_examples"] > 0
        a, b = (load_file(str(d / sid / "model" / "adapter_model.safetensors")) for d in (one, two))
        assert set(a) == set(b)
        assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # trained at all
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
    # DDP with the step's 4 examples as 2 x 2 reaches the single process's losses (not 2 x 4: another run)
    logs = [[r["loss"] for r in _rows(d / "finetune/real/model/train_log.jsonl") if "loss" in r] for d in (one, two)]
    assert len(logs[1]) == len(logs[0]) > 0 and logs[1] == pytest.approx(logs[0], rel=2e-3)

    s1, s2 = (_rows(d / "evaluate/mia/real/scores.jsonl") for d in (one, two))
    assert [r["id"] for r in s1] == [r["id"] for r in s2] and len(s1) > 0
    for name in ("loss", "zlib", "min_k", "ref"):
        assert np.allclose([r[name] for r in s1], [r[name] for r in s2], rtol=1e-3, atol=1e-5), name
    u1, u2 = (_rows(d / "evaluate/users/real/user_scores.jsonl") for d in (one, two))
    assert [r["user"] for r in u1] == [r["user"] for r in u2]
    assert np.allclose([r["score"] for r in u1], [r["score"] for r in u2], rtol=1e-3, atol=1e-5)
    for target in ("real", "private"):
        p1, p2 = (r[f"evaluate/ppl/{target}"]["result"]["perplexity"] for r in (r1, r2))
        assert p2 == pytest.approx(p1, rel=1e-3)
    l1, l2 = (_rows(d / "evaluate/logprob/real/logprobs.jsonl") for d in (one, two))
    assert [(r["role"], r["target"], r["template"]) for r in l1] == [(r["role"], r["target"], r["template"]) for r in l2]
    assert len(l1) == 10 and np.allclose([r["logp"] for r in l1], [r["logp"] for r in l2], rtol=1e-3, atol=1e-5)
    assert (two / "report.html").is_file() and (two / "summary.json").is_file()

    # batch_size in the fine-tune's record is per process, and it says how many there were
    configs = [json.loads((d / "finetune/real/model/finetune_config.json").read_text()) for d in (one, two)]
    assert [(c["batch_size"], c["processes"]) for c in configs] == [(4, 1), (2, 2)]

    again = _launch(tmp_path, "run", str(exp), "--out", str(two), "--no-report")  # finds what rank 0 recorded
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("9 stages (0 ran, 0 reused, 9 cached)") == 1, again.stderr[-3000:]
    # `leakaudit report` under a launcher: the other processes write nothing (rank 0 writes it, as in `run`)
    from leakaudit.cli import app

    (two / "report.html").unlink(missing_ok=True)  # (the --no-report rerun removed the earlier one)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    capsys.readouterr()
    app(["report", str(two)], standalone_mode=False)
    assert not (two / "report.html").exists()
    # ... and says so: where a platform sets RANK for every pod, a silent exit 0 would look like a report
    assert "not written by this process (rank 1 of 2" in capsys.readouterr().err


def test_a_launched_run_of_a_bad_file_prints_its_error_once(tmp_path):
    """Every process met the bad file and each printed the error (the order was a race)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbogus_key: 1\nmodels: {base: tiny-gpt-neox}\n")
    proc = _launch(tmp_path, "run", str(bad), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error: " in line and "bogus_key" in line]
    assert errors == [f"error: {bad}:2: field 'bogus_key': unknown key"], proc.stderr[-3000:]
    # rank 1, stopped by torchrun while it waited to echo, printed a chained traceback ending in the message
    # (torchrun's own ChildFailedError summary after it is the launcher's)
    assert "InputError" not in proc.stderr and "leakaudit/cli" not in proc.stderr, proc.stderr[-3000:]


def test_a_check_rank_0_fails_alone_ends_the_other_ranks_at_once(tmp_path):
    """Rank 0 checks the plan first; failing there (a step batch 3 processes cannot share, a locked --out), it
    exited before joining the process group, and rank 1 sat in the group's set-up, deaf to torchrun's SIGTERM,
    until torchrun killed it 30 s later ("forcefully exiting via 9"; 34 s in all)."""
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: early\nmodels: {base: tiny-gpt-neox}\n"
                   "datasets: {d: {builtin: enron-synthetic, limit: 8, max_chars: 100}}\n"
                   "finetune:\n  ft: {model: base, data: d, method: lora, options: {batch_size: 3, gradient_accumulation: 1, max_steps: 1}}\n")
    proc = _launch(tmp_path, "run", str(exp), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error: ", "[rank"))]
    assert len(errors) == 1 and "cannot be shared by the 2 processes" in errors[0], proc.stderr[-3000:]
    assert "forcefully exiting" not in proc.stderr, proc.stderr[-3000:]  # rank 1 ended on SIGTERM, not SIGKILL


@pytest.mark.parametrize("when", ["waiting to echo", "formatting the error"])
def test_another_rank_stopped_while_it_waits_to_echo_ends_quietly(tmp_path, when):
    """torchrun stops the other processes within a second of rank 0 failing; SIGTERM raised inside the error
    handler of rank 1 and printed a traceback holding the message unmasked (a label's e-mail address)."""
    import signal
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello there", "label": "jane.doe@secret-corp.com"}\n')
    slow = ("import time\nimport leakaudit.data.pii_mask as pm\nreal = pm.mask_message\n"
            "pm.mask_message = lambda m: (time.sleep(3), real(m))[1]\n") if when == "formatting the error" else ""
    script = ("import os, signal, sys, threading\n" + slow +
              "from leakaudit import cli\n"
              "threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()\n"
              f"sys.argv = ['leakaudit', 'mia', '--target', 'tiny-gpt-neox', '--data', {str(bad)!r}, '--out', "
              f"{str(tmp_path / 'out')!r}]\n"
              "cli.main()\n")
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "jane.doe" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_an_error_of_another_rank_waits_then_names_the_rank(monkeypatch, capsys):
    """A process other than rank 0 prints after a grace (the launcher stops it if rank 0 failed too), with its
    rank: an error only it met (a file it cannot see) must not be lost."""
    import leakaudit.cli as cli

    monkeypatch.setattr(cli, "ECHO_GRACE_S", 0.0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_:
        cli._fail("somewhere: not found")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "[rank 1] error: somewhere: not found\n"


def test_step_batch_is_shared_by_the_launched_processes(monkeypatch, tmp_path):
    """batch_size x gradient_accumulation is one optimizer step's batch however many processes run it; a
    step batch the processes cannot share fails at plan time naming the file's line."""
    from leakaudit.experiment.checks import per_process

    exp = parse_experiment(STUDY, tmp_path / "exp.yaml")
    stages = Plan(exp).stages
    real, private = stages["finetune/real"], stages["finetune/private"]
    from leakaudit.experiment.checks import _finetune_config

    config = _finetune_config(real, "-")
    monkeypatch.setenv("WORLD_SIZE", "2")
    split = per_process(config, real)
    assert (split.batch_size, split.gradient_accumulation) == (2, 1)
    one_at_a_time = config.model_copy(update={"batch_size": 1, "gradient_accumulation": 8})
    split = per_process(one_at_a_time, real)
    assert (split.batch_size, split.gradient_accumulation) == (1, 4)  # never more per process than asked
    assert per_process(_finetune_config(private, "-"), private).batch_size == 4  # DP-SGD: one process
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(InputError) as info:
        check_plan(Plan(exp))
    assert info.value.line is not None and "cannot be shared by the 3 processes" in info.value.message
    assert "finetune.real.options.batch_size" in info.value.format()
    with alone():
        assert world() == (0, 1)
    assert world() == (0, 3)


@pytest.mark.parametrize("early", [False, True])
def test_unfinished_training_on_other_inputs_starts_again(tmp_path, capsys, early):
    """A kill left a fine-tune whose inputs changed since under the same stage key (an input stage ran again,
    its files damaged): the stage trains again from the start with a warning, instead of `finetune`'s refusal
    to resume a run with different options (which named an --out the experiment does not have). An
    early-stopping run of a release that held rows out one by one is told apart: its inputs did not change."""
    text = STUDY.split("  private:")[0]  # the dataset, generation and one fine-tune
    if early:
        text = text.replace("lora_dropout: 0.0, bf16: false}\n", "lora_dropout: 0.0, bf16: false}\n"
                            "    defenses: {early_stopping_patience: 1, eval_fraction: 0.25}\n", 1)
    exp = parse_experiment(text, tmp_path / "exp.yaml")
    stage = Plan(exp).stages["finetune/real"]
    run_experiment(exp, tmp_path / "out", log=lambda m: None, report=False)  # finished; then made unfinished:
    model = tmp_path / "out" / stage.folder / "model"
    shutil.rmtree(model)
    (model.parent / "stage.json").unlink()
    model.mkdir()
    (model.parent / ".key").write_text(stage.key)
    (model / "finetune_config.json").write_text(json.dumps({"fingerprint": "other inputs"}))
    (model / "checkpoint-2").mkdir()
    status = run_experiment(exp, tmp_path / "out", log=lambda m: None, report=False)
    assert status["finetune/real"] == "ran"
    err = capsys.readouterr().err
    assert "training again from the start" in err
    assert ("held-out split of an earlier release" in err) == early and ("other inputs" in err) != early, err
    assert not (model / "checkpoint-2").exists() and (model / "adapter_model.safetensors").is_file()
    saved = json.loads((model / "finetune_config.json").read_text())["fingerprint"]
    assert saved != "other inputs"


def test_a_bad_experiment_file_fails_before_torch_loads(tmp_path):
    """Asking whether this is rank 0 (first thing `leakaudit run` does) must not load torch: a typo in the file
    failed in ~1 s, and took ~6 s when the launcher helpers imported torch and the scoring engine."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodels: {base: tiny-gpt-neox}\nevaluate:\n  e: {kind: nonsense, targets: [base]}\n")
    code = ("import sys\nfrom leakaudit.cli import main\nsys.argv = ['leakaudit', 'run', sys.argv[1], '--out', "
            "sys.argv[2]]\ntry:\n    main()\nexcept SystemExit as exc:\n    print('exit', exc.code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(bad), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert "nonsense" in proc.stderr and proc.stdout.split() == ["exit", "2", "False"], (proc.stdout, proc.stderr)


def test_a_stage_rank_0_runs_alone_failing_ends_the_others_quietly(tmp_path):
    """Rank 0 failed a stage it runs alone (PII contexts rows without an address, read when the stage runs)
    and printed its one line; rank 1, waiting at the barrier, printed a 45-line gloo traceback ("Connection
    closed by peer")."""
    contexts = tmp_path / "contexts.jsonl"
    contexts.write_text('{"context": "no address in this row"}\n')
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: late\nmodels: {base: tiny-gpt-neox}\n"
                   "datasets: {emails: {builtin: enron-synthetic, limit: 8, max_chars: 200}}\n"
                   "evaluate:\n  pii:\n    kind: pii\n    targets: [base]\n"
                   f"    options: {{templates: A, contexts: {contexts}, n_targets: 2, max_new_tokens: 8}}\n")
    proc = _launch(tmp_path, "run", str(exp), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "data/emails: done" in proc.stderr, proc.stderr[-3000:]  # the failure came at the stage, not before
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error: ", "[rank"))]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "field 'email'" in errors[0], proc.stderr[-3000:]
    assert "Connection closed" not in proc.stderr and "RuntimeError" not in proc.stderr, proc.stderr[-3000:]


def test_a_command_that_does_not_run_data_parallel_runs_once_under_a_launcher(tmp_path, monkeypatch, capsys):
    """`leakaudit pii` under torchrun: every process sampled everything, printed every line and appended to the
    same resumable sample file (each sample twice). Rank 0 runs it alone now; the others stop at once (the
    next test)."""
    from conftest import run_main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "pii"
    code, err = run_main(["pii", "--model", "tiny-gpt-neox", "--out", out, "--templates", "A", "--temperatures", "1.0",
                          "--n-targets", "3", "--max-new-tokens", "4", "--show-pii"], monkeypatch, capsys)
    assert code == 0, err
    assert err.count("runs in one process: rank 0 does it alone, the other 1 process stopped") == 1, err
    samples = [row for f in sorted((out / ".samples").glob("*.jsonl")) for row in _rows(f)]
    assert len(samples) == 3, len(samples)  # 3 targets x 1 template x 1 temperature, once


def test_a_launched_finetune_prints_its_output_dir_once(tmp_path, monkeypatch, capsys):
    """Under a launcher every process trained it and each printed the dir; rank 0 alone says where it is
    (the training itself is the launched fine-tune's, tested in test_ddp.py)."""
    import leakaudit.train.finetune as ft
    from leakaudit.cli import main

    monkeypatch.setattr(ft, "finetune", lambda config, progress=True: Path(config.out))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of the training data"}) + "\n" for i in range(8)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    printed = {}
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setattr(sys, "argv", ["leakaudit", "finetune", "--model", "tiny-gpt-neox", "--data", str(data),
                                          "--method", "lora", "--out", str(tmp_path / f"ft{rank}")])
        with pytest.raises(SystemExit) as exit_:
            main()
        out = capsys.readouterr()
        assert exit_.value.code == 0, out.err
        printed[rank] = out.out
    assert printed == {"1": "", "0": f"{tmp_path / 'ft0'}\n"}


def test_a_failed_wait_of_another_rank_is_said_when_the_launcher_does_not_stop_it(monkeypatch, capsys):
    """A wait that failed on its own (a timeout, a broken group) ended rank 1 with exit 1 and no word."""
    import leakaudit.distributed as dist_mod

    monkeypatch.setattr(dist_mod, "PEER_GRACE_S", 0.0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_, dist_mod._peer_guard():
        raise RuntimeError("Timed out waiting 86400000ms for recv operation to complete")
    assert exit_.value.code == 1
    assert capsys.readouterr().err == ("[rank 1] error: waiting on rank 0 failed: Timed out waiting 86400000ms for "
                                       "recv operation to complete\n")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError), dist_mod._peer_guard():
        raise RuntimeError("rank 0's own failure keeps its traceback")


def test_a_one_process_command_under_a_launcher_stops_the_other_ranks_and_help_says_nothing_more(
        tmp_path, monkeypatch, capsys):
    from conftest import run_main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, err = run_main(["seeds", tmp_path / "nowhere"], monkeypatch, capsys)
    assert (code, err) == (0, "")  # rank 1 stops at once: rank 0 does it (and says what is wrong)
    monkeypatch.setenv("RANK", "0")
    code, err = run_main(["pii", "--help"], monkeypatch, capsys)
    assert code == 0 and "runs in one process" not in err


def test_launched_backdoor_training_steps_say_where_the_model_is_once(tmp_path, monkeypatch, capsys):
    """`backdoor plant` and `backdoor finetune` under torchrun printed "planted model: ..." / "fine-tuned model:
    ..." once per process. The model's path is the step's result: one line on stdout, from rank 0."""
    import leakaudit.train.backdoor as tb
    from leakaudit.cli import main

    def trained(model, data, out, **kw):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "train_log.jsonl").write_text('{"train_loss": 1.0}\n')
        return Path(out)

    monkeypatch.setattr(tb, "plant_mix", lambda model, out, **kw: trained(model, None, Path(out) / "model"))
    monkeypatch.setattr(tb, "downstream_finetune", trained)
    monkeypatch.setenv("WORLD_SIZE", "2")
    said = {}
    for step in ("plant", "finetune"):
        for rank in ("1", "0"):
            monkeypatch.setenv("RANK", rank)
            monkeypatch.setattr(sys, "argv", ["leakaudit", "backdoor", step, "--model", "tiny-gpt-neox", "--method",
                                              "lora", "--out", str(tmp_path / f"{step}{rank}"), "--limit" if
                                              step == "finetune" else "--n-refusal", "4"])
            with pytest.raises(SystemExit) as exit_:
                main()
            printed = capsys.readouterr()
            assert exit_.value.code == 0, printed.err
            said[(step, rank)] = printed.out.splitlines()
            assert ("planted model" in printed.err) == (step == "plant" and rank == "0")
    assert [len(lines) for lines in said.values()] == [0, 1, 0, 1]
    assert Path(said[("plant", "0")][0]) == tmp_path / "plant0" / "model"
    assert Path(said[("finetune", "0")][0]).is_dir()


@pytest.mark.parametrize("env", [{"RANK": "0", "WORLD_SIZE": "2"}, {"LOCAL_RANK": "0"}])
def test_a_launch_environment_half_set_is_one_line(tmp_path, monkeypatch, capsys, env):
    """WORLD_SIZE without MASTER_ADDR (scoring joins a group) or LOCAL_RANK alone (the Trainer takes it for a
    launch) failed inside torch / accelerate with 70-90-line tracebacks."""
    from conftest import run_main

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of the data", "label": i % 2}) + "\n" for i in range(4)))
    command = (["mia", "--target", "tiny-gpt-neox", "--data", data, "--out", tmp_path / "m"] if "RANK" in env else
               ["finetune", "--model", "tiny-gpt-neox", "--data", data, "--method", "lora", "--max-steps", "1",
                "--out", tmp_path / "f"])
    code, err = run_main(command, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "MASTER_ADDR and MASTER_PORT (where they meet) are not both set" in err


@pytest.mark.parametrize("var", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"])
def test_a_process_an_mpi_launcher_started_stops_with_one_line(var, tmp_path, monkeypatch, capsys):
    """mpirun sets no RANK/WORLD_SIZE: each of its processes took itself for the only one and wrote the same
    files. One of one (size 1) and a torchrun launch beside the MPI variables go on."""
    from conftest import run_main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv(var, "2")
    code, err = run_main(["seeds", tmp_path / "nowhere"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {var}=2: ") and "torchrun" in err
    monkeypatch.setenv(var, "1")
    code, err = run_main(["seeds", tmp_path / "nowhere"], monkeypatch, capsys)
    assert code != 0 and "MPI" not in err  # the command's own error: the run dir is not there
    monkeypatch.setenv(var, "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run_main(["seeds", tmp_path / "nowhere"], monkeypatch, capsys) == (0, "")


def test_help_and_version_under_a_launcher_are_printed_by_rank_0_alone(monkeypatch, capsys):
    """`torchrun --nproc-per-node 2 -m leakaudit mia --help` (or `--version`) printed it once per process."""
    from conftest import run_main

    monkeypatch.setenv("WORLD_SIZE", "2")
    for args in (["mia", "--help"], ["finetune", "-h"], ["--version"]):
        monkeypatch.setenv("RANK", "1")
        assert run_main(args, monkeypatch, capsys, stdout=True) == (0, "", "")
        monkeypatch.setenv("RANK", "0")
        code, out, _ = run_main(args, monkeypatch, capsys, stdout=True)
        assert code == 0 and ("Usage:" in out or "leakaudit " in out)
