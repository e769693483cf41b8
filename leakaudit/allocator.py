"""The C allocator of a `leakaudit` command keeps freed memory for reuse instead of handing it back to the OS.

Why: a scoring pass allocates and frees the same large activations batch after batch. glibc's malloc serves
blocks above its mmap threshold (adjusted on the fly, 128 KiB to 32 MiB) with fresh mappings, and returns free
heap memory past its trim threshold, so the next batch faults those pages in again, each zeroed by the kernel.
On a 2-core AMD EPYC, `leakaudit score` over 200 texts on 1 thread spent 1.9-8.4 s of 65-74 s in the kernel;
with both thresholds fixed at 1 GiB, about 1 s (BENCHMARKS.md, bench/allocator.py). The price: a process keeps
up to that much freed memory until it exits, which suits a command, so only the `leakaudit` command does this;
importing leakaudit as a library changes nothing. `LEAKAUDIT_KEEP_FREED_MEMORY=0` turns it off. glibc only:
elsewhere (musl, macOS) nothing happens.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to KEEP_BYTES; True when both were set."""
    if os.environ.get("LEAKAUDIT_KEEP_FREED_MEMORY", "1").strip() == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library symbols to look up, or not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
