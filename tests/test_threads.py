"""Thread choice: explicit settings first, else the CPUs the process may use (affinity, cgroup quota)."""

from __future__ import annotations

import pytest

from leakaudit import threads


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("LEAKAUDIT_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0)  # an idle machine, whatever runs beside the test


def test_cgroup_quota_caps_affinity(no_env, monkeypatch, tmp_path):
    monkeypatch.setattr(threads, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert threads.choose_threads() == 64  # no cgroup files: the affinity
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs (v2) -> 2 threads
    assert threads.choose_threads() == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.choose_threads() == 64
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")  # v1: 3 CPUs
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.choose_threads() == 3
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1 unlimited
    assert threads.choose_threads() == 64
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {5})
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("800000\n")
    assert threads.choose_threads() == 1  # the affinity is the smaller


def test_explicit_settings_win(no_env, monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    assert threads.choose_threads() == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads() == 3
    monkeypatch.setenv("LEAKAUDIT_THREADS", "1")
    assert threads.choose_threads() == 1
    monkeypatch.setenv("LEAKAUDIT_THREADS", "zero")  # not a count: ignored
    assert threads.choose_threads() == 3


def test_configure_sets_torch_and_children(no_env, monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("LEAKAUDIT_THREADS", "1")
    try:
        assert threads.configure_threads() == 1
        assert torch.get_num_threads() == 1 and threads.os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_other_busy_processes_take_cpus(no_env, monkeypatch):
    """Seeing the whole machine, threads = CPUs less those other processes keep busy (at least 1)."""
    monkeypatch.setattr(threads, "usable_cpus", lambda: 4)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 1)
    assert threads.choose_threads() == 3
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 9)
    assert threads.choose_threads() == 1
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 64)  # a quota or affinity: /proc/stat is not ours
    assert threads.choose_threads() == 4


def test_busy_elsewhere_sees_a_busy_loop():
    import subprocess
    import sys

    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        assert threads.busy_elsewhere() >= 1
    finally:
        loop.kill()
        loop.wait()


def test_the_command_chooses_threads_before_numpy_or_torch_start(tmp_path):
    """The launcher check (cli._one_process) imported numpy before the threads were chosen: numpy's BLAS
    threads, spinning up, were counted as other processes' busy CPUs and every command ran on one thread
    (the demo 7 min instead of 5; mia 17 s instead of 12)."""
    import subprocess
    import sys

    script = ("import sys\nimport leakaudit.cli as cli\nseen = {}\n"
              "def spy():\n    seen.update(numpy='numpy' in sys.modules, torch='torch' in sys.modules)\n    return 1\n"
              "cli.configure_threads = spy\nsys.argv = ['leakaudit', 'mia', '--help']\n"
              "try:\n    cli.main()\nexcept SystemExit:\n    pass\nprint(seen)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.stdout.strip().splitlines()[-1] == "{'numpy': False, 'torch': False}", out.stdout + out.stderr


def test_this_processs_own_busy_threads_are_not_another_processs(monkeypatch):
    """Threads of this process spinning (numpy's BLAS pool started before the choice) were counted as other
    processes' busy CPUs, and the command took one thread on an idle 2-core machine."""
    import threading

    import torch

    real_read = threads.Path.read_text

    def proc_stat(self, *args, **kwargs):  # the kernel sees 3 running tasks: all of them this process's
        return "procs_running 3\n" if str(self) == "/proc/stat" else real_read(self, *args, **kwargs)

    monkeypatch.setattr(threads.Path, "read_text", proc_stat)
    monkeypatch.setattr(threads, "_own_running_threads", lambda: 3)
    assert threads.busy_elsewhere(samples=1) == 0
    monkeypatch.undo()
    # and a thread of this process computing (torch releases the GIL) is seen running
    stop = threading.Event()
    a = torch.randn(256, 256)

    def work():
        while not stop.is_set():
            a @ a

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        seen = max(threads._own_running_threads() for _ in range(50))
    finally:
        stop.set()
        worker.join()
    assert seen >= 2
