"""The allocator setting scoring runs under: kept freed memory inside, given back and restored outside."""

import ctypes
import platform

import pytest

from leakaudit import allocator

BLOCK = 80 << 20  # above the 32 MiB mmap threshold restored afterwards and the 64 MiB trim rule, far below 1 GiB
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@pytest.fixture
def libc():
    lib = ctypes.CDLL(None)
    lib.malloc.argtypes, lib.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    lib.free.argtypes, lib.free.restype = [ctypes.c_void_p], None
    lib.mallinfo2.restype = MallInfo2
    return lib


@pytest.fixture(autouse=True)
def _no_user_malloc_settings(monkeypatch):
    for name in (*allocator.USER_SETTINGS, "GLIBC_TUNABLES", "LEAKAUDIT_KEEP_FREED_MEMORY"):
        monkeypatch.delenv(name, raising=False)


def _mapped_by_malloc(libc) -> bool:
    """Whether a large malloc gets its own mapping (True) or comes from the heap (False). Larger by BLOCK than
    all free heap memory, so no free chunk can serve it."""
    size = libc.mallinfo2().fordblks + BLOCK
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(size)
    mapped = libc.mallinfo2().hblkhd - before >= size
    libc.free(p)
    return mapped


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only; see test_elsewhere_nothing_happens")
def test_inside_a_pass_large_blocks_come_from_the_heap_and_stay_there_until_the_last_pass_ends(libc):
    with allocator.freed_memory_kept() as kept:
        assert kept
        assert not _mapped_by_malloc(libc)
        with allocator.freed_memory_kept():  # a nested pass: leaving it restores nothing
            pass
        p = libc.malloc(libc.mallinfo2().fordblks + BLOCK)
        grown = libc.mallinfo2().arena
        libc.free(p)
        assert libc.mallinfo2().arena >= grown - (1 << 20)  # freed, but kept in the heap (no trim)
        assert not _mapped_by_malloc(libc)
    assert libc.mallinfo2().arena <= grown - BLOCK  # more than 64 MiB free: given back on the way out
    assert _mapped_by_malloc(libc)  # and blocks above 32 MiB are mapped again


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


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_the_engine_scores_with_freed_memory_kept_and_gives_it_back(tiny_neox, libc, monkeypatch):
    from leakaudit import scoring

    seen = []
    real_forward = tiny_neox.model.forward

    def forward(*args, **kwargs):
        seen.append(_mapped_by_malloc(libc))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(tiny_neox.model, "forward", forward)
    scoring.score_texts(tiny_neox, ["a short text", "another one"], cache=False, progress=False)
    assert seen and not any(seen)
    assert _mapped_by_malloc(libc)
