"""Device and precision policy: which device and dtype a model loads with, and whether training autocasts.

One switch, LEAKAUDIT_DTYPE (auto|fp32|bf16), sets the default load dtype and the default training autocast
together, so a run (or the test suite) pins its precision in one place."""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache

import torch

from leakaudit.errors import InputError


def host_memory() -> int:
    """Bytes of RAM on this machine (16 GiB where the OS does not say): what CPU-side budgets are cut from."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 16 << 30


def gpu_free_bytes(device: torch.device) -> int:
    """Memory a batch on this GPU can take: what the driver has free plus what torch's allocator keeps reserved
    and unused (mem_get_info counts that as taken: each pass of a run saw less than the one before)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + max(0, torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def kv_cache_bytes_per_token(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take in the cache, over all layers: what sizes batches that keep a
    cache (sampling, rows scored after a shared prefix). Read from the text config (a multimodal wrapper's
    top level has no layer count) and its own head size (Qwen3's 128 is not hidden / heads = 64)."""
    from leakaudit.models.spec import text_config

    cfg = text_config(model)
    layers = getattr(cfg, "num_hidden_layers", None) or 24
    hidden = getattr(cfg, "hidden_size", None) or 1024
    heads = getattr(cfg, "num_attention_heads", None) or 16
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return 2 * layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def resolve_device(device: str | None = None) -> torch.device:
    """`auto`/None → CUDA when present (honouring LOCAL_RANK under torchrun/accelerate), else CPU; a device
    this machine lacks (or a bogus name) is an InputError on `--device` now, not a traceback at `model.to`."""
    if device in (None, "auto"):
        return _rank_gpu() if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N", field="--device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"'{device}' asked for, but CUDA is not available here; use --device cpu or auto",
                             field="--device")
        if dev.index is None:  # plain `cuda` means this process's GPU, not the current one (GPU 0 in every rank)
            return _rank_gpu()
        if dev.index >= torch.cuda.device_count():
            raise InputError(f"no device {dev}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                             field="--device")
    elif dev.type != "cpu":
        try:  # any other backend (mps, xpu ...): a zero-size tensor tells whether this build and machine have it
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError):
            raise InputError(f"device '{device}' is not available in this torch build or on this machine; use "
                             "--device cpu or auto", field="--device") from None
    return dev


def _rank_gpu() -> torch.device:
    """This process's GPU: LOCAL_RANK's under torchrun/accelerate (one GPU per process), the only visible one
    where a launcher gives each process its own (CUDA_VISIBLE_DEVICES per task), else GPU 0."""
    rank, count = int(os.environ.get("LOCAL_RANK", 0) or 0), torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if rank >= count:
        raise InputError(f"LOCAL_RANK {rank} has no GPU of its own: this machine shows {count} CUDA device(s); "
                         "start at most one process per GPU", field="--device")
    return torch.device("cuda", rank)


def cuda_has_fast_bf16(device: torch.device) -> bool:
    """True when this GPU runs bf16 natively (compute capability 8.0 and newer; ROCm GPUs do). torch's
    is_bf16_supported() also says True on 7.x cards (T4, V100), where bf16 is emulated: slow, and refused by
    vLLM; those cards take fp16. Asked of `device`, not the current GPU (a machine may mix generations)."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(device).major >= 8


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


@contextlib.contextmanager
def sdpa_replaced(model: torch.nn.Module, name: str, when: bool = True):
    """Within this block a model whose attention is sdpa runs the attention function registered as `name` with
    transformers (when `when` holds); any other model is untouched. Restored afterwards. Used by the CPU
    attention of scoring (models/cpu_attention.py) and of packed training (train/packed_attention.py)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not when or getattr(base.config, "_attn_implementation", None) != "sdpa":
        yield
        return
    base.set_attn_implementation(name)
    try:
        yield
    finally:
        base.set_attn_implementation("sdpa")


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
            chosen = torch.bfloat16 if cuda_has_fast_bf16(device) else torch.float16
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
        return cuda_has_fast_bf16(device)
    return cpu_has_fast_bf16()
