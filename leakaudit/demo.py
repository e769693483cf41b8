"""The laptop-scale first study (`leakaudit demo`): experiments/demo.yaml, run into an output dir."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from leakaudit import resources
from leakaudit.data.builtin import dolly  # noqa: F401  (re-exported for callers not yet moved to data.builtin)
from leakaudit.errors import InputError
from leakaudit.progress import say

DEMO_EXPERIMENT = resources.ROOT / "experiments" / "demo.yaml"  # also linked from experiments/


def run_demo(out: str | Path, log: Callable[[str], None] = say) -> dict[str, str]:
    """Run experiments/demo.yaml into `out` (resumable), writing report.html and summary.json."""
    from leakaudit.config import load_experiment
    from leakaudit.experiment import run_experiment

    if not DEMO_EXPERIMENT.is_file():
        raise InputError("the demo experiment file is missing (run from a source checkout)", file=DEMO_EXPERIMENT)
    exp = load_experiment(DEMO_EXPERIMENT)
    log(f"demo: {exp.name} on real Enron messages (the sample shipped in the package)")
    return run_experiment(exp, out, config_text=DEMO_EXPERIMENT.read_text(encoding="utf-8"), log=log)
