"""`leakaudit run EXPERIMENT.yaml`, `leakaudit report DIR`, `leakaudit seeds DIR...` and `leakaudit demo`."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from leakaudit.cli.core import say, say_result
from leakaudit.options import MAX_SEED

console = Console(stderr=True, soft_wrap=True)  # a stage line stays one line when piped


def _log(message: str) -> None:
    """Stage progress lines (stages draw their own progress bars in between), PII masked (`mask_message`): a
    stage id holds the experiment's own labels. Under a launcher only rank 0 tells them."""
    from leakaudit.data.pii_mask import mask_message
    from leakaudit.distributed import is_main

    if not is_main():
        return

    message = mask_message(message)
    style = "green" if message.endswith("cached") or " done in " in message or ": reused from " in message else "cyan"
    console.print(f"[{style}]{escape(message)}[/]", highlight=False)  # grid labels hold [brackets]


def print_verdicts(out: Path) -> None:
    """End a run the way its report opens: one verdict line per paired comparison (summary.json), so the answer
    is on the terminal without opening report.html. Nothing when the experiment compares nothing."""
    import json

    from leakaudit.report.html import verdict_sentence

    summary = out / "summary.json"
    comparisons = json.loads(summary.read_text(encoding="utf-8")).get("comparisons") if summary.is_file() else None
    if not comparisons:
        return
    say_result("verdicts (paired Δ with its 95% CI; details in report.html):")
    for c in comparisons:  # masked as the stage lines are: a variant's name holds the experiment's own labels
        say_result(f"  {verdict_sentence(c)}")


def run(
    experiment: Path = typer.Argument(..., metavar="EXPERIMENT", help="Experiment file (YAML); see experiments/ and docs/experiments.md"),
    out: Path = typer.Option(..., "--out", help="Output dir; rerunning with the same dir resumes"),
    no_report: bool = typer.Option(False, "--no-report", help="Skip writing report.html and summary.json"),
    seed: int | None = typer.Option(None, "--seed", min=0, max=MAX_SEED, help="Override the file's `seed` (one output dir per seed)"),
    reuse: Path | None = typer.Option(None, "--reuse", help="Another run's dir: copy (hard-link) the stages it "
                                      "finished with the same key instead of running them, e.g. the steps "
                                      "with a fixed `seed` that every seed's run shares"),
) -> None:
    """Run every stage of an experiment file (cached by a hash of its inputs), then write the report."""
    from leakaudit.config import load_experiment
    from leakaudit.distributed import is_main
    from leakaudit.experiment import run_experiment

    exp = load_experiment(experiment)
    if seed is not None:
        exp.seed = seed
    t0 = time.perf_counter()
    status = run_experiment(exp, out, config_text=exp._text, log=_log,
                            report=not no_report, reuse=reuse)
    if not is_main():  # under a launcher rank 0 says how it went
        return
    if not no_report:
        print_verdicts(out)
    ran = sum(1 for s in status.values() if s == "ran")
    reused = sum(1 for s in status.values() if s == "reused")
    say(f"{len(status)} stages ({ran} ran, {reused} reused, {len(status) - ran - reused} cached) in "
        f"{time.perf_counter() - t0:.0f}s; outputs in {out}")


def report(
    out: Path = typer.Argument(..., metavar="DIR", help="Output dir of `leakaudit run` or `leakaudit demo`"),
) -> None:
    """(Re)write report.html and summary.json from what a run left in DIR."""
    from leakaudit.distributed import is_main, world
    from leakaudit.report.html import write_report

    if not is_main():  # under a launcher one process writes it; a platform that sets RANK for every pod too
        rank, size = world()
        console.print(f"report: not written by this process (rank {rank} of {size}, from RANK and WORLD_SIZE); "
                      "rank 0 writes it")
        return
    path = write_report(out)
    say_result(f"report: {path}")  # the result, on stdout, masked as `run` masks the same line (an --out may be
    # named after a person); only the path of a model a command made goes out unmasked


def seeds(
    dirs: list[Path] = typer.Argument(..., metavar="DIR", help="Output dirs of one experiment's runs, one per seed"),
    markdown_out: Path | None = typer.Option(None, "--markdown", help="Also write the tables to this file"),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the rows as JSON to this file"),
) -> None:
    """One experiment over its seeds: every seed's paired comparisons side by side, the mean Δ over seeds
    with a 95% interval that holds the seeds' spread and the items' error, as Markdown on stdout."""
    import json

    from leakaudit.data.io import write_atomic
    from leakaudit.outputs import prepare_output
    from leakaudit.seeds import MARKDOWN_START, combine, markdown, read_runs

    runs = read_runs(dirs)
    inputs = {f"run dir {d}": d for d in dirs}
    for out, option, what in ((markdown_out, "--markdown", {"starts": MARKDOWN_START}),
                              (json_out, "--json", {"keys": JSON_KEYS, "suffixes": (".json",)})):
        if out is not None:  # never over a run's own files, nor a file `seeds` did not write
            prepare_output(out, command="seeds", inputs=inputs, kind="file", option=option, **what)
    rows = combine(runs)
    text = markdown(runs, rows)
    if markdown_out is not None:
        write_atomic(markdown_out, lambda fh: fh.write(text + "\n"))
        say(f"wrote {markdown_out}")
    if json_out is not None:
        record = {"experiment": runs[0].experiment.get("name"), "seeds": [r.seed for r in runs],
                  "dirs": [str(r.out) for r in runs], "rows": rows}
        write_atomic(json_out, lambda fh: fh.write(json.dumps(record, indent=1) + "\n"))
        say(f"wrote {json_out}")
    say_result(text)  # masked: the experiment's name and its labels are free text


JSON_KEYS = ("experiment", "seeds", "dirs", "rows")  # what `seeds --json` writes


def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", help="Output dir; rerunning resumes"),
) -> None:
    """The first study at laptop scale on the embedded default model (4-8 minutes on a 2-core CPU)."""
    from leakaudit.demo import run_demo
    from leakaudit.distributed import is_main

    t0 = time.perf_counter()
    status = run_demo(out, log=_log)
    if not is_main():  # under a launcher rank 0 says how it went
        return
    print_verdicts(out)
    say(f"demo finished: {len(status)} stages in {time.perf_counter() - t0:.0f}s; open {out / 'report.html'}")


def register(app: typer.Typer) -> None:
    """Add `run`, `report`, `seeds` and `demo` to the app."""
    app.command("run")(run)
    app.command("report")(report)
    app.command("seeds")(seeds)
    app.command("demo")(demo)
