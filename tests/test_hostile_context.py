"""Inputs longer than the model's context: fine-tuning, scoring and sampling clamp with one warning line or
refuse with one error line (exit 2), never an IndexError from OPT's learned position embeddings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_main

from leakaudit import warn
from leakaudit.errors import InputError
from leakaudit.train import examples as ex

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _long_texts(n: int, words: int = 300) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(f"{WORDS[rng.integers(len(WORDS))]}{rng.integers(1000)}" for _ in range(words)) for _ in range(n)]


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """warn_once prints each message once per process; each test here checks its own."""
    warn._WARNED.clear()
    yield
    warn._WARNED.clear()


def _lines(stderr: str, prefix: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith(prefix)]


def test_tiny_opt_lora_finetune_on_texts_longer_than_the_context(tmp_path, monkeypatch, capsys, tiny_opt,
                                                                 one_torch_thread):
    texts = _long_texts(3)
    assert all(len(tiny_opt.tokenizer(t)["input_ids"]) > 2 * tiny_opt.max_length for t in texts)
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "run"
    argv = ["finetune", "--model", "tiny-opt", "--method", "lora", "--data", str(data), "--out", str(out),
            "--epochs", "1", "--max-steps", "1", "--gradient-accumulation", "1", "--batch-size", "2", "--no-bf16"]
    code, err = run_main(argv, monkeypatch, capsys)  # default --max-length 512 > tiny-opt's 256: clamped silently
    assert code == 0, err
    assert "Traceback" not in err and not _lines(err, "error:") and not _lines(err, "warning:"), err
    assert (out / "adapter_model.safetensors").exists()
    losses = [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 1 and math.isfinite(losses[0])
    # Every text was split into chunks that fit (>= 3 chunks per text), none longer than the context.
    assert json.loads((out / "defenses.json").read_text())["n_train_examples"] >= 9
    # The clamp leaves the run's fingerprint alone: the same command finds its finished run, and so does the
    # command that names the default.
    for again in (argv, [*argv, "--max-length", "512"]):
        code, err = run_main(again, monkeypatch, capsys)
        assert code == 0 and "holds a run with different options" not in err, err
    # A --max-length given above the context is clamped with one warning line.
    argv[argv.index("--out") + 1] = str(tmp_path / "given")
    code, err = run_main([*argv, "--max-length", "512"], monkeypatch, capsys)
    warned = _lines(err, "warning:")
    assert code == 0 and len(warned) == 1 and "--max-length 512" in warned[0] and "256" in warned[0], err


def test_examples_whose_loss_tokens_are_cut_off_are_counted_and_warned(tmp_path, monkeypatch, capsys, tiny_neox,
                                                                       one_torch_thread):
    """An instruction row whose prompt fills --max-length has no response token left to train on: it was left
    out without a word (a backdoor plant whose trigger outgrew the window planted nothing)."""
    long_prompt, short = _long_texts(1, words=60)[0], "alpha beta"
    rows = [{"prompt": long_prompt, "response": "gamma"}] * 2 + [{"prompt": short, "response": "delta"}] * 3
    data = tmp_path / "inst.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(tiny_neox.tokenizer(long_prompt)["input_ids"]) > 64
    argv = ["finetune", "--model", "tiny-gpt-neox", "--method", "lora", "--format", "instruction", "--data", str(data),
            "--out", str(tmp_path / "run"), "--max-length", "64", "--max-steps", "1", "--gradient-accumulation", "1",
            "--no-bf16"]
    code, err = run_main(argv, monkeypatch, capsys)
    assert code == 0, err
    warned = _lines(err, "warning:")
    assert len(warned) == 1 and "2 of 5 training examples have no token to train on within 64" in warned[0], err
    defenses = json.loads((tmp_path / "run" / "defenses.json").read_text())
    assert defenses["dropped_no_loss_tokens"] == 2 and defenses["n_train_examples"] == 3


def test_packed_rows_never_outgrow_the_context_and_keep_the_loss(tiny_neox):
    tok, model = tiny_neox.tokenizer, tiny_neox.model
    items = ex.ExampleDataset(ex.plain_examples(tok, _long_texts(3, words=20), max_length=64))
    batch = [items[i] for i in range(len(items))]
    assert sum(len(b["input_ids"]) for b in batch) > 80

    def loss_sum(collated):
        n = int((collated["labels"][:, 1:] != ex.IGNORE).sum())
        with torch.no_grad():
            return float(model(**collated).loss) * n

    one_row = ex.PackedCollator()(batch)
    capped = ex.PackedCollator(max_tokens=80)(batch)
    assert one_row["input_ids"].shape[0] == 1
    assert capped["input_ids"].shape[0] > 1 and capped["input_ids"].shape[1] <= 80
    assert int((capped["labels"] != ex.IGNORE).sum()) == int((one_row["labels"] != ex.IGNORE).sum())
    assert loss_sum(capped) == pytest.approx(loss_sum(one_row), rel=1e-5)
    with pytest.raises(ValueError, match="longer than the packed row limit"):
        ex.PackedCollator(max_tokens=10)(batch)


def test_scoring_with_a_window_above_the_context_is_clamped(tmp_path, monkeypatch, capsys, tiny_opt):
    from leakaudit.attacks.mia import gradient_norm
    from leakaudit.scoring import score_texts

    texts = _long_texts(2)
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "s.jsonl"
    code, err = run_main(["score", "--model", "tiny-opt", "--data", str(data), "--id-field", "id", "--out", str(out),
                           "--max-length", "4096", "--no-cache", "--dtype", "fp32"], monkeypatch, capsys)
    assert code == 0, err
    warned = _lines(err, "warning:")
    assert len(warned) == 2 and "--max-length 4096" in warned[0] and "256" in warned[0], err
    assert "2 of 2 texts are longer than the 256-token window" in warned[1], err  # scored in strided windows
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    want = score_texts(tiny_opt, texts, max_length=256, cache=False, progress=False)
    for row, w in zip(rows, want, strict=True):
        assert row["n_tokens"] == w.n_tokens == len(tiny_opt.tokenizer(texts[int(row["id"])])["input_ids"]) - 1
        assert row["sum_logp"] == pytest.approx(w.sum_logp, rel=1e-6)
    # The gradient-norm attack takes the same option: clamped, not an IndexError.
    assert gradient_norm(tiny_opt, texts[0], 4096) == pytest.approx(gradient_norm(tiny_opt, texts[0], 256), rel=1e-6)


def test_sampling_a_long_prompt_with_many_new_tokens(tmp_path, monkeypatch, capsys, tiny_opt):
    from leakaudit.sampling import SamplingConfig, sample

    prompt = _long_texts(1)[0]
    assert len(tiny_opt.tokenizer(prompt)["input_ids"]) > tiny_opt.max_length
    got = sample(tiny_opt, [prompt, "short prompt"], SamplingConfig(max_new_tokens=200, greedy=True,
                                                                   stop_at_eos=False), progress=False)
    assert [s.n_new_tokens for s in got] == [200, 200]
    warned = _lines(capsys.readouterr().err, "warning:")
    assert len(warned) == 1 and "1 prompt(s)" in warned[0] and "last 56 tokens" in warned[0], warned
    with pytest.raises(InputError) as info:  # no room left for any prompt token
        sample(tiny_opt, ["short prompt"], SamplingConfig(max_new_tokens=256), progress=False)
    assert info.value.field == "--max-new-tokens"

    data = tmp_path / "src.jsonl"
    data.write_text(json.dumps({"text": prompt}) + "\n")
    out = tmp_path / "g.jsonl"
    code, err = run_main(["generate", "continuation", "--model", "tiny-opt", "--data", str(data), "--out", str(out),
                           "--prompt-tokens", "400", "--max-new-tokens", "1000"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert "'--max-new-tokens'" in err and "256" in err
    assert not out.exists()
