"""Hostile model input through the console entry: pickle weights behind a stray safetensors file, corrupt
weights, malformed configs, models needing their own code, missing devices, and hub ids unreachable offline.
Each is exit 2 with one `error:` line naming the file or field, never a traceback; nothing on disk changes."""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import run_main

from leakaudit import models
from leakaudit.errors import InputError

_run_main = partial(run_main, must_exit=True)  # the CLI's error path exits (SystemExit)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(args, monkeypatch, capsys, root: Path, *expect: str) -> str:
    """Run the CLI; assert exit 2, one `error:` line containing every `expect`, and `root` left untouched."""
    before = _tree(root)
    code, err = _run_main(args, monkeypatch, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in expect:
        assert word in err, (word, err)
    assert _tree(root) == before
    return err


def _info(spec, *extra):
    return ["model-info", "--model", str(spec), "--device", "cpu", *extra]


@pytest.fixture
def model_copy(tmp_path):
    """A fresh copy of the tiny OPT model dir (safetensors) to damage."""
    def make(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(models.tiny_model_dir("tiny-opt"), d)
        return d
    return make


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))


def _lora_adapter(path: Path, safe: bool) -> Path:
    """A tiny LoRA adapter on tiny-gpt-neox, saved as safetensors or as a pickle (adapter_model.bin)."""
    from peft import LoraConfig, get_peft_model

    model, _ = models.build_tiny_model("tiny-gpt-neox")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["query_key_value"], init_lora_weights=False))
    peft_model.save_pretrained(path, safe_serialization=safe)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "tiny-gpt-neox"
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


# ----------------------------------------------------------------------------------------- pickle
def test_adapter_bin_with_stray_safetensors_is_refused_unless_allowed(tmp_path, monkeypatch, capsys):
    """PEFT opens adapter_model.bin when adapter_model.safetensors is absent, whatever else lies in the dir."""
    d = _lora_adapter(tmp_path / "adapter", safe=False)
    assert (d / "adapter_model.bin").exists() and not (d / "adapter_model.safetensors").exists()
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(d / "extra.safetensors"))
    _refused(_info(d), monkeypatch, capsys, tmp_path, "adapter_model.bin", "pickle", "--allow-pickle")
    with pytest.raises(InputError, match="pickle"):
        models.check_model_spec(str(d))
    code, err = _run_main(_info(d, "--allow-pickle"), monkeypatch, capsys)
    assert code == 0, err
    models.check_model_spec(str(d), allow_pickle=True)


def test_adapter_weights_that_do_not_fit_their_config_are_one_line(tmp_path, monkeypatch, capsys):
    """An adapter whose weights are of another rank than adapter_config.json says (or of another size of base)
    stopped in PEFT's load_state_dict with a RuntimeError traceback and exit 1."""
    d = _lora_adapter(tmp_path / "adapter", safe=True)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 4  # the weights are rank 2
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    _refused(_info(d), monkeypatch, capsys, tmp_path, "cannot load adapter", "size mismatch", "--model")


def test_weights_lacking_a_tensor_or_of_another_shape_are_refused(model_copy):
    """A model dir whose safetensors lacks a tensor loaded with that tensor random (transformers' warning only):
    exit 0, and scores that differed on every --no-cache run. Weights of another shape than config.json says
    stopped with transformers' RuntimeError traceback."""
    from safetensors.torch import load_file, save_file

    d = model_copy("lacking")
    weights = load_file(str(d / "model.safetensors"))
    dropped = next(k for k in weights if "layers.1" in k and k.endswith("weight"))
    del weights[dropped]
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    # in-process loads, not the CLI: transformers' own load report (a warning table) precedes the error line
    with pytest.raises(InputError, match=f"lack 1 .*{dropped}"):
        models.load_model(str(d), device="cpu")
    d = model_copy("reshaped")
    _edit_config(d, ffn_dim=json.loads((d / "config.json").read_text())["ffn_dim"] * 2)
    with pytest.raises(InputError, match="differ in shape"):
        models.load_model(str(d), device="cpu")


def test_adapter_weights_lacking_a_tensor_are_refused(tmp_path, monkeypatch, capsys):
    """An adapter_model.safetensors without one of its LoRA tensors loaded with that tensor random (PEFT warns
    only): exit 0, and scores that differed on every --no-cache run."""
    from safetensors.torch import load_file, save_file

    d = _lora_adapter(tmp_path / "adapter", safe=True)
    weights = load_file(str(d / "adapter_model.safetensors"))
    del weights[next(k for k in weights if "lora_A" in k)]
    save_file(weights, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    _refused(_info(d), monkeypatch, capsys, tmp_path, "cannot load adapter", "lacks", "lora_A", "--model")


def test_every_command_that_loads_a_model_takes_allow_pickle(tmp_path, monkeypatch, capsys):
    """The refusal points at --allow-pickle: `perplexity` and `backdoor extract/identify/detect` had no such
    flag (a trusted pickled adapter could be scored but not measured there)."""
    d = _lora_adapter(tmp_path / "adapter", safe=False)
    texts = tmp_path / "t.jsonl"
    texts.write_text(json.dumps({"text": "one two three four"}) + "\n")
    d2 = tmp_path / "d2.jsonl"
    d2.write_text(json.dumps({"query": "Name three rivers"}) + "\n")
    bd = ["--data", str(d2), "--num-samples", "1", "--max-new-tokens", "2"]
    for command in (["perplexity", "--model", str(d), "--data", str(texts), "--out", str(tmp_path / "p")],
                    ["backdoor", "extract", "--model", str(d), "--out", str(tmp_path / "e"), *bd],
                    ["backdoor", "identify", "--model", str(d), "--out", str(tmp_path / "i"), *bd],
                    ["backdoor", "detect", "--model", str(d), "--out", str(tmp_path / "x"), *bd, "--n-words", "1"]):
        _refused(command, monkeypatch, capsys, d, "adapter_model.bin", "--allow-pickle")
        code, err = _run_main([*command, "--allow-pickle"], monkeypatch, capsys)
        assert code == 0, (command, err)


def test_model_bin_with_stray_safetensors_is_refused(model_copy, tmp_path, monkeypatch, capsys):
    d = model_copy("m")
    state = {k: v for k, v in models.build_tiny_model("tiny-opt")[0].state_dict().items()}
    (d / "model.safetensors").rename(d / "extra.safetensors")
    torch.save(state, d / "pytorch_model.bin")
    _refused(_info(d), monkeypatch, capsys, tmp_path, "pytorch_model.bin", "pickle")
    # `run` has no --allow-pickle: its error named that flag anyway ("No such option" when tried)
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"name: x\nmodels: {{base: {d}}}\n")
    err = _refused(["run", str(exp), "--out", str(tmp_path / "out")], monkeypatch, capsys, d,
                   f"{exp}:2: field 'models.base'", "convert them to safetensors")
    assert "pass --allow-pickle" not in err


def test_config_naming_a_pickle_weights_file_is_refused(model_copy, tmp_path, monkeypatch, capsys):
    """config.json's `transformers_weights` overrides transformers' search order, so it decides the file."""
    d = model_copy("m")
    torch.save({}, d / "adapter_model.bin")
    _edit_config(d, transformers_weights="adapter_model.bin")
    _refused(_info(d), monkeypatch, capsys, tmp_path, "adapter_model.bin", "pickle")


def test_sharded_index_with_pickle_or_missing_shard_is_refused(model_copy, tmp_path, monkeypatch, capsys):
    d = model_copy("m")
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    torch.save({}, d / "model-00002-of-00002.bin")
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.bin"}}))
    _refused(_info(d), monkeypatch, capsys, tmp_path, "model-00002-of-00002.bin", "pickle")
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "gone.safetensors"}}))
    _refused(_info(d), monkeypatch, capsys, tmp_path, "index.json", "gone.safetensors", "missing")


# ----------------------------------------------------------------------------------------- corrupt files
@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_corrupt_safetensors_is_one_line(damage, model_copy, tmp_path, monkeypatch, capsys):
    d = model_copy("m")
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    out = tmp_path / "out.jsonl"
    texts = tmp_path / "small.jsonl"
    texts.write_text(json.dumps({"text": "hello"}) + "\n")
    _refused(["score", "--model", str(d), "--data", str(texts), "--out", str(out), "--device", "cpu"],
             monkeypatch, capsys, tmp_path, "model.safetensors", "--model", "safetensors")
    assert not out.exists()


@pytest.mark.parametrize(("text", "expect"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"peft_type": "LORA"}), "base_model_name_or_path"),
])
def test_malformed_adapter_config_names_the_file(text, expect, tmp_path, monkeypatch, capsys):
    d = _lora_adapter(tmp_path / "adapter", safe=True)
    (d / "adapter_config.json").write_text(text)
    _refused(_info(d), monkeypatch, capsys, tmp_path, "adapter_config.json", expect)


@pytest.mark.parametrize(("changes", "expect"), [
    ({"model_type": "evilnet", "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}},
     "trust_remote_code stays off"),
    ({"model_type": "nosuch"}, "model_type 'nosuch' is unknown"),
    ({"model_type": None}, "no model_type"),
    ({"model_type": "vit"}, "not a causal language model"),
])
def test_config_needing_remote_code_or_unknown_is_refused(changes, expect, model_copy, tmp_path, monkeypatch,
                                                          capsys):
    d = model_copy("m")
    _edit_config(d, **changes)
    _refused(_info(d), monkeypatch, capsys, tmp_path, "config.json", "--model", expect)


def test_malformed_model_config_json(model_copy, tmp_path, monkeypatch, capsys):
    d = model_copy("m")
    (d / "config.json").write_text("{not json")
    _refused(_info(d), monkeypatch, capsys, tmp_path, "config.json", "not valid JSON")
    (d / "config.json").write_text(json.dumps({**json.loads((models.tiny_model_dir("tiny-opt") / "config.json")
                                                           .read_text()), "hidden_size": "big"}))
    _refused(_info(d), monkeypatch, capsys, tmp_path, "config.json", "hidden_size", "expected int")


def test_malformed_tokenizer_files(model_copy, tmp_path, monkeypatch, capsys):
    d = model_copy("list")
    (d / "tokenizer_config.json").write_text("[1]")
    _refused(_info(d), monkeypatch, capsys, tmp_path, "tokenizer_config.json", "JSON object")
    d = model_copy("shape")
    (d / "tokenizer.json").write_text(json.dumps({"model": 3}))
    _refused(_info(d), monkeypatch, capsys, tmp_path, "cannot load tokenizer", str(d))


def test_model_dir_without_a_tokenizer_is_refused(model_copy, tmp_path, monkeypatch, capsys):
    """Without tokenizer files AutoTokenizer built a 2-token tokenizer from config.json: every text scored as no
    tokens (NaN), and mia blamed the texts for being too short."""
    d = model_copy("notok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()
    _refused(_info(d), monkeypatch, capsys, tmp_path, "no tokenizer files", str(d))


def test_tokenizer_with_more_tokens_than_embedding_rows_is_refused(tmp_path, monkeypatch, capsys):
    """A tokenizer saved from another model reaches past the embeddings: IndexError in the first forward pass."""
    from transformers import AutoModelForCausalLM

    src = models.tiny_model_dir("tiny-opt")
    model = AutoModelForCausalLM.from_pretrained(str(src))
    rows = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(rows // 2)
    d = tmp_path / "small-vocab"
    model.save_pretrained(str(d))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, d / name)
    texts = tmp_path / "t.jsonl"
    texts.write_text(json.dumps({"text": "hello there"}) + "\n")
    for args in (_info(d), ["score", "--model", str(d), "--data", str(texts), "--out", str(tmp_path / "s.jsonl")]):
        _refused(args, monkeypatch, capsys, tmp_path, "embeddings have", str(rows // 2), "another model")


@pytest.mark.parametrize(("changes", "expect"), [
    ({"peft_type": "NOPE"}, "unknown peft_type 'NOPE'"),
    ({"r": "x"}, "cannot load adapter"),
    ({"base_model_name_or_path": "tiny-opt"}, "query_key_value"),  # a base without the adapted modules
])
def test_adapter_config_fields_that_peft_cannot_use(changes, expect, tmp_path, monkeypatch, capsys):
    d = _lora_adapter(tmp_path / "adapter", safe=True)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    _refused(_info(d), monkeypatch, capsys, tmp_path, str(d), expect)


def test_adapter_without_weights_or_on_an_adapter(tmp_path, monkeypatch, capsys):
    d = _lora_adapter(tmp_path / "adapter", safe=True)
    cfg_file = d / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "base_model_name_or_path": str(d)}))
    _refused(_info(d), monkeypatch, capsys, tmp_path, "adapter_config.json", "is itself an adapter")
    (d / "adapter_model.safetensors").unlink()
    _refused(_info(d), monkeypatch, capsys, tmp_path, "no adapter weights", "adapter_model.safetensors")


# ----------------------------------------------------------------------------------------- devices
def test_missing_or_bogus_device(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(["model-info", "--model", "tiny-opt", "--device", "cuda"], monkeypatch, capsys, tmp_path,
             "--device", "CUDA is not available")
    _refused(["model-info", "--model", "tiny-opt", "--device", "gpu7"], monkeypatch, capsys, tmp_path,
             "--device", "unknown device 'gpu7'")


# ----------------------------------------------------------------------------------------- hub ids offline
@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_uncached_hub_id_fails_at_once_offline(offline, tmp_path, monkeypatch, capsys):
    err = _refused(_info("org/model"), monkeypatch, capsys, tmp_path, "--model", "'org/model'",
                   "not in the local Hugging Face cache (HF_HUB_OFFLINE=1)", "hf download org/model")
    assert "valid specs" not in err
    _refused(_info("bogus-model-xyz"), monkeypatch, capsys, tmp_path, "'bogus-model-xyz'",
             "not in the local Hugging Face cache", "valid specs", "tiny-gpt-neox", "random:NAME")
    d = _lora_adapter(tmp_path / "adapter", safe=True)
    _edit_config_file = d / "adapter_config.json"
    cfg = json.loads(_edit_config_file.read_text())
    cfg["base_model_name_or_path"] = "org/base-model"
    _edit_config_file.write_text(json.dumps(cfg))
    _refused(_info(d), monkeypatch, capsys, tmp_path, "adapter_config.json", "base_model_name_or_path",
             "'org/base-model'", "not in the local Hugging Face cache")
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        models.check_model_spec("org/model")


def test_unreachable_hub_fails_in_one_request(tmp_path, monkeypatch, capsys):
    """Online but no route to the hub: one metadata request decides, not a minute of download retries."""
    import huggingface_hub

    calls = []

    def unreachable(self, repo_id, **kwargs):
        calls.append(repo_id)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    _refused(_info("org/model"), monkeypatch, capsys, tmp_path, "'org/model'", "hub is unreachable",
             "Name or service not known", "hf download org/model")
    assert calls == ["org/model"]


def _fake_hub_cache(cache: Path, repo: str) -> Path:
    """The Hugging Face cache layout (refs/main → snapshots/<commit>/) holding the tiny OPT model."""
    commit = "0" * 40
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(models.tiny_model_dir("tiny-opt"), root / "snapshots" / commit)
    return root / "snapshots" / commit


def test_cached_hub_id_loads_offline_from_its_snapshot(offline, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    snap = _fake_hub_cache(tmp_path / "hub", "org/tiny")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    kind, where = models.resolve_spec("org/tiny")
    assert kind == "dir" and Path(where).resolve() == snap.resolve()
    models.check_model_spec("org/tiny")
    code, err = _run_main(_info("org/tiny"), monkeypatch, capsys)
    assert code == 0, err


# ----------------------------------------------------------------------------------------- plan-time check
def test_check_model_spec_loads_no_weights(model_copy, tmp_path, monkeypatch):
    """Cheap enough for a planner: local dirs and adapters are checked from their files, not by loading."""
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("check_model_spec loaded weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_loading)
    d = model_copy("ok")
    models.check_model_spec(str(d))
    models.check_model_spec(str(_lora_adapter(tmp_path / "adapter", safe=True)))
    models.check_model_spec("tiny-gpt-neox")
    models.check_model_spec("random:pythia-160m")
    bad = model_copy("bad")
    (bad / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(InputError) as info:
        models.check_model_spec(str(bad))
    assert info.value.file == str(bad / "model.safetensors") and info.value.field == "--model"
    with pytest.raises(InputError, match="path not found"):
        models.check_model_spec("./no/such/model")


def test_online_hub_ids_keep_the_hub_path_and_fall_back_to_the_cache(tmp_path, monkeypatch):
    """Online, a hub id the hub knows loads from the hub as before; unreachable, a cached copy is used."""
    import huggingface_hub

    answer: list[BaseException | None] = [None]

    def model_info(self, repo_id, **kwargs):
        if answer[0] is not None:
            raise answer[0]
        return {"id": repo_id}

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    assert models.resolve_spec("org/online") == ("hub", "org/online")
    snap = _fake_hub_cache(tmp_path / "hub", "org/tiny")
    answer[0] = ConnectionError("Name or service not known")
    kind, where = models.resolve_spec("org/tiny")
    assert kind == "dir" and Path(where).resolve() == snap.resolve()
