"""Shared fixtures: tiny seeded models (Pythia and OPT architectures) and an isolated cache dir."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

# Converted models persist between runs in the repo's own (git-ignored) cache, apart from the user's.
os.environ.setdefault("LEAKAUDIT_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "test"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as the CLI's main() sets it; load_model keeps a caller's
# The one precision switch (load dtype and training autocast, models.default_autocast_bf16): fp32 unless the
# caller sets it, so `LEAKAUDIT_DTYPE=bf16 pytest` runs the suite as a CPU with fast bf16 would.
os.environ.setdefault("LEAKAUDIT_DTYPE", "fp32")
# One torch thread per test process: tiny models are thread-bound, not compute-bound, and with two threads
# anything else running on the machine stalls a forward pass 3-10x (BENCHMARKS.md). `make test` runs one
# such process per CPU, at most 4 (pytest-xdist), instead. Set before torch is imported, so OpenMP never starts more.
os.environ.setdefault("LEAKAUDIT_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", os.environ["LEAKAUDIT_THREADS"])


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["LEAKAUDIT_THREADS"]))


# The files whose tests take longest (11-75 s each, summed over a file's tests, fp32, on the 2-core machine;
# BENCHMARKS.md), longest first. `make test` hands whole files to its workers in collection order (--dist loadfile
# --no-loadscope-reorder), so with these first the last files handed out are short and the workers finish
# together; xdist's default order puts the fewest-test files last, and those are these slow one-test files.
LONGEST_FILES = ["test_backdoor.py", "test_experiment.py", "test_launched_run.py", "test_distributed.py", "test_models.py", "test_ddp.py",
                 "test_report.py", "test_user_inference.py", "test_defenses.py", "test_kinds_pii_logprob.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_collection_finish(session):
    """Leave what collection imported (torch, transformers, every test module: ~450k objects) out of later full
    garbage collections. The HF Trainer runs gc.collect() at the start of every training (accelerate's
    free_memory), and in a test process that scan took ~0.3 s: ~90 fine-tunes spent ~25 s of the suite in it."""
    import gc

    gc.freeze()


@pytest.fixture(scope="session")
def tiny_neox():
    """Tiny GPT-NeoX (Pythia architecture), fp32, eval mode."""
    from leakaudit.models import load_model

    return load_model("tiny-gpt-neox", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_opt():
    """Tiny OPT, fp32, eval mode."""
    from leakaudit.models import load_model

    return load_model("tiny-opt", dtype="fp32")


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (SmolLM2-135M-Instruct from the shipped GGUF)."""
    from leakaudit.models import load_model

    return load_model("default", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_mlm_dir(tmp_path_factory) -> Path:
    """A tiny BERT masked LM (random, seeded) with the tiny models' tokenizer, saved as safetensors: the
    neighbourhood attack's word-swap proposer (no masked LM ships)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from leakaudit.models.factories import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("tiny-mlm")
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=256))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def mlm(tiny_mlm_dir):
    """The tiny masked LM loaded as the neighbourhood attack loads it."""
    import torch

    from leakaudit.attacks.neighbourhood import load_masked_lm

    return load_masked_lm(str(tiny_mlm_dir), torch.device("cpu"))


@pytest.fixture(params=["tiny-gpt-neox", "tiny-opt"])
def tiny_model(request, tiny_neox, tiny_opt):
    """Each tiny architecture in turn."""
    return tiny_neox if request.param == "tiny-gpt-neox" else tiny_opt


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block on n torch threads, then restore: tiny models train fastest on one thread on 2 cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (tiny-model training), restored afterwards."""
    with torch_threads(1):
        yield


def run_main(args, monkeypatch, capsys, *, must_exit: bool = False, stdout: bool = False) -> tuple:
    """The console entry point in-process (the path that prints `error:`), without a subprocess's imports:
    its exit code (0 when it returns) and stderr, and with `stdout` its stdout too (code, out, err), where a
    command's result goes. `must_exit`: returning without SystemExit fails the test."""
    from leakaudit.cli import main

    monkeypatch.setattr(sys, "argv", ["leakaudit", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    else:
        if must_exit:
            pytest.fail("the command returned instead of exiting")
    captured = capsys.readouterr()
    return (code, captured.out, captured.err) if stdout else (code, captured.err)


@pytest.fixture(autouse=True)
def _warnings_said_afresh():
    """warn_once says a message once per process: a test asserting a warning passed alone and failed after
    another test in its worker had said the same line."""
    from leakaudit import warn

    warn._WARNED.clear()
    yield
