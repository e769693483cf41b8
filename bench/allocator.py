"""`leakaudit score` as a whole process with glibc's default malloc thresholds (`LEAKAUDIT_KEEP_FREED_MEMORY=0`)
against leakaudit's default, both fixed at 1 GiB while the engine scores (freed memory kept for reuse,
leakaudit/allocator.py), alternating, on the same texts, in one run: wall time, time in the kernel (system CPU
time, mostly page faults) and peak RSS of each process.

Usage: python bench/allocator.py [--texts 200] [--pairs 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from peers import cpu_kind  # noqa: E402
from score import bench_texts  # noqa: E402

from leakaudit.allocator import USER_SETTINGS  # noqa: E402
from leakaudit.data.io import write_jsonl  # noqa: E402


def run_once(data: Path, out: Path, threads: int, keep: bool) -> dict[str, float]:
    """One `leakaudit score` process: wall seconds, system CPU seconds and peak RSS (MiB), from its own rusage."""
    env = {**os.environ, "LEAKAUDIT_THREADS": str(threads), "LEAKAUDIT_KEEP_FREED_MEMORY": "1" if keep else "0"}
    for var in (*USER_SETTINGS, "GLIBC_TUNABLES"):  # a user's own malloc settings would switch it off
        env.pop(var, None)
    cmd = [sys.executable, "-m", "leakaudit", "score", "--model", "default", "--data", str(data), "--out", str(out),
           "--no-cache"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"leakaudit score failed (exit {proc.returncode}): {' '.join(cmd)}")
    out.unlink()
    return {"wall_s": wall, "sys_s": usage.ru_stime, "user_s": usage.ru_utime, "peak_rss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    report = {"cpu": cpu_kind(), "threads": args.threads, "texts": args.texts, "runs": {"glibc_thresholds": [], "kept": []}}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "texts.jsonl"
        write_jsonl(data, ({"text": t} for t in bench_texts(args.texts)))
        for _ in range(args.pairs):
            for label, keep in (("glibc_thresholds", False), ("kept", True)):
                run = run_once(data, Path(tmp) / "scores.jsonl", args.threads, keep)
                report["runs"][label].append(run)
                print(json.dumps({label: run}), flush=True)
    for label, runs in report["runs"].items():
        report[f"median_wall_s_{label}"] = statistics.median(r["wall_s"] for r in runs)
    report["speedup"] = report["median_wall_s_glibc_thresholds"] / report["median_wall_s_kept"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
