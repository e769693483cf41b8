"""Load a model spec into a LoadedModel: model, tokenizer and the fingerprint of its exact weights."""

from __future__ import annotations

import hashlib
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from leakaudit.errors import InputError, first_line
from leakaudit.models.dtype import resolve_device, resolve_dtype
from leakaudit.models.factories import RANDOM_PREFIX, build_tiny_tokenizer, random_model_config
from leakaudit.models.fingerprint import dir_fingerprint, tensor_fingerprint, tokenizer_fingerprint
from leakaudit.models.spec import adapter_base, check_model_dir, context_window, resolve_spec


@dataclass
class LoadedModel:
    """A model ready to score or sample, with what identifies its exact weights: `fingerprint` as loaded,
    `current_fingerprint()` as they are now (what cached scores and sample files are keyed by)."""

    model: Any
    tokenizer: Any
    spec: str
    fingerprint: str
    device: torch.device
    dtype: torch.dtype

    def __post_init__(self) -> None:
        self._weights_seen = _weight_versions(self.model)
        self._loaded_fingerprint = self.fingerprint

    def current_fingerprint(self) -> str:
        """The fingerprint of the weights as they are now. Weights changed in place since it was taken (a
        training step, load_state_dict, `p.mul_(3)` in a notebook: every in-place change through torch counts
        up that tensor's version) or replaced are hashed again, so their scores are not the cache's old ones.
        A write through `p.data` bypasses the version: after one, set `fingerprint` yourself
        (`tensor_fingerprint(lm.model)`)."""
        with model_lock(self.model):  # not while another thread's pass has the head swapped out
            now = _weight_versions(self.model)
            if now != self._weights_seen:
                self.fingerprint = "mem-" + tensor_fingerprint(self.model)
                self._weights_seen = now
            return self.fingerprint

    def changed_since_loaded(self) -> bool:
        """Whether the weights in memory are no longer the files' (what a backend that loads the files, vLLM,
        would sample instead)."""
        return self.current_fingerprint() != self._loaded_fingerprint

    @property
    def max_length(self) -> int:
        """The model's context window in tokens."""
        return context_window(self.model.config) or 2048


_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: Any) -> threading.RLock:
    """The lock of one model's passes. A scoring pass changes the model for its duration (its LM head swapped
    for identity, its attention function, eval mode): a second pass, a sampling run or a fingerprint taken
    from another thread meanwhile read hidden states as logits ("index 448 is out of bounds") or hashed the
    model without its head. Re-entrant (a pass may read the fingerprint); other models are not held up."""
    with _MODEL_LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(model, threading.RLock())


def _weight_versions(model: Any) -> tuple:
    """Each parameter's and buffer's identity and in-place version: cheap (no data read), and changed by any
    write to the weights or a tensor put in one's place."""
    if not isinstance(model, torch.nn.Module):
        return ()
    return tuple((name, id(t), t._version) for name, t in (*model.named_parameters(), *model.named_buffers()))


def _load_errors() -> tuple[type[BaseException], ...]:
    """What from_pretrained raises for bad files (our checks catch most first); never CUDA OOM or bugs."""
    import pickle

    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return OSError, ValueError, SafetensorError, StrictDataclassError, pickle.UnpicklingError, EOFError


def load_model(spec: str, *, device: str | None = None, dtype: str | torch.dtype | None = None,
               allow_pickle: bool = False, for_training: bool = False) -> LoadedModel:
    """Load a model spec for scoring, sampling or training (training keeps fp32 master weights)."""
    from transformers.utils import logging as hf_logging

    # transformers' loading bar off while loading, then as the caller had it: turned off for good, a notebook's
    # later from_pretrained and Trainer showed no bar (the CLI keeps them off: HF_HUB_DISABLE_PROGRESS_BARS)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _load_model(spec, device, dtype, allow_pickle, for_training)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _load_model(spec: str, device: str | None, dtype: str | torch.dtype | None, allow_pickle: bool,
                for_training: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = torch.float32 if for_training and dtype in (None, "auto") else resolve_dtype(dtype, dev)
    if spec.startswith(RANDOM_PREFIX):
        return _load_random(spec, dev, dt, for_training)
    kind, where = resolve_spec(spec)
    if kind == "adapter":
        return _load_adapter(spec, Path(where), dev, dt, allow_pickle, for_training)
    if kind == "dir":
        check_model_dir(Path(where), allow_pickle)
        fingerprint = dir_fingerprint(Path(where))
    else:
        fingerprint = f"hub:{where}"
    try:  # the tokenizers library raises a bare Exception for a tokenizer.json it cannot read
        tokenizer = AutoTokenizer.from_pretrained(str(where), trust_remote_code=False)
    except Exception as exc:
        raise InputError(f"cannot load tokenizer: {first_line(exc)}", file=str(where), field="--model") from None
    try:
        # use_safetensors=True: transformers then never falls back to a pickle file; None prefers safetensors.
        model, info = AutoModelForCausalLM.from_pretrained(str(where), dtype=dt, trust_remote_code=False,
                                                           use_safetensors=None if allow_pickle else True,
                                                           output_loading_info=True)
    except _load_errors() as exc:
        raise InputError(f"cannot load model: {first_line(exc)}", file=str(where), field="--model") from None
    except RuntimeError as exc:  # transformers' "size mismatch" refusal, after its load report
        if "ignore_mismatched_sizes" not in str(exc) and not str(exc).startswith("Error(s) in loading state_dict"):
            raise
        raise InputError("cannot load model: tensors in the weights differ in shape from what config.json "
                         "describes (the load report above lists them)", file=str(where), field="--model") from None
    # Weights the files lack were initialised at random by transformers with a warning only: scores of a partly
    # random model, different on every --no-cache run.
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise InputError(f"cannot load model: the weights files lack {len(missing)} of the model's tensors "
                         f"(e.g. {missing[0]}), which would be random", file=str(where), field="--model")
    if kind == "hub":  # a new revision may change the tokenizer alone: cached scores of the old one must not match
        both = tensor_fingerprint(model) + tokenizer_fingerprint(tokenizer)
        fingerprint = "hub-" + hashlib.sha256(both.encode()).hexdigest()[:32]
    _finish_tokenizer(tokenizer)
    _check_vocab(model, tokenizer, where)
    model.to(dev)
    model.train(for_training)
    return LoadedModel(model, tokenizer, spec, fingerprint, dev, dt)


def _load_adapter(spec: str, path: Path, dev: torch.device, dt: torch.dtype, allow_pickle: bool,
                  for_training: bool) -> LoadedModel:
    from peft import PeftModel

    base_spec = adapter_base(path, allow_pickle)  # also makes PEFT open adapter_model.safetensors, never the .bin
    base = load_model(base_spec, device=str(dev), dtype=dt, allow_pickle=allow_pickle, for_training=for_training)
    try:
        with warnings.catch_warnings():  # PEFT only warns of adapter weights the file lacks, left at random
            warnings.filterwarnings("error", message="Found missing adapter keys", category=UserWarning)
            model = PeftModel.from_pretrained(base.model, str(path), is_trainable=for_training)
    except UserWarning as exc:
        missing = str(exc).partition("checkpoint: ")[2].strip(" .[]").split(",")[0].strip(" '\"")
        raise InputError(f"cannot load adapter: the adapter weights file lacks some of its tensors (e.g. {missing}), "
                         "which would be random", file=path, field="--model") from None
    except (*_load_errors(), KeyError, TypeError) as exc:  # PEFT reads its config fields with little checking
        raise InputError(f"cannot load adapter: {first_line(exc)}", file=path, field="--model") from None
    except RuntimeError as exc:  # torch's load_state_dict: weights of another rank or base ("size mismatch")
        if not str(exc).startswith("Error(s) in loading state_dict"):
            raise
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), "")
        raise InputError(f"cannot load adapter: its weights do not fit the base model as adapter_config.json "
                         f"describes it ({detail})", file=path, field="--model") from None
    tokenizer = base.tokenizer
    if (path / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        try:  # the tokenizers library raises a bare Exception for a tokenizer.json it cannot read
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except Exception as exc:
            raise InputError(f"cannot load tokenizer: {first_line(exc)}", file=path, field="--model") from None
        _finish_tokenizer(tokenizer)
    _check_vocab(model, tokenizer, path)
    fingerprint = hashlib.sha256((base.fingerprint + dir_fingerprint(path)).encode()).hexdigest()[:32]
    if not for_training:
        # Folded into the weights for inference: an unmerged adapter adds two matmuls to every adapted layer
        # for every token (measured: sampling 2x slower with r 64 on all linear layers); equal logits up to
        # the dtype's rounding (tests/test_merge_perplexity.py).
        _untie_adapted_weights(model)
        model = model.merge_and_unload()
        # PEFT froze the base weights; a plain load leaves them requiring grad. torch.matmul keys a heuristic
        # on that: for a frozen weight and a non-contiguous 3D input (generate's last-position hidden states)
        # it expands the LM head to one copy per row and runs bmm instead of one mm (measured: extraction
        # sampling 3.5x slower, 13.5 s vs 3.9 s for 32 prompts). Inference never builds a graph either way.
        model.requires_grad_(True)
    model.to(dev)
    model.train(for_training)
    return LoadedModel(model, tokenizer, spec, fingerprint, dev, dt)


def _untie_adapted_weights(model) -> None:
    """Give an adapted layer its own copy of a weight another layer shares (an LM head tied to the input
    embeddings, e.g. OPT's, under `--target-modules ...,lm_head`): the adapter changed that layer only, and
    folding it into the shared tensor would change the embeddings too (logits off by up to 7.7 on tiny-opt).
    The config then says the weights are no longer tied, so a merged model saves and reloads both."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    untied = False
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        weight = getattr(base, "weight", None)
        if isinstance(module, BaseTunerLayer) and weight is not None and owners.get(id(weight), 0) > 1:
            base.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            untied = True
    if untied:
        config = model.get_base_model().config
        for cfg in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
            cfg.tie_word_embeddings = False


def _check_vocab(model, tokenizer, where: Path | str) -> None:
    """A tokenizer whose ids reach past the model's embedding rows (one saved from another model) fails deep in
    the first forward pass with "IndexError: index out of range in self": refuse it while loading."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise InputError(f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings have {rows} rows: "
                         "ids past them cannot be looked up (a tokenizer from another model?)", file=str(where),
                         field="--model")


def _finish_tokenizer(tokenizer) -> None:
    """Give every tokenizer a pad token so batching works; padding side is set per use (score/sample). Padded
    positions are masked, so with no eos or unk token either the first token of the vocabulary serves (None
    failed inside fine-tuning's collator with a TypeError)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)


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
