"""How many CPU threads torch uses: chosen from what this process may actually run on, not inherited.

Why: torch starts one OpenMP thread per core it sees on the host. In a container limited to 2 CPUs on a
64-core host that is 64 threads time-sliced onto 2 CPUs, and on any machine more threads than usable CPUs
make each forward pass wait on preempted siblings (3-10x slower, BENCHMARKS.md). The choice, in order:
`LEAKAUDIT_THREADS`, then `OMP_NUM_THREADS` (which torch already honours), then the CPUs this process may
use: its CPU affinity, capped by a cgroup CPU quota (`cpu.max`, cgroup v2; `cpu.cfs_quota_us`, v1), less the
CPUs other processes keep busy when the process sees the whole machine (a thread sharing a core with another
busy process stalls every parallel region of its siblings; measured in bench/threads.py).
"""

from __future__ import annotations

import math
import os
import sys
import time
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


def _own_running_threads() -> int:
    """This process's threads running now (at least the one asking): a library started before the choice
    (numpy's BLAS pool spinning up) is this process's work, not another's."""
    running = 0
    try:
        for task in Path("/proc/self/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            running += stat.rsplit(")", 1)[-1].split()[0] == "R"  # the state field, after the command name
    except OSError:
        return 1
    return max(1, running)


def busy_elsewhere(samples: int = 5, interval_s: float = 0.01) -> int:
    """CPUs kept busy by other processes now: the median over a few samples of the kernel's count of running
    tasks (/proc/stat `procs_running`) less this process's own running threads. 0 when unknown."""
    counts = []
    for i in range(samples):
        try:
            text = Path("/proc/stat").read_text()
        except OSError:
            return 0
        line = next((x for x in text.splitlines() if x.startswith("procs_running")), None)
        if line is None:
            return 0
        counts.append(max(0, int(line.split()[1]) - _own_running_threads()))
        if i + 1 < samples:
            time.sleep(interval_s)
    return sorted(counts)[len(counts) // 2]


def choose_threads() -> int:
    """The thread count for torch (see the module docstring for the order)."""
    for var in ("LEAKAUDIT_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    cpus = usable_cpus()
    # /proc/stat counts the whole machine: compare it only when this process may use the whole machine
    if cpus == (os.cpu_count() or cpus):
        cpus = max(1, cpus - busy_elsewhere())
    return cpus


def configure_threads() -> int:
    """Use `choose_threads()` threads: through OMP_NUM_THREADS before torch starts (so OpenMP never spawns
    more), and torch.set_num_threads when torch is already loaded. Returns the number."""
    n = choose_threads()
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def in_use() -> int | None:
    """torch's thread count now, or None before torch is loaded (a stage that computed nothing). Recorded per
    stage: in bf16 the rounding, and so the numbers, depend on it (docs: README "CPU threads")."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None
