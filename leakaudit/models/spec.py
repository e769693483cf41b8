"""Model specs: what a spec names (resolve_spec) and whether it can load (check_model_spec), without weights.

Safety: `trust_remote_code` is always off (a model needing its own code is refused), and weights load from
safetensors only: when the file transformers or PEFT would open is a pickle (`pytorch_model.bin`,
`adapter_model.bin`) it is refused unless the caller passes allow_pickle=True (`--allow-pickle`).
Every spec is checked before weights load, so bad input is one InputError, and a hub id that is not cached
fails at once offline instead of after a minute of retries."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from leakaudit.errors import InputError, first_line
from leakaudit.models.factories import RANDOM_PREFIX, TINY_SPECS, random_model_config, tiny_model_dir
from leakaudit.models.gguf import default_gguf_path, gguf_to_safetensors

DEFAULT_SPEC = "default"
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
# Any one of these in a model dir is a tokenizer transformers can load; with none, AutoTokenizer built an empty
# one from config.json (2 tokens) and every text scored as no tokens.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                   "vocab.txt", "sentencepiece.bpe.model")
HUB_TIMEOUT_S = 10  # one metadata request decides whether a hub id can load; no minute of download retries


#: the config fields a model states its context window in, by architecture
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def text_config(model: Any) -> Any:
    """The config of a model's language part: a multimodal wrapper (Gemma 3, Llava) keeps its layer count,
    head size and soft-cap there, not at its top level."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_window(config: object) -> int | None:
    """The context window a model config states (a transformers config object or its config.json as a dict);
    None where it states none. Read by the loaded model and, before anything loads, by the plan checks."""
    for name in CONTEXT_FIELDS:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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
        try:
            return "dir", gguf_to_safetensors(p.resolve())
        except (ValueError, KeyError, IndexError, OSError, struct.error) as exc:  # what gguf's reader raises
            raise InputError(f"not a readable GGUF model: {first_line(exc)}", file=p, field="--model") from None
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
                         f"({first_line(exc)}); {how}", field="--model") from None
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
        check_model_dir(Path(where), allow_pickle)
    elif kind == "adapter":
        check_model_spec(adapter_base(Path(where), allow_pickle), allow_pickle=allow_pickle)


def check_masked_lm_spec(spec: str) -> Path | str:
    """The folder (or hub id) of a masked language model, checked as a causal model's is (safetensors only, no
    model code): the neighbourhood attack's word-swap proposer. Returns where to load it from."""
    kind, where = resolve_spec(spec)
    if kind in ("adapter", "random"):
        what = "an adapter" if kind == "adapter" else "an untrained causal model"
        raise InputError(f"'{spec}' is not a masked language model ({what})", field="--model")
    if kind == "dir":
        check_model_dir(Path(where), allow_pickle=False, task="masked")
    return where


def _read_json_object(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not valid JSON ({first_line(exc)})", file=file, field="--model") from None
    if not isinstance(data, dict):
        raise InputError(f"expected a JSON object, got {type(data).__name__}", file=file, field="--model")
    return data


def check_model_dir(path: Path, allow_pickle: bool, task: str = "causal") -> None:
    """Refuse before loading what from_pretrained would fail on with a traceback or should never run: a bad
    config.json, an architecture that needs the model's own code or is not a `task` ("causal" or "masked")
    language model, no tokenizer, pickle weights, corrupt safetensors."""
    cfg_file = path / "config.json"
    cfg = _read_json_object(cfg_file)
    _check_architecture(cfg_file, cfg, task)
    _check_side_json(path)
    _check_config_fields(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InputError("no tokenizer files in this model dir (e.g. tokenizer.json); save the tokenizer beside "
                         "the weights (tokenizer.save_pretrained(dir))", file=path, field="--model")
    for weights in _weight_files(path, cfg, allow_pickle):
        if weights.name.endswith(".safetensors"):
            _check_safetensors(weights)


def _check_architecture(cfg_file: Path, cfg: dict, task: str = "causal") -> None:
    """Loadable by transformers' own classes: trust_remote_code stays off, so code shipped with a model never runs."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

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
    names = MODEL_FOR_MASKED_LM_MAPPING_NAMES if task == "masked" else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if model_type not in names:
        raise InputError(f"model_type '{model_type}' is not a {task} language model", file=cfg_file,
                         field="--model")
    if task == "masked" and cfg.get("is_encoder_decoder", getattr(CONFIG_MAPPING[model_type], "is_encoder_decoder",
                                                                  False)):
        raise InputError(ENCODER_DECODER.format(model_type), file=cfg_file, field="--model")


#: transformers counts BART, mBART and MVP as masked LMs, but their logits come from a decoder that needs its own
#: input: the neighbourhood attack's proposer must predict each token in place from the whole text (an encoder)
ENCODER_DECODER = ("model_type '{}' is an encoder-decoder model; the word swaps need an encoder masked language "
                   "model that predicts each token in place (e.g. BERT, RoBERTa, DeBERTa)")


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
        raise InputError(f"invalid config ({first_line(exc)})", file=path / "config.json", field="--model") from None


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
                     "convert them to safetensors (from_pretrained, then save_pretrained, where you trust them); "
                     "the commands that have --allow-pickle load them if you trust the source",
                     file=path, field="--model")


def _check_safetensors(file: Path) -> None:
    """Parse the header (cheap, no tensor data read): catches truncated files and random bytes."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise InputError(f"not a valid safetensors file ({first_line(exc)}); re-download or re-save it",
                         file=file, field="--model") from None


def adapter_base(path: Path, allow_pickle: bool) -> str:
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
        raise InputError(f"invalid adapter config ({first_line(exc)})", file=cfg_file, field="--model") from None
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
