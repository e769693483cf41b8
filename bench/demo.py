"""Time `leakaudit demo` (per stage and in total) and a fully cached rerun, in one run.

    .venv/bin/python bench/demo.py [--out DIR]

Prints each stage's seconds, the cold wall time (target: <= 600 s on a 2-core CPU), the cached rerun's
wall time and the ratio between them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: a fresh temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="leakaudit-demo-"))
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    from leakaudit.demo import run_demo

    t0 = time.perf_counter()
    run_demo(out, log=lambda m: print(m, flush=True))
    cold = time.perf_counter() - t0
    t1 = time.perf_counter()
    status = run_demo(out, log=lambda m: None)
    cached = time.perf_counter() - t1
    assert set(status.values()) == {"cached"}, status
    run = json.loads((out / "run.json").read_text())
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    for s in run["stages"]:
        print(f"  {s['id']:<40} {s['seconds']:>8.1f} s")
    print(f"demo cold: {cold:.1f} s (target <= 600 s); cached rerun: {cached:.1f} s; ratio {cold / cached:.1f}x")
    summary = json.loads((out / "summary.json").read_text())
    for h in summary["headline"]:
        if "TPR" in h["metric"]:
            continue
        ci = f" [{h['ci'][0]:.3f}, {h['ci'][1]:.3f}]" if h["ci"] else ""
        print(f"  {h['variant']:<10} {h['evaluation']:<11} {h['metric']:<28} {h['value']:.3f}{ci}")


if __name__ == "__main__":
    main()
