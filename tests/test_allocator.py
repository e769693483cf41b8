"""leakaudit/allocator.py: the `leakaudit` command keeps freed memory for reuse (glibc), and can be told not to."""

from __future__ import annotations

import os
import subprocess
import sys

import leakaudit.cli

# In a fresh interpreter: touch and free a 256 MiB malloc block, print resident MiB before and after the free.
PROBE = """
import ctypes, os, sys
from leakaudit.allocator import keep_freed_memory
print(int(keep_freed_memory()))
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
size = 256 << 20
p = libc.malloc(size)
ctypes.memset(p, 1, size)
before = rss_mib()
libc.free(p)
print(before, rss_mib())
"""


def _probe(keep: str) -> tuple[bool, float, float]:
    env = {**os.environ, "LEAKAUDIT_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    flag, sizes = out.stdout.splitlines()
    before, after = map(float, sizes.split())
    return flag == "1", before, after


def test_freed_memory_stays_with_the_process_unless_turned_off():
    """Linux with glibc (this project's CI): a freed 256 MiB block goes back to the OS by default and stays in
    the process (ready for the next batch) once leakaudit set the thresholds."""
    kept, before, after = _probe("1")
    assert kept and after > before - 16, (before, after)
    kept, before, after = _probe("0")
    assert not kept and after < before - 200, (before, after)


def test_the_command_sets_it_and_importing_leakaudit_does_not(monkeypatch):
    calls = []
    monkeypatch.setattr(leakaudit.cli, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", ["leakaudit", "--help"])
    try:
        leakaudit.cli.main()
    except SystemExit:
        pass
    assert calls == [1]
    code = "import leakaudit, leakaudit.scoring, sys; print('leakaudit.allocator' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
