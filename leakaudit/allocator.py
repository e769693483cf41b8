"""While the engine scores, the C allocator keeps freed memory for the next batch; afterwards it gives it back.

Why: a scoring pass allocates and frees the same large activations batch after batch. glibc's malloc serves
blocks above its mmap threshold (adjusted on the fly, 128 KiB to 32 MiB) with fresh mappings and returns free
heap memory past its trim threshold, so each batch faults those pages in again, zeroed by the kernel. On a
2-core AMD EPYC, `leakaudit score` over 100 texts on 1 thread made 1.6-2.7 M page faults and spent 3-5 s of
43-45 s in the kernel; with both thresholds at 1 GiB, 0.3-0.4 M faults and 1 s (1.05x over 200 texts,
BENCHMARKS.md). Kept for the whole process, though, freed memory piled up across a fine-tune and the scoring
after it (the demo's peak RSS rose from 6.0 to 9.0 GB), so the setting holds only while scoring runs: on the
way out `malloc_trim` returns what is free when that is over 64 MiB (the demo's peak fell from 6.0 to 4.35 GB)
and the thresholds go to 32 / 64 MiB, the values glibc's own adjustment reaches in a process that frees large
tensors. glibc only (elsewhere nothing happens); a user's own `MALLOC_*` / `GLIBC_TUNABLES` malloc settings are
left alone, and `LEAKAUDIT_KEEP_FREED_MEMORY=0` turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_BYTES = 1 << 30  # while scoring: no fresh mappings below this, and no trimming
AFTER_MMAP_BYTES, AFTER_TRIM_BYTES = 32 << 20, 64 << 20  # afterwards: glibc's own adjusted maxima
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_lock = threading.Lock()
_depth = 0  # nested or concurrent scoring passes: the first in sets, the last out restores


def _glibc():
    """`_functions()`, or None when switched off or the user tuned malloc."""
    if os.environ.get("LEAKAUDIT_KEEP_FREED_MEMORY", "1").strip() == "0":
        return None
    if any(k in os.environ for k in USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    return _functions()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _functions():
    """mallopt, and a function that gives free heap memory back to the OS when there is more than
    AFTER_TRIM_BYTES of it (glibc's own rule for the heap's top): trimming after every small pass, then faulting
    the pages in again, cost a tiny model's pass a fifth of its time."""
    try:
        libc = ctypes.CDLL(None)
        mallopt, trim, info = libc.mallopt, libc.malloc_trim, libc.mallinfo2
    except (OSError, AttributeError, TypeError):  # not glibc (or older than 2.33: no mallinfo2); Windows'
        return None  # CDLL(None) raises TypeError (it looks for '/' in the name), which failed every scoring pass
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    info.argtypes, info.restype = [], _MallInfo2

    def give_back() -> None:
        if info().fordblks > AFTER_TRIM_BYTES:
            trim(0)

    return mallopt, give_back


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Keep freed memory for reuse inside the block; yields whether the setting is in force."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield False
        return
    mallopt, give_back = libc
    with _lock:
        if _depth == 0:
            mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)
            mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                mallopt(M_MMAP_THRESHOLD, AFTER_MMAP_BYTES)
                mallopt(M_TRIM_THRESHOLD, AFTER_TRIM_BYTES)
                give_back()
