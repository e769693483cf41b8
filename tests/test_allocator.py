"""The allocator setting scoring runs under: kept freed memory inside, given back and restored outside."""

import platform
import subprocess
import sys
import textwrap

import pytest

from leakaudit import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Run in a fresh interpreter: what a test process allocated before (hundreds of MiB free in its heap after the
# model tests) would serve or outgrow the blocks below.
HEAP_CHECK = textwrap.dedent('''
    import ctypes
    from leakaudit import allocator

    BLOCK = 80 << 20  # above the 32 MiB mmap threshold restored afterwards and the 64 MiB trim rule, below 1 GiB

    libc = ctypes.CDLL(None)
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
    libc.mallinfo2.restype = allocator._MallInfo2

    def mapped_by_malloc():
        """Whether a block larger by BLOCK than all free heap (so no free chunk can serve it) gets its own
        mapping (True) or comes from the heap (False)."""
        size = libc.mallinfo2().fordblks + BLOCK
        before = libc.mallinfo2().hblkhd
        p = libc.malloc(size)
        mapped = libc.mallinfo2().hblkhd - before >= size
        libc.free(p)
        return mapped

    assert mapped_by_malloc(), "glibc's default: a block this large is mapped"
    with allocator.freed_memory_kept() as kept:
        assert kept
        assert not mapped_by_malloc(), "inside a pass: from the heap"
        with allocator.freed_memory_kept():  # a nested pass: leaving it restores nothing
            pass
        p = libc.malloc(BLOCK)
        grown = libc.mallinfo2().arena
        libc.free(p)
        assert libc.mallinfo2().arena >= grown - (1 << 20), "freed, but kept in the heap (no trim)"
        assert not mapped_by_malloc(), "still inside the outer pass: from the heap"
    assert libc.mallinfo2().arena <= grown - BLOCK, "more than 64 MiB free: given back on the way out"
    assert mapped_by_malloc(), "after the pass: mapped again"
    print("ok")
''')


@pytest.fixture(autouse=True)
def _no_user_malloc_settings(monkeypatch):
    for name in (*allocator.USER_SETTINGS, "GLIBC_TUNABLES", "LEAKAUDIT_KEEP_FREED_MEMORY"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only; see test_elsewhere_nothing_happens")
def test_inside_a_pass_large_blocks_come_from_the_heap_and_stay_there_until_the_last_pass_ends():
    run = subprocess.run([sys.executable, "-c", HEAP_CHECK], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


@pytest.mark.parametrize("env", [{"LEAKAUDIT_KEEP_FREED_MEMORY": "0"}, {"MALLOC_MMAP_THRESHOLD_": "65536"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_switched_off_or_tuned_by_the_user_nothing_changes(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with allocator.freed_memory_kept() as kept:
        assert not kept


def test_elsewhere_nothing_happens():
    with allocator.freed_memory_kept() as kept:
        assert kept == GLIBC


def test_the_engine_scores_inside_the_setting_and_leaves_it(tiny_neox, monkeypatch):
    from leakaudit import scoring

    depths = []
    real_forward = tiny_neox.model.forward

    def forward(*args, **kwargs):
        depths.append(allocator._depth)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(tiny_neox.model, "forward", forward)
    scoring.score_texts(tiny_neox, ["a short text", "another one"], cache=False, progress=False)
    assert depths and all(d == (1 if GLIBC else 0) for d in depths)
    assert allocator._depth == 0


def test_no_c_library_by_that_name(monkeypatch):
    """Windows: ctypes.CDLL(None) raises TypeError (Python 3.11 looks for '/' in the name), and every scoring
    pass failed on it; there, as on any system without glibc, nothing is set."""
    import ctypes

    def windows_cdll(name, *args, **kwargs):
        if name is None:
            raise TypeError("argument of type 'NoneType' is not iterable")
        raise OSError(name)

    monkeypatch.setattr(ctypes, "CDLL", windows_cdll)
    monkeypatch.delenv("LEAKAUDIT_KEEP_FREED_MEMORY", raising=False)
    allocator._functions.cache_clear()
    try:
        with allocator.freed_memory_kept() as kept:
            assert kept is False
    finally:
        allocator._functions.cache_clear()
