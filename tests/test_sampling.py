"""Sampling engine: greedy matches a hand-written argmax loop, batching changes nothing, seeds reproduce,
the sampled distribution honours top-k, and a run killed mid-way resumes to the same rows."""

from __future__ import annotations

import json

import pytest
import torch

from leakaudit import sampling
from leakaudit.errors import InputError
from leakaudit.sampling import SamplingConfig, sample

PROMPTS = ["Karen Arnold <", "What is the relation between the given pairs?", "Generate a one-sentence",
           "", "Is there anything I can eat for a breakfast that doesn't include eggs"]


def _texts(samples):
    return [(s.prompt_id, s.sample_index, s.text, s.n_new_tokens) for s in samples]


def _manual_greedy(lm, prompt: str, n: int) -> list[int]:
    """Reference: no padding, no KV cache, full forward each step, argmax; stops after EOS."""
    ids = lm.tokenizer(prompt)["input_ids"] or [lm.tokenizer.eos_token_id]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = lm.model(torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] == lm.tokenizer.eos_token_id:
                break
    return out


def test_greedy_matches_manual_argmax_loop(tiny_model):
    cfg = SamplingConfig(max_new_tokens=10, greedy=True)
    got = sample(tiny_model, PROMPTS, cfg, batch_size=5, progress=False)
    for prompt, s in zip(PROMPTS, got, strict=True):
        ref = _manual_greedy(tiny_model, prompt, 10)
        assert s.n_new_tokens == len(ref)
        assert s.text == tiny_model.tokenizer.decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("greedy", [True, False])
def test_identical_across_batch_sizes(tiny_model, greedy):
    cfg = SamplingConfig(max_new_tokens=12, greedy=greedy, top_k=40, num_samples=2, seed=3)
    runs = [_texts(sample(tiny_model, PROMPTS, cfg, batch_size=b, progress=False)) for b in (1, 3, "auto")]
    assert runs[0] == runs[1] == runs[2]
    assert [(r[0], r[1]) for r in runs[0]] == [(str(i), s) for i in range(len(PROMPTS)) for s in range(2)]


SHARED_START = ("Complete the following sentences: 1. the email address of Karen Arnold is karen@enron.com "
                "2. the email address of Mark Taylor is mark@enron.com 3. the email address of ")


def _count_shared_starts(monkeypatch) -> list[list[int]]:
    """Record, per batch that shares starts, the sizes of its groups (each group's start runs once)."""
    calls: list[list[int]] = []
    real = sampling._decoding_cache

    def counting(lm, batch, groups, length, size):
        if length:
            calls.append(sorted(len(rows) for n, rows in groups if n))
        return real(lm, batch, groups, length, size)

    monkeypatch.setattr(sampling, "_decoding_cache", counting)
    return calls


@pytest.mark.parametrize("greedy", [True, False])
def test_shared_prompt_start_runs_once_and_changes_nothing(tiny_model, greedy, monkeypatch):
    """Prompts that begin alike (a template's demonstrations) share the start's keys and values within a
    batch; greedy rows still equal the hand-written loop, and sampled rows equal one-prompt-at-a-time runs."""
    prompts = [SHARED_START + n for n in ("Sally Beck is", "Jeff Dasovich is", "Tana", "Louise Kitchen is the")]
    calls = _count_shared_starts(monkeypatch)
    cfg = SamplingConfig(max_new_tokens=8, greedy=greedy, top_k=40, seed=5)
    one = _texts(sample(tiny_model, prompts, cfg, batch_size=1, progress=False))
    assert calls == []  # a batch of one row has nothing to share
    shared = _texts(sample(tiny_model, prompts, cfg, batch_size=4, progress=False))
    assert calls == [[4]] and shared == one
    if greedy:
        for prompt, row in zip(prompts, shared, strict=True):
            assert row[2] == tiny_model.tokenizer.decode(_manual_greedy(tiny_model, prompt, 8),
                                                         skip_special_tokens=True)


OTHER_START = ("Here is a list of people and the addresses they write from, one per line: Vince Kaminski writes "
               "from vince@enron.com, Sara Shackleton writes from ")


@pytest.mark.parametrize("greedy", [True, False])
def test_prompts_of_several_starts_share_a_batch_and_change_nothing(tiny_model, greedy, monkeypatch):
    """Two templates' prompts and one unlike either decode in one batch: each template's start runs once,
    left-padded to the longer start in the cache, and every row equals its one-prompt-at-a-time run (greedy:
    the hand-written loop too). Fails if a shorter start's padding or positions are off."""
    prompts = ([SHARED_START + n for n in ("Sally Beck is", "Jeff Dasovich is", "Tana")]
               + [OTHER_START + n for n in ("Kay Mann", "Ben Rogers")] + ["An unrelated short prompt"])
    calls = _count_shared_starts(monkeypatch)
    cfg = SamplingConfig(max_new_tokens=8, greedy=greedy, top_k=40, seed=5)
    one = _texts(sample(tiny_model, prompts, cfg, batch_size=1, progress=False))
    together = _texts(sample(tiny_model, prompts, cfg, batch_size=len(prompts), progress=False))
    assert calls == [[2, 3]] and together == one
    if greedy:
        for prompt, row in zip(prompts, together, strict=True):
            assert row[2] == tiny_model.tokenizer.decode(_manual_greedy(tiny_model, prompt, 8),
                                                         skip_special_tokens=True)


def test_a_batch_of_shared_starts_never_runs_wider_than_the_window(tiny_neox, monkeypatch):
    """A short start padded to a longer one and a short rest padded to a longer rest made a batch wider than
    any of its prompts: with prompts that fill the window, generate() ran past the model's window (transformers
    warned "friendly reminder ... exceeded the model's predefined maximum length" on pii runs). Such a batch
    runs unshared, no wider than its longest prompt, and still equals one-at-a-time runs."""
    from transformers.generation import stopping_criteria

    widths = []
    real = stopping_criteria.MaxLengthCriteria.__call__
    monkeypatch.setattr(stopping_criteria.MaxLengthCriteria, "__call__",
                        lambda self, ids, scores, **kw: widths.append(ids.shape[1]) or real(self, ids, scores, **kw))
    tail = " and then, after a long list of further names and addresses, Jeff Dasovich writes from"
    prompts = [SHARED_START + "Tana", SHARED_START + "Sally Beck is", OTHER_START + "Kay Mann" + tail * 3]
    longest = max(len(tiny_neox.tokenizer(p)["input_ids"]) for p in prompts)
    cfg = SamplingConfig(max_new_tokens=tiny_neox.max_length - longest, greedy=True, stop_at_eos=False)
    together = _texts(sample(tiny_neox, prompts, cfg, batch_size=3, progress=False))
    assert max(widths) == tiny_neox.max_length
    assert together == _texts(sample(tiny_neox, prompts, cfg, batch_size=1, progress=False))


def test_seed_reproduces_and_changes_samples(tiny_neox):
    cfg = SamplingConfig(max_new_tokens=12, top_k=100, num_samples=3, seed=7)
    a = _texts(sample(tiny_neox, PROMPTS, cfg, progress=False))
    b = _texts(sample(tiny_neox, PROMPTS, cfg, progress=False))
    c = _texts(sample(tiny_neox, PROMPTS, SamplingConfig(max_new_tokens=12, top_k=100, num_samples=3, seed=8),
                      progress=False))
    assert a == b
    assert a != c
    # samples of one prompt differ from each other (each row has its own random stream)
    assert len({t[2] for t in a[:3]}) > 1


def test_top_k_one_equals_greedy(tiny_opt):
    greedy = sample(tiny_opt, PROMPTS, SamplingConfig(max_new_tokens=8, greedy=True), progress=False)
    top1 = sample(tiny_opt, PROMPTS, SamplingConfig(max_new_tokens=8, top_k=1, temperature=0.7, seed=5),
                  progress=False)
    assert _texts(greedy) == _texts(top1)


@pytest.mark.parametrize("top_k,top_p", [(None, None), (5, None), (None, 0.9)])
def test_a_temperature_too_small_for_fp32_draws_the_most_likely_tokens(tiny_opt, top_k, top_p):
    """Below ~1e-37 logits / T overflowed fp32 (inf, inf - inf = nan): every row came out as EOS or the lowest
    token id, not the most likely tokens that a temperature near 0 means."""
    greedy = _texts(sample(tiny_opt, PROMPTS, SamplingConfig(max_new_tokens=8, greedy=True), progress=False))
    for t in (1e-39, 1e-45):
        cfg = SamplingConfig(max_new_tokens=8, temperature=t, top_k=top_k, top_p=top_p, seed=3)
        assert _texts(sample(tiny_opt, PROMPTS, cfg, progress=False)) == greedy, t


def test_gumbel_draws_follow_the_top_k_distribution(tiny_neox):
    """The first sampled token's frequencies match softmax over the top-k logits (chi-square style bound)."""
    prompt = "What is the relation"
    k = 4
    n = 400
    cfg = SamplingConfig(max_new_tokens=1, top_k=k, num_samples=n, seed=11, stop_at_eos=False)
    got = sample(tiny_neox, [prompt], cfg, progress=False)
    with torch.no_grad():
        logits = tiny_neox.model(torch.tensor([tiny_neox.tokenizer(prompt)["input_ids"]])).logits[0, -1]
    top = torch.topk(logits, k)
    probs = torch.softmax(top.values, -1)
    first_ids = [tiny_neox.tokenizer(s.text, add_special_tokens=False)["input_ids"][0] for s in got]
    assert set(first_ids) <= set(top.indices.tolist())
    for tid, p in zip(top.indices.tolist(), probs.tolist(), strict=True):
        freq = first_ids.count(tid) / n
        assert abs(freq - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-9


def test_killed_run_resumes_to_the_same_rows(tiny_neox, tmp_path, monkeypatch):
    cfg = SamplingConfig(max_new_tokens=10, top_k=50, num_samples=2, seed=1)
    full = _texts(sample(tiny_neox, PROMPTS, cfg, batch_size=3, progress=False))

    out = tmp_path / "samples.jsonl"
    real = sampling._hf_generate
    calls = {"n": 0}

    def dies_on_third_batch(lm, batch, config):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(lm, batch, config)

    monkeypatch.setattr(sampling, "_hf_generate", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        sample(tiny_neox, PROMPTS, cfg, out_path=out, batch_size=3, progress=False)
    assert len(out.read_text().splitlines()) == 6  # two finished batches of 3 rows
    # a kill in the middle of a write leaves a partial line; it must be dropped, not parsed
    with out.open("a") as fh:
        fh.write('{"prompt_id": "4", "sample_')
    monkeypatch.setattr(sampling, "_hf_generate", real)
    resumed = sample(tiny_neox, PROMPTS, cfg, out_path=out, batch_size=4, progress=False)
    assert _texts(resumed) == full
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    pairs = [(r["prompt_id"], r["sample_index"]) for r in rows]
    assert len(pairs) == len(set(pairs)) == len(PROMPTS) * 2
    assert sorted((r["prompt_id"], r["sample_index"], r["text"], r["n_new_tokens"]) for r in rows) == sorted(full)

    # a complete file is reused without any generation
    monkeypatch.setattr(sampling, "_hf_generate", lambda *a: pytest.fail("should not generate"))
    assert _texts(sample(tiny_neox, PROMPTS, cfg, out_path=out, progress=False)) == full


def test_checkpoint_from_other_options_is_refused(tiny_neox, tmp_path):
    out = tmp_path / "s.jsonl"
    sample(tiny_neox, PROMPTS[:2], SamplingConfig(max_new_tokens=3, seed=1), out_path=out, progress=False)
    with pytest.raises(InputError, match="another model or other sampling options") as err:
        sample(tiny_neox, PROMPTS[:2], SamplingConfig(max_new_tokens=3, seed=2), out_path=out, progress=False)
    assert err.value.line == 1 and err.value.file == str(out)
    # refused untouched: an unterminated last line is cut off only from a file this run wrote
    before = out.read_bytes() + b'{"half": '
    out.write_bytes(before)
    with pytest.raises(InputError, match="another model or other sampling options"):
        sample(tiny_neox, PROMPTS[:2], SamplingConfig(max_new_tokens=3, seed=2), out_path=out, progress=False)
    assert out.read_bytes() == before
    out.write_bytes(b'\xff\xfe not text\n')
    with pytest.raises(InputError, match="not valid UTF-8"):
        sample(tiny_neox, PROMPTS[:2], SamplingConfig(max_new_tokens=3, seed=2), out_path=out, progress=False)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_new_tokens": 0}, "--max-new-tokens"),
    ({"temperature": 0.0}, "--temperature"),
    ({"top_p": 1.5}, "--top-p"),
    ({"top_k": 0}, "--top-k"),
    ({"max_new_tokens": 10_000}, "--max-new-tokens"),
])
def test_bad_options_name_the_option(tiny_neox, kwargs, field):
    with pytest.raises(InputError) as err:
        sample(tiny_neox, ["hi"], SamplingConfig(**kwargs), progress=False)
    assert err.value.field == field


def test_bad_batch_size_and_duplicate_ids(tiny_neox):
    with pytest.raises(InputError, match="positive integer"):
        sample(tiny_neox, ["a"], SamplingConfig(), batch_size="many", progress=False)
    with pytest.raises(InputError, match="duplicate prompt id"):
        sample(tiny_neox, ["a", "b"], SamplingConfig(), prompt_ids=["x", "x"], progress=False)


def test_vllm_backend_reports_missing_install(tiny_neox, tmp_path):
    """Before any work: no output file is started."""
    with pytest.raises(InputError) as err:
        sample(tiny_neox, ["a"], SamplingConfig(), backend="vllm", out_path=tmp_path / "s.jsonl", progress=False)
    assert err.value.field == "--backend" and list(tmp_path.iterdir()) == []


class _FakeVllm:
    """Stands in for the vllm package (no GPU here): records what the adapter asks of it and answers with
    token ids made from each request's seed, so a test sees which row got which seed."""

    def __init__(self):
        import importlib.machinery
        import types

        self.engines: list[dict] = []
        self.requests: list[tuple[list[int], dict]] = []
        self.module = types.ModuleType("vllm")
        self.module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
        fake = self

        self.shut_down: list[dict] = []

        class LLM:
            def __init__(self, **kwargs):
                fake.engines.append(kwargs)
                core = types.SimpleNamespace(shutdown=lambda: fake.shut_down.append(kwargs))
                self.llm_engine = types.SimpleNamespace(engine_core=core)

            def generate(self, prompts, params, use_tqdm=True):
                out = []
                for prompt, p in zip(prompts, params, strict=True):
                    fake.requests.append((prompt["prompt_token_ids"], p))
                    ids = [(p["seed"] + i) % 50 + 10 for i in range(p["max_tokens"])]
                    out.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids)]))
                return out

        self.module.LLM = LLM
        self.module.SamplingParams = lambda **kwargs: kwargs


def test_vllm_adapter_asks_for_what_leakaudit_promises(tiny_neox, monkeypatch):
    """Per-row seeds, no detokenising (leakaudit decodes), one engine at a time, and a memory
    share of what is free (vLLM refuses to start when its share of the card exceeds the free memory, and
    the HF model already holds some). The real engine runs in tests/gpu/test_vllm.py."""
    import dataclasses
    import sys

    from leakaudit.models import resolve_spec
    from leakaudit.sampling import row_seed

    fake = _FakeVllm()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.setattr(sampling, "_VLLM_ENGINES", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: calls.append("mem_get_info") or (60 * 2**30, 140 * 2**30))
    tiny_neox = dataclasses.replace(tiny_neox, device=torch.device("cuda"))  # as loaded on a GPU; vLLM samples
    cfg = SamplingConfig(max_new_tokens=5, num_samples=2, seed=3, top_k=7)
    got = sample(tiny_neox, ["Hello there", "Dear Jeff"], cfg, backend="vllm", progress=False)
    (engine,) = fake.engines
    assert engine["dtype"] == "float32" and engine["trust_remote_code"] is False
    assert engine["gpu_memory_utilization"] == pytest.approx(0.9 * 60 / 140)
    assert calls[-2:] == ["empty_cache", "mem_get_info"]  # as the engine starts: this process's reserve freed first
    assert engine["model"] == str(resolve_spec("tiny-gpt-neox")[1])
    assert len(fake.requests) == 4
    for (ids, p), s in zip(sorted(fake.requests, key=lambda r: r[1]["seed"]),
                           sorted(got, key=lambda s: row_seed(3, s.prompt_id, s.sample_index)), strict=True):
        assert p["seed"] == row_seed(3, s.prompt_id, s.sample_index) and p["detokenize"] is False
        assert p["top_k"] == 7 and p["temperature"] == 1.0 and p["max_tokens"] == 5
        assert p["ignore_eos"] is False
        assert ids == sampling._tokenize_prompts(tiny_neox, [s.prompt], 5)[0]
        assert s.text == tiny_neox.tokenizer.decode([(p["seed"] + i) % 50 + 10 for i in range(5)])
    sample(tiny_neox, ["Hello there"], SamplingConfig(greedy=True), backend="vllm", progress=False)
    assert len(fake.engines) == 1 and fake.requests[-1][1]["temperature"] == 0.0
    assert fake.requests[-1][1]["top_k"] == -1 and fake.requests[-1][1]["top_p"] == 1.0
    bf16 = dataclasses.replace(tiny_neox, dtype=torch.bfloat16)
    assert fake.shut_down == []
    sample(bf16, ["Hello there"], cfg, backend="vllm", progress=False)
    assert [e["dtype"] for e in fake.engines] == ["float32", "bfloat16"]
    # one engine at a time: the fp32 one was shut down before the bf16 one started
    assert fake.shut_down == fake.engines[:1] and list(sampling._VLLM_ENGINES) == [(tiny_neox.spec, "bfloat16")]
    sampling.close_vllm_engines()
    assert fake.shut_down == fake.engines and sampling._VLLM_ENGINES == {}


def test_vllm_is_not_asked_for_temperatures_it_refuses(tiny_neox, monkeypatch, capsys):
    """vLLM refuses temperatures above 2 (seen on a GPU): `auto` samples those with HF, and an explicit
    `vllm` is a one-line error before any engine starts."""
    import dataclasses
    import sys

    fake = _FakeVllm()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.setattr(sampling, "_VLLM_ENGINES", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (60 * 2**30, 140 * 2**30))
    hot, warm = (SamplingConfig(max_new_tokens=3, temperature=t) for t in (2.5, 2.0))
    on_gpu = dataclasses.replace(tiny_neox, device=torch.device("cuda"))
    assert sampling.resolve_backend(on_gpu, "auto", warm) == "vllm"
    assert sampling.resolve_backend(on_gpu, "auto", hot) == "hf"
    assert "sampling at 2.5 with the HF backend" in capsys.readouterr().err  # said once, on stderr
    assert sampling.resolve_backend(on_gpu, "auto", SamplingConfig(greedy=True)) == "vllm"
    with pytest.raises(InputError, match="up to 2, not 2.5") as err:
        sample(on_gpu, ["Hello"], hot, backend="vllm", progress=False)
    assert err.value.field == "--temperature" and fake.engines == []
    assert len(sample(tiny_neox, ["Hello"], hot, backend="auto", progress=False)) == 1 and fake.engines == []


def test_vllm_samples_only_a_model_on_the_gpu_its_engine_starts_on(tiny_neox, monkeypatch, capsys):
    """vLLM's engine process starts on the current CUDA device whatever the model's --device says: a model
    loaded on the CPU, or on another GPU than the current one, samples with HF under `auto` (the second with a
    warning) and is a one-line error under an explicit `vllm`, before any engine starts."""
    import dataclasses
    import sys

    fake = _FakeVllm()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.setattr(sampling, "_VLLM_ENGINES", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cfg = SamplingConfig(max_new_tokens=3)
    assert sampling.resolve_backend(tiny_neox, "auto", cfg) == "hf"  # --device cpu on a GPU machine
    with pytest.raises(InputError, match="samples on a GPU, and tiny-gpt-neox is loaded on cpu") as err:
        sample(tiny_neox, ["Hello"], cfg, backend="vllm", progress=False)
    assert err.value.field == "--backend"
    second = dataclasses.replace(tiny_neox, device=torch.device("cuda", 1))
    assert sampling.resolve_backend(second, "auto", cfg) == "hf"
    assert "starts on cuda:0, not cuda:1" in capsys.readouterr().err
    with pytest.raises(InputError, match="CUDA_VISIBLE_DEVICES") as err:
        sample(second, ["Hello"], cfg, backend="vllm", progress=False)
    assert err.value.field == "--device" and fake.engines == []
    assert sampling.resolve_backend(dataclasses.replace(tiny_neox, device=torch.device("cuda", 0)), "auto") == "vllm"
    # weights changed in memory: vLLM would sample the files' weights under the new weights' key
    from leakaudit.models import load_model

    changed = dataclasses.replace(load_model("tiny-gpt-neox", device="cpu", dtype="fp32"), device=torch.device("cuda", 0))
    with torch.no_grad():
        next(changed.model.parameters()).mul_(2)
    assert sampling.resolve_backend(changed, "auto", cfg) == "hf"
    with pytest.raises(InputError, match="changed in memory since loading"):
        sample(changed, ["Hello"], cfg, backend="vllm", progress=False)


def test_a_vllm_run_key_names_the_vllm_release(tiny_neox, monkeypatch):
    """A file sampled with one vLLM release is not resumed with another (its sampler is its own); HF keys do
    not change with vLLM's version."""
    cfg = SamplingConfig(max_new_tokens=3)
    keys = {}
    for release in ("0.26.0", "0.27.0"):
        monkeypatch.setattr(sampling, "package_version", lambda name, r=release: r)
        keys[release] = (sampling.run_key(tiny_neox, cfg, "vllm"), sampling.run_key(tiny_neox, cfg, "hf"))
    assert keys["0.26.0"][0] != keys["0.27.0"][0] and keys["0.26.0"][1] == keys["0.27.0"][1]
    # HF rows on a GPU draw from a CUDA generator (another stream than the CPU's): a file is not resumed across
    import dataclasses

    on_gpu = dataclasses.replace(tiny_neox, device=torch.device("cuda", 0))
    assert sampling.run_key(on_gpu, cfg, "hf") != keys["0.26.0"][1]
    assert sampling.run_key(on_gpu, cfg, "vllm") == keys["0.27.0"][0]  # vLLM samples on the GPU either way
    monkeypatch.undo()
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert sampling.package_version("vllm") == "not installed"  # no vLLM: still a key, not a traceback


def test_a_start_longer_than_a_sliding_window_is_not_shared(tiny_neox, monkeypatch):
    """A sliding-window layer keeps only the window's last keys, so a start that long is not cached whole:
    the batch runs without a shared start (and still equals one-at-a-time runs)."""
    prompts = [SHARED_START + n for n in ("Sally Beck is", "Jeff Dasovich is")]
    calls = _count_shared_starts(monkeypatch)
    monkeypatch.setattr(tiny_neox.model.config, "sliding_window", 16, raising=False)
    cfg = SamplingConfig(max_new_tokens=6, greedy=True)
    together = _texts(sample(tiny_neox, prompts, cfg, batch_size=2, progress=False))
    assert calls == [] and together == _texts(sample(tiny_neox, prompts, cfg, batch_size=1, progress=False))
    monkeypatch.setattr(tiny_neox.model.config, "sliding_window", None)
    sample(tiny_neox, prompts, cfg, batch_size=2, progress=False)
    assert calls == [[2]]


def test_stop_at_eos_false_runs_past_the_models_own_eos(tiny_neox, monkeypatch):
    """With every token the model's EOS (its generation_config), stopping at EOS gives one token per sample;
    `stop_at_eos=False` gives max_new_tokens whatever the batch (generate() used to fill the model's EOS back
    in, so a row alone stopped early and the same row batched beside a longer one did not)."""
    every = list(range(tiny_neox.model.config.vocab_size))
    monkeypatch.setattr(tiny_neox.model.generation_config, "eos_token_id", every)
    prompts = ["Hello there", "A much longer prompt about the weather today", "x"]
    stop = sample(tiny_neox, prompts, SamplingConfig(max_new_tokens=6, greedy=True), progress=False)
    assert [s.n_new_tokens for s in stop] == [1, 1, 1]
    for batch_size in (1, 3):
        run = sample(tiny_neox, prompts, SamplingConfig(max_new_tokens=6, greedy=True, stop_at_eos=False),
                     batch_size=batch_size, progress=False)
        assert [s.n_new_tokens for s in run] == [6, 6, 6]


@pytest.mark.parametrize("greedy", [True, False])
def test_the_models_generation_config_changes_no_sample(tiny_neox, monkeypatch, greedy):
    """A generation_config.json's fields that leakaudit's config leaves unset (suppress_tokens, sequence_bias,
    stop_strings) were filled in by generate(): the samples came out different, or it raised for want of a
    tokenizer. The model's own EOS still stops a sample (read before generate)."""
    from transformers import GenerationConfig

    cfg = SamplingConfig(max_new_tokens=8, greedy=greedy, top_k=40, seed=1)
    plain = _texts(sample(tiny_neox, PROMPTS, cfg, batch_size=2, progress=False))
    odd = GenerationConfig(bos_token_id=0, eos_token_id=0, suppress_tokens=list(range(10, 1000)),
                           sequence_bias=[[[5], 50.0]], stop_strings=["e"], forced_bos_token_id=7)
    monkeypatch.setattr(tiny_neox.model, "generation_config", odd)
    assert _texts(sample(tiny_neox, PROMPTS, cfg, batch_size=2, progress=False)) == plain
    assert tiny_neox.model.generation_config is odd


def test_a_checkpoint_with_unicode_line_separators_resumes(tiny_neox, tmp_path):
    """U+2028/U+2029/U+0085 in a prompt or sample: written escaped, so the rerun reads one row per line
    (str.splitlines broke the row at them and every resume of the file failed)."""
    cfg = SamplingConfig(max_new_tokens=3, greedy=True)
    prompts = ["Dear Karen,\u2028please call", "one\u2029two\x85three", "hello"]
    out = tmp_path / "s.jsonl"
    first = sample(tiny_neox, prompts, cfg, out_path=out, progress=False)
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3
    again = sample(tiny_neox, prompts, cfg, out_path=out, progress=False)
    assert [(s.prompt, s.text) for s in again] == [(s.prompt, s.text) for s in first]
    assert again[0].prompt == "Dear Karen,\u2028please call"
    # a file of an earlier version, with the separator raw inside a string, is read too
    out.write_text(out.read_text(encoding="utf-8").replace("\\u2028", "\u2028"), encoding="utf-8")
    assert [s.text for s in sample(tiny_neox, prompts, cfg, out_path=out, progress=False)] == [s.text for s in first]


def test_gpu_rows_per_batch_fit_the_real_cache_size(monkeypatch):
    """Rows per sampling batch on a GPU come from each token's real cache size (the model's head size, the
    text config): a Qwen3 head of 16 where hidden / heads is 8 took twice the rows that fit."""
    import types

    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    lm = types.SimpleNamespace(model=model, dtype=torch.float32, device=torch.device("cuda", 0), tokenizer=[0] * 64)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (2**20, 2**30))
    per_row = 2 * 2 * 2 * 16 * 4 * 100 + 64 * 16  # keys and values x layers x kv heads x head size x fp32, 100 tokens
    assert sampling._auto_rows(lm, 100) == int(2**20 * 0.6 // per_row) == 12  # 23 with head size 8
    # planning a call's batches asks the driver once, not once per row
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: asked.append(1) or (2**20, 2**30))
    rows = [sampling._Row(i, str(i), 0, "p", [1] * 90, str(i)) for i in range(30)]
    batches = sampling._make_batches(lm, rows, SamplingConfig(max_new_tokens=10), None)
    assert [len(b) for b in batches] == [12, 12, 6] and len(asked) == 1


def test_the_progress_line_names_what_samples(tiny_neox, monkeypatch, capsys):
    """`pii` samples the target, then the baseline: both bars read "sampling"; the caller names them."""
    monkeypatch.setenv("LEAKAUDIT_PROGRESS_INTERVAL", "0.000001")  # a line per prompt, into the captured log
    sample(tiny_neox, ["a b", "c d", "e f"], SamplingConfig(max_new_tokens=2, seed=0), batch_size=1,
           description="sampling (baseline)")
    assert "sampling (baseline): 1/3" in capsys.readouterr().err
