"""`mia`, `user-inference`, `perplexity` and `pii-logprob` launched as 2 CPU processes (torchrun, gloo) give the
results of one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import torch_threads

from leakaudit.distributed import gather_ragged, score_texts_distributed, shard, world
from leakaudit.scoring import score_texts

ATTACKS = "loss,zlib,min_k,min_k_pp,ref,lowercase,recall,gradnorm,neighbourhood,lira"


def _write_data(d: Path) -> None:
    from leakaudit import resources

    rows = resources.path("self-instruct-seed", "seed_tasks.jsonl").read_text().splitlines()
    texts = [json.loads(r)["instruction"] for r in rows][:27]
    with (d / "labelled.jsonl").open("w") as fh:
        for i, t in enumerate(texts):  # 13 members, 14 non-members; users of 3 samples each
            fh.write(json.dumps({"text": t, "label": int(i % 2 == 0), "user": f"u{i // 3}",
                                 "ulabel": int((i // 3) % 2 == 0)}) + "\n")


def _commands(out: Path, data: Path, mlm: Path) -> list[list[str]]:
    common = ["--n-bootstrap", "50", "--no-cache", "--dtype", "fp32"]
    return [["mia", "--target", "tiny-gpt-neox", "--reference", "tiny-opt", "--data", str(data), "--attacks", ATTACKS,
             "--neighbour-model", str(mlm), "--neighbours", "4", "--lira-reference", "tiny-opt", "--lira-reference",
             "tiny-gpt-neox", "--out", str(out / "mia"), *common],
            ["user-inference", "--target", "tiny-gpt-neox", "--reference", "tiny-opt", "--data", str(data),
             "--user-field", "user", "--label-field", "ulabel", "--samples-per-user", "1,2,all",
             "--out", str(out / "ui"), *common],
            ["perplexity", "--model", "tiny-gpt-neox", "--data", str(data), "--out", str(out / "ppl"),
             "--dtype", "fp32"],
            ["pii-logprob", "--model", "tiny-gpt-neox", "--baseline", "tiny-opt", "--templates", "A,D",
             "--n-targets", "7", "--n-candidates", "3", "--out", str(out / "pl"), "--dtype", "fp32"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_helpers_call_through(tiny_neox):
    assert world() == (0, 1) and shard(3) == [0, 1, 2]
    arrays = [np.arange(3, dtype=np.float32), np.zeros(0, np.float32)]
    assert [a.tolist() for a in gather_ragged(arrays, 2)] == [[0, 1, 2], []]
    texts = ["Give three tips for staying healthy.", "Sort these numbers."]
    a = score_texts_distributed(tiny_neox, texts, moments=True, cache=False, progress=False)
    b = score_texts(tiny_neox, texts, moments=True, cache=False, progress=False)
    assert all(np.array_equal(x.logp, y.logp) and np.array_equal(x.var, y.var) for x, y in zip(a, b, strict=True))


def test_mia_and_user_inference_in_two_processes_match_one_process(tmp_path, tiny_mlm_dir):

    from leakaudit.cli import app

    _write_data(tmp_path)
    data = tmp_path / "labelled.jsonl"
    one, two = tmp_path / "one", tmp_path / "two"
    with torch_threads(1):
        for argv in _commands(one, data, tiny_mlm_dir):
            app(argv, standalone_mode=False)
    driver = tmp_path / "driver.py"
    driver.write_text("import json, sys\nfrom leakaudit.cli import app\n"
                      "for argv in json.loads(sys.argv[1]):\n    app(argv, standalone_mode=False)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LEAKAUDIT_DTYPE": "fp32",
           "TMPDIR": str(tmp_path)}  # torchrun's temp dirs go with the test
    # torchrun is what `accelerate launch --multi_gpu` runs underneath (it sets the same RANK/WORLD_SIZE/
    # MASTER_* environment) and starts ~10 s faster; docs/attacks.md shows the accelerate form.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(driver), json.dumps(_commands(two, data, tiny_mlm_dir))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    m1, m2 = (json.loads((d / "mia" / "mia.json").read_text()) for d in (one, two))
    for name in ATTACKS.split(","):
        for key in ("auc", "auc_ci", "tpr_at_fpr", "n_members", "n_nonmembers"):
            assert m1["attacks"][name][key] == pytest.approx(m2["attacks"][name][key], abs=1e-9), (name, key)
    s1, s2 = ([json.loads(x) for x in (d / "mia" / "scores.jsonl").read_text().splitlines()] for d in (one, two))
    assert [r["id"] for r in s1] == [r["id"] for r in s2]
    for name in ATTACKS.split(","):
        assert np.allclose([r[name] for r in s1], [r[name] for r in s2], rtol=1e-5, atol=1e-7), name

    p1, p2 = (json.loads((d / "ppl" / "perplexity.json").read_text()) for d in (one, two))
    for key in ("perplexity", "mean_text_perplexity", "nll_per_token"):
        assert p1[key] == pytest.approx(p2[key], rel=1e-6), key
    assert p1["n_texts"] == p2["n_texts"] == 27 and p1["n_tokens"] == p2["n_tokens"]
    l1, l2 = ([json.loads(x) for x in (d / "pl" / "logprobs.jsonl").read_text().splitlines()] for d in (one, two))
    assert len(l1) == 28 and [{k: r[k] for k in ("role", "target", "template", "rank")} for r in l1] == [
        {k: r[k] for k in ("role", "target", "template", "rank")} for r in l2]
    assert np.allclose([r["logp"] for r in l1], [r["logp"] for r in l2], rtol=1e-5, atol=1e-6)
    u1, u2 = (json.loads((d / "ui" / "user_inference.json").read_text()) for d in (one, two))
    assert u1["n_users_in"] == u2["n_users_in"] == 5 and u1["n_users_out"] == u2["n_users_out"] == 4
    for m in ("1", "2", "all"):
        assert u1["per_m"][m]["auc"] == pytest.approx(u2["per_m"][m]["auc"], abs=1e-9)
    r1, r2 = ([json.loads(x) for x in (d / "ui" / "user_scores.jsonl").read_text().splitlines()] for d in (one, two))
    assert [r["user"] for r in r1] == [r["user"] for r in r2]
    assert np.allclose([r["scores"]["all"] for r in r1], [r["scores"]["all"] for r in r2], rtol=1e-5)


def test_every_option_has_a_name_torchrun_passes_through():
    """torchrun parses its whole command line with abbreviations on: an option of ours that abbreviates several
    of its own (`generate self-instruct --n`: --nnodes, --nproc-per-node, ...) stopped it with a usage error,
    so the command could not be launched at all. Each option needs one name it hands to leakaudit as given."""
    import contextlib
    import importlib
    import io

    import typer
    from torch.distributed.run import get_args_parser

    from leakaudit.cli import app

    click = importlib.import_module(typer.BadParameter.__module__.rsplit(".", 1)[0])
    root = typer.main.get_command(app)
    ctx = click.Context(root)
    parser = get_args_parser()

    def passes(name: str) -> bool:
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                args = parser.parse_args(["-m", "leakaudit", "cmd", name, "1"])
        except SystemExit:
            return False
        return args.training_script_args == ["cmd", name, "1"]

    refused = []

    def walk(command, path: list[str]) -> None:
        if hasattr(command, "list_commands"):
            for sub in command.list_commands(ctx):
                walk(command.get_command(ctx, sub), [*path, sub])
        for param in command.params:
            names = [o for o in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]
                     if o.startswith("--")]
            if names and not any(passes(o) for o in names):
                refused.append((" ".join(path), names))

    walk(root, [])
    assert refused == []


def test_launched_window_warning_counts_every_process_texts(tmp_path):
    """Each process warned with its own shard's counts, and rank 0 said "3 of 3 texts are longer than the
    16-token window" of 5 texts that all were: the warning now sums every process's counts, said once."""
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": f"text {i} " + "with quite a few more words " * 4}) + "\n"
                            for i in range(5)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LEAKAUDIT_DTYPE": "fp32", "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "leakaudit", "score", "--model", "tiny-gpt-neox", "--data", str(data),
           "--out", str(tmp_path / "s.jsonl"), "--max-length", "16", "--stride", "8", "--no-cache"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "-token window" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 5 of 5 texts are longer"), proc.stderr[-3000:]
