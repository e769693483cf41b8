"""Batched, seeded, resumable text sampling: many prompts x many samples, written to disk as it goes.

Why it is built this way:
- Every (prompt_id, sample_index) row draws its randomness from its *own* generator, seeded from
  (seed, prompt_id, sample_index) (or a `seed_ids` entry in place of the prompt id). Sampling uses the
  Gumbel-max trick: token = argmax(filtered logits / T + Gumbel noise), an exact draw from the top-k /
  top-p / temperature distribution. So a row's text does not depend on which other rows share its batch:
  results are the same for any batch size (in fp32), and a run killed half-way resumes to exactly the rows
  an uninterrupted run writes.
- Prompts are sorted by token length and batched with left padding; decoding (`model.generate`) uses a
  key/value cache allocated once per batch, so one forward step serves a whole batch. Prompts that begin
  alike (a template's demonstrations) run their common start once per batch; a batch may hold several such
  groups (e.g. the templates of an extraction grid), so decoding steps serve more rows.
- With `out_path`, each finished batch is appended to a JSONL file and flushed; a rerun reads it, skips
  the (prompt_id, sample_index) pairs already there and drops a half-written last line, so a kill loses
  at most the batch in flight and never duplicates a row.
The HF backend is the reference; `backend="vllm"` is a thin adapter for GPUs with vLLM installed;
`backend="auto"` takes vLLM where it can run (installed, a GPU, a full saved model) and HF elsewhere.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from leakaudit import package_version
from leakaudit.data.io import json_line, open_append
from leakaudit.errors import InputError, check_model, check_texts
from leakaudit.models import LoadedModel, attention_kernels, host_memory, model_lock, text_config
from leakaudit.progress import counting
from leakaudit.scoring import cache_keyword, checked_batch_size, returned_cache, shared_prefixes
from leakaudit.warn import warn_once

SAMPLING_VERSION = 1
CPU_MAX_ROWS = 256         # rows per batch on CPU: a decoding step of the default model (130-token prompts)
#                            costs 4.0-4.6 ms per row at 61 rows, 2.5 ms at 244 (bf16; fp32 5.6-6.9, 5.1)
CPU_KV_BYTES = 4 << 30     # key/value cache (+ a step's logits) per batch on CPU, at most RAM / 8: rows of
#                            170 tokens in fp32: 256 (the cap) for the default model, 63 for Pythia-1.4B
#                            (46 with 24 GB of RAM)
GPU_MAX_ROWS = 512
BACKENDS = ("hf", "vllm", "auto")


@dataclass
class SamplingConfig:
    """How to sample. `greedy=True` takes the most likely token (temperature, top-k, top-p ignored)."""

    max_new_tokens: int = 15
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    num_samples: int = 1        # samples per prompt
    greedy: bool = False        # True => greedy decoding (temperature ignored)
    seed: int = 0
    stop_at_eos: bool = True

    def validate(self) -> None:
        """Raise InputError naming the option for any value that cannot work."""
        if self.max_new_tokens < 1:
            raise InputError("must be at least 1", field="--max-new-tokens")
        if self.num_samples < 1:
            raise InputError("must be at least 1", field="--num-samples")
        if not self.greedy and not self.temperature > 0:
            raise InputError("must be > 0 (use greedy decoding for temperature 0)", field="--temperature")
        if self.top_k is not None and self.top_k < 1:
            raise InputError("must be at least 1", field="--top-k")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError("must be in (0, 1]", field="--top-p")


@dataclass
class Sample:
    """One generated continuation of one prompt."""

    prompt_id: str
    sample_index: int
    prompt: str
    text: str                  # the newly generated text only (decoded, special tokens skipped)
    n_new_tokens: int          # tokens the model generated, up to and including a stopping EOS


@dataclass
class _Row:
    position: int              # index in the returned list (prompt-major, then sample_index)
    prompt_id: str
    sample_index: int
    prompt: str
    ids: list[int]
    seed_id: str               # what seeds its random stream (the prompt id unless given)


def row_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    """The seed of one row's random stream: a hash, so rows are independent of each other and of batching."""
    h = hashlib.sha256(f"{seed}\x1f{prompt_id}\x1f{sample_index}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


VLLM_MAX_TEMPERATURE = 2.0  # vLLM refuses higher sampling temperatures (seen with vLLM 0.26 on an H200)


def resolve_backend(lm: LoadedModel, backend: str, config: SamplingConfig | None = None) -> str:
    """`auto` -> `vllm` where the vLLM adapter can run (vLLM installed, the model on the current CUDA GPU, a
    temperature vLLM takes, a full saved model: not an adapter or a `random:` model), else the `hf` reference;
    so one experiment file runs on a laptop and uses vLLM on a GPU machine. Any other backend is returned as is."""
    if backend != "auto":
        return backend
    obstacle = _vllm_obstacle(lm, config)
    if obstacle is not None and obstacle.field == "--temperature":
        warn_once(f"vLLM refuses temperatures above {VLLM_MAX_TEMPERATURE:g}: sampling at {config.temperature:g} "
                  "with the HF backend")
    if obstacle is not None and obstacle.field == "--device":
        warn_once(f"{obstacle.message}; sampling with the HF backend")
    return "hf" if obstacle is not None else "vllm"


def run_key(lm: LoadedModel, config: SamplingConfig, backend: str) -> str:
    """What identifies a sampling run in its output file: model weights, options, backend, engine version."""
    what = {"v": SAMPLING_VERSION, "model": lm.current_fingerprint(), "dtype": str(lm.dtype), "config": asdict(config),
            "backend": backend}
    if backend == "vllm":  # vLLM's sampler is its own: another release may draw other rows
        what["vllm"] = package_version("vllm")
    elif lm.device.type == "cuda":  # HF rows draw their noise from a CUDA generator there: another stream
        what["device"] = "cuda"
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def sampled_with(lm: LoadedModel, backend: str) -> dict[str, str]:
    """What besides the model and the options decides the rows a run samples, for a generated file's provenance:
    the backend, the dtype (bf16 moves picks, docs/generate.md) and, as `run_key` says it, vLLM's release or a
    CUDA device (its HF rows draw their noise from a CUDA generator). `backend`: the one used, not `auto`."""
    what = {"backend": backend, "dtype": str(lm.dtype).removeprefix("torch.")}
    if backend == "vllm":
        what["vllm"] = package_version("vllm")
    elif lm.device.type == "cuda":
        what["device"] = "cuda"
    return what


# ----------------------------------------------------------------------------------------- public entry
def sample(lm: LoadedModel, prompts: Sequence[str], config: SamplingConfig, *,
           prompt_ids: Sequence[str] | None = None, seed_ids: Sequence[str] | None = None,
           out_path: str | Path | None = None,
           batch_size: int | str = "auto", progress: bool = True, backend: str = "hf",
           description: str = "sampling") -> list[Sample]:
    """Generate `config.num_samples` continuations of every prompt; return them in input order.

    `batch_size`: "auto" (sized to the device and the longest prompt + max_new_tokens) or a number of
    rows per batch. `seed_ids` (default: the prompt ids) seed each prompt's rows, so prompts sampled
    together under new ids (several cells of a grid at once) draw what they draw when sampled alone.
    With `out_path`, rows already in that JSONL (same model and options) are reused. `description` labels the
    progress bar (which model samples, where a job samples two).
    Prompt + `max_new_tokens` must fit the model's context: `max_new_tokens` of the context or more is an
    InputError; a prompt too long for the room left keeps its last tokens, with a warning.
    """
    check_model(lm)
    prompts = check_texts(prompts, "prompts")
    config.validate()
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}'; use one of {', '.join(BACKENDS)}", field="--backend")
    if backend == "vllm" and (obstacle := _vllm_obstacle(lm, config)) is not None:
        raise obstacle  # before any work (or output file) starts
    backend = resolve_backend(lm, backend, config)  # `auto` takes vLLM only where it has no obstacle
    rows_per_batch = _parse_batch_size(batch_size)
    ids_list = [str(i) for i in range(len(prompts))] if prompt_ids is None else [str(p) for p in prompt_ids]
    if len(ids_list) != len(prompts):
        raise InputError(f"{len(ids_list)} prompt ids for {len(prompts)} prompts", field="prompt_ids")
    seed_list = ids_list if seed_ids is None else [str(x) for x in seed_ids]
    if len(seed_list) != len(prompts):
        raise InputError(f"{len(seed_list)} seed ids for {len(prompts)} prompts", field="seed_ids")
    seen: set[str] = set()
    for pid in ids_list:
        if pid in seen:
            raise InputError(f"duplicate prompt id '{pid}'", field="prompt_ids")
        seen.add(pid)
    if not prompts:
        return []
    if config.max_new_tokens >= lm.max_length:
        raise InputError(f"{config.max_new_tokens} new tokens do not fit the model's context of "
                         f"{lm.max_length} tokens", field="--max-new-tokens")

    key = run_key(lm, config, backend)
    token_ids = _tokenize_prompts(lm, prompts, config.max_new_tokens)
    rows = [_Row(i * config.num_samples + s, pid, s, prompt, ids, sid)
            for i, (pid, sid, prompt, ids) in enumerate(zip(ids_list, seed_list, prompts, token_ids, strict=True))
            for s in range(config.num_samples)]
    results: list[Sample | None] = [None] * len(rows)

    done: dict[tuple[str, int], Sample] = {}
    if out_path is not None:
        done = _read_checkpoint(Path(out_path), key)
    todo = []
    for row in rows:
        got = done.get((row.prompt_id, row.sample_index))
        if got is not None and got.prompt == row.prompt:
            results[row.position] = got
        elif got is not None:
            raise InputError(f"prompt '{row.prompt_id}' differs from the one already sampled in this file; "
                             "use another --out, or delete this file", file=out_path)
        else:
            todo.append(row)

    generate = _hf_generate if backend == "hf" else _vllm_generate
    todo.sort(key=lambda r: (len(r.ids), r.position))  # length-sorted: little padding per batch
    batches = _make_batches(lm, todo, config, rows_per_batch)
    with counting(progress and bool(todo), description, len(todo), unit="rows") as advance, _appender(out_path) as append:
        for batch in batches:
            new_ids = generate(lm, batch, config)
            samples = [_to_sample(lm, row, ids, config) for row, ids in zip(batch, new_ids, strict=True)]
            append([{**asdict(s), "run": key} for s in samples])
            for row, s in zip(batch, samples, strict=True):
                results[row.position] = s
            advance(len(batch))
    return [s for s in results if s is not None]


# ----------------------------------------------------------------------------------------- preparation
def _parse_batch_size(batch_size: int | str) -> int | None:
    """Rows per batch, None for auto (scoring.checked_batch_size's rule)."""
    n = checked_batch_size(batch_size)
    return None if n == "auto" else int(n)


def _tokenize_prompts(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    """Token ids per prompt (tokenizer's own special tokens); an empty prompt starts from BOS/EOS.

    Prompt + new tokens must fit the context (positions past it do not exist for OPT's learned embeddings,
    and were never trained for RoPE). A longer prompt keeps its last tokens, the ones next to the text to be
    generated (what a chat UI or an extraction attack needs), with one warning saying how many were cut."""
    room = lm.max_length - max_new_tokens
    tok = lm.tokenizer
    from leakaudit.models.tokens import encode

    enc = encode(tok, prompts)  # never ending in an EOS the tokenizer appends, nor with a second BOS
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    out = []
    cut = 0
    for ids in enc:
        ids = list(ids) or [start]
        cut += len(ids) > room
        out.append(ids[-room:])
    if cut:
        warn_once(f"{cut} prompt(s) do not fit the context of {lm.spec} ({lm.max_length} tokens) with "
                  f"--max-new-tokens {max_new_tokens}; keeping the last {room} tokens of each",
                  key=f"prompts cut {lm.max_length} {max_new_tokens}")  # not again per round, stage and model
    return out


def _auto_rows(lm: LoadedModel, width: int, room: tuple[int, float, int, int] | None = None) -> int:
    """Rows per batch for `batch_size="auto"`, given prompt + new tokens per row: as many as the key/value
    cache and a step's logits fit in 60% of the GPU's free memory, or on CPU in CPU_KV_BYTES (at most an
    eighth of RAM). `room`: `_room(lm)`, asked once for all the batches of a call."""
    most, free, per_token, logits = room or _room(lm)
    return int(max(1, min(most, free // (per_token * width + logits))))


def _room(lm: LoadedModel) -> tuple[int, float, int, int]:
    """(most rows, bytes the rows may take, cache bytes per token, a row's logits bytes): what `_auto_rows`
    needs besides a row's width. Once per call, not once per row: on a GPU each row asked the driver for its
    free memory."""
    from leakaudit.models import gpu_free_bytes, kv_cache_bytes_per_token

    per_token = kv_cache_bytes_per_token(lm.model, lm.dtype)
    vocab = getattr(text_config(lm.model), "vocab_size", None) or len(lm.tokenizer)  # the logits' width
    logits = vocab * 4 * 4  # fp32 copies of a step's logits
    if lm.device.type == "cuda":
        return GPU_MAX_ROWS, gpu_free_bytes(lm.device) * 0.6, per_token, logits
    return CPU_MAX_ROWS, min(CPU_KV_BYTES, host_memory() // 8), per_token, logits


def _make_batches(lm: LoadedModel, rows: list[_Row], config: SamplingConfig,
                  rows_per_batch: int | None) -> list[list[_Row]]:
    batches: list[list[_Row]] = []
    cur: list[_Row] = []
    room = _room(lm) if rows_per_batch is None and rows else None
    for row in rows:  # rows are sorted by length, so the last row of a batch is its longest
        limit = rows_per_batch or _auto_rows(lm, len(row.ids) + config.max_new_tokens, room)
        if cur and len(cur) >= limit:
            batches.append(cur)
            cur = []
        cur.append(row)
    if cur:
        batches.append(cur)
    return batches


def _to_sample(lm: LoadedModel, row: _Row, new_ids: list[int], config: SamplingConfig) -> Sample:
    """Cut at the first EOS (when stopping at EOS) and decode without special tokens."""
    eos = _eos_ids(lm)
    n = len(new_ids)
    if config.stop_at_eos:
        for i, t in enumerate(new_ids):
            if t in eos:
                n = i + 1
                break
    text = lm.tokenizer.decode(new_ids[:n], skip_special_tokens=True)
    return Sample(row.prompt_id, row.sample_index, row.prompt, text, n)


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    for value in (lm.tokenizer.eos_token_id, gen_eos):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


# ----------------------------------------------------------------------------------------- HF backend
class _GumbelSampler:
    """Logits processor: temperature, top-k, top-p, then per-row Gumbel noise, so greedy argmax = a sample.

    Each row owns a torch.Generator seeded by row_seed(); it draws one noise vector per step.
    """

    def __init__(self, rows: list[_Row], config: SamplingConfig, device: torch.device):
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        warpers = []
        if config.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None:
            warpers.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(config.top_p))
        self.warpers = LogitsProcessorList(warpers)
        gen_device = device if device.type == "cuda" else torch.device("cpu")
        self.generators = []
        for row in rows:
            g = torch.Generator(device=gen_device)
            g.manual_seed(row_seed(config.seed, row.seed_id, row.sample_index))
            self.generators.append(g)
        self.gen_device = gen_device

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        raw = scores.float()
        scores = self.warpers(input_ids, raw)
        if not bool(scores.max() < math.inf):  # a NaN or +inf anywhere (max keeps a NaN): one reduction a step
            # a temperature so small (below ~1e-37) that logits / T overflow fp32: the samples came out as
            # EOS or the lowest token id. Shifted by each row's maximum first, the distribution is the same
            # (the most likely tokens) and nothing overflows; every other temperature keeps its exact values.
            scores = self.warpers(input_ids, raw - raw.max(dim=-1, keepdim=True).values)
        vocab = scores.shape[-1]
        u = torch.stack([torch.rand(vocab, generator=g, device=self.gen_device) for g in self.generators])
        u = u.to(scores.device).clamp_(min=torch.finfo(torch.float32).tiny, max=1.0 - 1e-7)
        return scores - torch.log(-torch.log(u))


def _hf_generate(lm: LoadedModel, batch: list[_Row], config: SamplingConfig) -> list[list[int]]:
    """New token ids per row of one left-padded batch, decoded with the KV cache."""
    from transformers import GenerationConfig
    from transformers.generation.logits_process import LogitsProcessorList

    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # Prompts that begin alike run their common start once: each group's start is computed once and held in
    # the cache, left-padded to the longest start; rows are [padding][their group's start][padding][rest of
    # the prompt], positions follow the mask. The cache keeps all but the last common token, so every row
    # still feeds at least one token.
    groups = [(max(common - 1, 0), rows) for common, rows in shared_prefixes(batch)]
    window = getattr(lm.model.config, "sliding_window", None)
    if isinstance(window, int) and max(n for n, _ in groups) >= window:
        groups = [(0, batch)]  # a sliding-window layer keeps only part of a start this long: no sharing
    shared, start, width = _layout(batch, groups)
    if width + config.max_new_tokens > lm.max_length:
        # a short start padded to a longer one, and its rest to a longer rest, can make the batch wider than
        # any of its prompts; every prompt fits the window, so run the batch unshared at its longest prompt's
        # width rather than ask generate() for more tokens than the window holds
        groups = [(0, batch)]
        shared, start, width = _layout(batch, groups)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        n = shared[id(r)]
        input_ids[i, start - n:start] = torch.tensor(r.ids[:n], dtype=torch.long)
        mask[i, start - n:start] = 1
        rest = r.ids[n:]
        input_ids[i, width - len(rest):] = torch.tensor(rest, dtype=torch.long)
        mask[i, width - len(rest):] = 1
    cache = _decoding_cache(lm, batch, groups, start, width + config.max_new_tokens)
    # [] not None: None would let generate() fill in the model's own EOS and stop there anyway
    eos = sorted(_eos_ids(lm)) if config.stop_at_eos else []
    # Every field that could change tokens is set here, so the model's own generation_config cannot
    # slip in a repetition penalty or sampling defaults; sampling itself is done by _GumbelSampler.
    gen_config = GenerationConfig(
        max_new_tokens=config.max_new_tokens, min_new_tokens=0, do_sample=False, num_beams=1,
        num_return_sequences=1, repetition_penalty=1.0, no_repeat_ngram_size=0, pad_token_id=pad, eos_token_id=eos,
        bos_token_id=tok.bos_token_id, use_cache=True, disable_compile=True,
    )
    processors = LogitsProcessorList([] if config.greedy else [_GumbelSampler(batch, config, lm.device)])
    with model_lock(lm.model), torch.inference_mode(), attention_kernels(lm.device), \
            _no_model_generation_defaults(lm.model):  # not mid-way a scoring pass
        out = lm.model.generate(input_ids=input_ids.to(lm.device), attention_mask=mask.to(lm.device),
                                generation_config=gen_config, logits_processor=processors,
                                **{cache_keyword(lm.model): cache})
    new = out[:, width:].tolist()
    return new


@contextlib.contextmanager
def _no_model_generation_defaults(model):
    """Hide the model's own generation_config (its generation_config.json) for one generate() call: transformers
    fills every field our config leaves unset from it, and fields with no neutral value (suppress_tokens,
    bad_words_ids, sequence_bias, forced_bos_token_id, stop_strings, max_time) changed or cut the samples, or
    raised, instead of drawing from the model's distribution."""
    from transformers import GenerationConfig

    held = [(m, m.generation_config) for m in model.modules()  # the owners, not a PEFT wrapper forwarding it
            if isinstance(vars(m).get("generation_config"), GenerationConfig)]
    try:
        for m, _ in held:
            m.generation_config = GenerationConfig()
        yield
    finally:
        for m, gc_ in held:
            m.generation_config = gc_


def _layout(batch: list[_Row], groups: list[tuple[int, list[_Row]]]) -> tuple[dict[int, int], int, int]:
    """Per row (by id) the tokens its group shares, the longest shared start, and the batch's width."""
    shared = {id(r): n for n, rows in groups for r in rows}
    start = max(shared.values())
    return shared, start, start + max(len(r.ids) - shared[id(r)] for r in batch)


def _decoding_cache(lm: LoadedModel, batch: list[_Row], groups: list[tuple[int, list[_Row]]], length: int,
                    size: int):
    """The batch's key/value cache, preallocated for `size` positions (prompt and new tokens), holding each
    group's shared start, computed once per group, in every row of the group, left-padded (masked out) to
    `length` positions.

    Why preallocated (a StaticCache written in place): a growing cache copies all of itself at every decoding
    step, as costly on a CPU as the step's matmuls once prompts are long (BENCHMARKS.md). `disable_compile`
    in the generation config keeps transformers from compiling the forward for it on a GPU."""
    from transformers import StaticCache

    cache = StaticCache(config=lm.model.config, max_cache_len=size)  # the model's layer kinds (full or sliding)
    if not length:
        return cache
    where = {id(r): i for i, r in enumerate(batch)}
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []
    for n, rows in groups:
        if not n:
            continue
        with torch.inference_mode(), attention_kernels(lm.device):
            t = torch.tensor([rows[0].ids[:n]], dtype=torch.long, device=lm.device)
            out = lm.model(input_ids=t, attention_mask=torch.ones_like(t), use_cache=True)
        index = torch.tensor([where[id(r)] for r in rows], device=lm.device)
        for i, layer in enumerate(returned_cache(out).layers):
            k, v = layer.keys, layer.values  # (1, heads, n, head dim)
            if i == len(layers):
                layers.append((k.new_zeros((len(batch), k.shape[1], length, k.shape[3])),
                               v.new_zeros((len(batch), v.shape[1], length, v.shape[3]))))
            keys, values = layers[i]
            keys[index, :, length - n:] = k
            values[index, :, length - n:] = v
    for i, (keys, values) in enumerate(layers):
        cache.update(keys, values, i)
    return cache


# ----------------------------------------------------------------------------------------- vLLM backend
def _vllm_generate(lm: LoadedModel, batch: list[_Row], config: SamplingConfig) -> list[list[int]]:
    """Thin adapter: same rows, per-row seeds and stopping rule, decoded by vLLM (GPU only)."""
    llm = _vllm_engine(lm)
    from vllm import SamplingParams

    params = [SamplingParams(n=1, max_tokens=config.max_new_tokens, ignore_eos=not config.stop_at_eos,
                             temperature=0.0 if config.greedy else config.temperature,
                             top_k=config.top_k or -1, top_p=config.top_p or 1.0,
                             seed=row_seed(config.seed, r.seed_id, r.sample_index),
                             detokenize=False) for r in batch]  # leakaudit decodes the ids itself
    prompts = [{"prompt_token_ids": r.ids} for r in batch]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def vllm_missing() -> str | None:
    """Why vLLM cannot run on this machine at all (None when it can): read by the sampler and, before any
    stage, by an experiment's plan checks."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install vllm)"
    if not torch.cuda.is_available():
        return "the vLLM backend needs a GPU"
    return None


def _vllm_obstacle(lm: LoadedModel, config: SamplingConfig | None) -> InputError | None:
    """Why vLLM cannot sample this run (None when it can): `auto` then takes HF, an explicit `vllm` fails."""
    if (missing := vllm_missing()) is not None:
        return InputError(f"{missing}; use --backend hf", field="--backend")
    if config is not None and not config.greedy and config.temperature > VLLM_MAX_TEMPERATURE:
        return InputError(f"vLLM samples at temperatures up to {VLLM_MAX_TEMPERATURE:g}, not "
                          f"{config.temperature:g}; use --backend hf", field="--temperature")
    device = lm.device
    if device.type != "cuda":
        return InputError(f"the vLLM backend samples on a GPU, and {lm.spec} is loaded on {device} (--device)",
                          field="--backend")
    if device.index is not None and device.index != torch.cuda.current_device():  # where its engine starts
        return InputError(f"the vLLM engine starts on cuda:{torch.cuda.current_device()}, not {device}: choose "
                          "its GPU with CUDA_VISIBLE_DEVICES, or use --backend hf", field="--device")
    if lm.changed_since_loaded():
        return InputError(f"the weights of {lm.spec} changed in memory since loading, and the vLLM engine loads "
                          "its files; use --backend hf", field="--backend")
    from leakaudit.models import resolve_spec

    kind, _ = resolve_spec(lm.spec)
    if kind == "adapter":
        return InputError("the vLLM backend takes full models; merge the adapter first (leakaudit merge)",
                          field="--backend")
    if kind == "random":
        return InputError("the vLLM backend loads saved weights; random: models run on --backend hf",
                          field="--backend")
    return None


_VLLM_ENGINES: dict[tuple[str, str], object] = {}
VLLM_MEMORY_SHARE = 0.9  # of the GPU memory still free when the engine starts


def _vllm_engine(lm: LoadedModel):
    """The vLLM engine of (model, dtype), kept until another is asked for. It takes 90% of the GPU memory
    that is free when it starts, not vLLM's default share of the whole card: the HF model leakaudit scores
    with already holds some, and vLLM refuses to start when its share exceeds what is free. So one engine
    at a time: kept side by side, a second would get a tenth of the memory, a third a hundredth (a study
    samples from five or more models)."""
    from leakaudit.models import resolve_spec

    _, where = resolve_spec(lm.spec)
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[lm.dtype]
    if (lm.spec, dtype) not in _VLLM_ENGINES:
        from vllm import LLM

        close_vllm_engines()
        torch.cuda.empty_cache()  # what this process's allocator keeps reserved is not free to vLLM's process
        free, total = torch.cuda.mem_get_info(lm.device)
        _VLLM_ENGINES[lm.spec, dtype] = LLM(model=str(where), dtype=dtype, trust_remote_code=False,
                                            gpu_memory_utilization=VLLM_MEMORY_SHARE * free / total)
    return _VLLM_ENGINES[lm.spec, dtype]


def close_vllm_engines() -> None:
    """Shut down the kept vLLM engine (its engine process, and its memory with it)."""
    if not _VLLM_ENGINES:
        return
    while _VLLM_ENGINES:
        _, llm = _VLLM_ENGINES.popitem()
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------- checkpoint file
def _read_checkpoint(path: Path, key: str) -> dict[tuple[str, int], Sample]:
    """Rows already written by this run; a half-written last line (a kill mid-write) is cut off, once every
    whole line has proved to be this run's (a file that is not is refused untouched)."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    good_end = raw.rfind(b"\n") + 1
    try:
        text = raw[:good_end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError("not a sample file: not valid UTF-8", file=path,
                         line=raw[:exc.start].count(b"\n") + 1) from None
    done: dict[tuple[str, int], Sample] = {}
    # "\n" only: files of earlier versions may hold a raw U+2028 inside a string, which splitlines breaks at
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if obj.get("run") != key:
                raise InputError("this file holds samples from another model or other sampling options; "
                                 "use another --out, or delete this file", file=path, line=lineno, field="run")
            s = Sample(str(obj["prompt_id"]), int(obj["sample_index"]), obj["prompt"], obj["text"],
                       int(obj["n_new_tokens"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"not a sample row ({type(exc).__name__}: {exc})", file=path, line=lineno) from None
        done[(s.prompt_id, s.sample_index)] = s
    if good_end < len(raw):  # unterminated last line: the write was interrupted
        with path.open("r+b") as fh:
            fh.truncate(good_end)
    return done


@contextlib.contextmanager
def _appender(path: str | Path | None):
    """Append rows to JSONL, one write + fsync per batch, so finished batches survive a kill."""
    if path is None:
        yield lambda rows: None
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open_append(p) as fh:
        def append(rows: list[dict]) -> None:
            fh.write("".join(json_line(r) for r in rows))
            fh.flush()
            os.fsync(fh.fileno())

        yield append
