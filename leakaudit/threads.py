"""How many CPU threads torch uses: chosen from what this process may actually run on, not inherited.

Why: torch starts one OpenMP thread per core it sees on the host. In a container limited to 2 CPUs on a
64-core host that is 64 threads time-sliced onto 2 CPUs, and on any machine more threads than usable CPUs
make each forward pass wait on preempted siblings (3-10x slower, BENCHMARKS.md). The choice, in order:
`LEAKAUDIT_THREADS`, then `OMP_NUM_THREADS` (which torch already honours), then the CPUs this process may
use: its CPU affinity, capped by a cgroup CPU quota (`cpu.max`, cgroup v2; `cpu.cfs_quota_us`, v1).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus() -> int:
    """CPUs this process may run on: affinity, capped by a cgroup quota when one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, quota) if quota else cpus)


def _cgroup_quota() -> int | None:
    """CPUs allowed by the cgroup quota (rounded up), or None when unlimited or unknown."""
    try:
        v2 = CGROUP_ROOT / "cpu.max"
        if v2.exists():
            limit, period = v2.read_text().split()[:2]
            return None if limit == "max" else math.ceil(int(limit) / int(period))
        quota = CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us"
        if quota.exists():
            q = int(quota.read_text())
            p = int((CGROUP_ROOT / "cpu" / "cpu.cfs_period_us").read_text())
            return None if q <= 0 else math.ceil(q / p)
    except (OSError, ValueError):
        return None
    return None


def choose_threads() -> int:
    """The thread count for torch (see the module docstring for the order)."""
    for var in ("LEAKAUDIT_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return usable_cpus()


def configure_threads() -> int:
    """Use `choose_threads()` threads: through OMP_NUM_THREADS before torch starts (so OpenMP never spawns
    more), and torch.set_num_threads when torch is already loaded. Returns the number."""
    n = choose_threads()
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
