"""The one way leakaudit draws a progress bar: rich, on stderr, gone when done.

Why: only a terminal shows a live bar; into a pipe or a log file rich draws nothing until the end and then
prints an empty line, one per bar, between the run's progress lines. So the bar is drawn on a terminal (or in a
notebook, where rich draws it as a widget) only. A log (a pipe, a file, `nohup`, a CI job, TERM=dumb) gets one
plain line per pass at most every LOG_INTERVAL_S seconds instead: without it an hour-long fine-tune or scoring
pass wrote nothing at all between its start and its end, and a stalled job looked like a running one.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

#: seconds between two progress lines of one pass in a log (`LEAKAUDIT_PROGRESS_INTERVAL`; 0: none). A pass
#: shorter than this says nothing, so short commands and tests print as before.
LOG_INTERVAL_S = 60.0


def log_interval() -> float:
    """`LEAKAUDIT_PROGRESS_INTERVAL` in seconds (0 or less: no lines), else LOG_INTERVAL_S; a value that is no
    number is LOG_INTERVAL_S (a progress setting is not worth stopping a run for)."""
    try:
        return float(os.environ.get("LEAKAUDIT_PROGRESS_INTERVAL", LOG_INTERVAL_S))
    except ValueError:
        return LOG_INTERVAL_S


@contextlib.contextmanager
def counting(enabled: bool, description: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    """A bar over `total` items (sampled rows, proposed texts), "description ━━━ 3/8 0:01:02", yielding the
    function that counts n more done; disabled, a function that does nothing."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    with progress_bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      unit=unit) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.update(task, advance=n)


def progress_bar(*columns: Any, unit: str = "") -> Any:
    """A transient rich Progress on stderr with these columns, disabled where stderr is neither a terminal nor
    a notebook's output; there it writes a plain line now and then (`_LogLines`). `unit` names what the
    counts count in those lines (tok, rows, steps)."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    import importlib.util

    # rich draws a notebook's bar with ipywidgets, and without them warns on every refresh
    notebook = console.is_jupyter and importlib.util.find_spec("ipywidgets") is not None
    if console.is_terminal and not console.is_dumb_terminal or notebook:
        return Progress(*columns, console=console, transient=True)
    return _log_lines(columns, console, unit)


def _log_lines(columns: tuple, console: Any, unit: str) -> Any:
    """A disabled Progress (no live display, no escape codes) that writes `_line` for a task when
    `log_interval()` seconds have passed since its start or its last line."""
    from rich.progress import Progress

    interval = log_interval()

    class _LogLines(Progress):
        def __init__(self) -> None:
            super().__init__(*columns, console=console, transient=True, disable=True)
            self._said: dict[Any, float] = {}

        def update(self, task_id: Any, **kwargs: Any) -> None:
            super().update(task_id, **kwargs)
            if interval <= 0:
                return
            task = self._tasks.get(task_id)
            if task is None or task.start_time is None:
                return
            now = self.get_time()
            if now - self._said.get(task_id, task.start_time) >= interval and not task.finished:
                say(_line(task, unit))
                self._said[task_id] = self.get_time()  # after the line: its first one loads the PII masker

        def advance(self, task_id: Any, advance: float = 1) -> None:
            self.update(task_id, advance=advance)

    return _LogLines()


def _line(task: Any, unit: str) -> str:
    """`scoring (target): 244143/1189736 tok (21%), 1:02 elapsed, about 3:54 left, loss 6.9219`."""
    done = int(task.completed)
    total = f"/{int(task.total)}" if task.total else ""
    share = f" ({100 * task.completed / task.total:.0f}%)" if task.total else ""
    left = task.time_remaining
    parts = [f"{task.description}: {done}{total}{' ' + unit if unit else ''}{share}",
             f"{_clock(task.elapsed or 0)} elapsed"]
    if left is not None:
        parts.append(f"about {_clock(left)} left")
    parts += [f"{name} {value}" for name, value in task.fields.items() if str(value) not in ("", "-")]
    return ", ".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def say(line: str) -> None:
    """One line on stderr, PII masked as every log line is (a description may name a model spec). The default
    `log` of the library's long calls (run_experiment, run_demo, run_pii, a kind's context): what they say is
    progress, not a result, so it goes where the CLI's does and never onto a notebook's or a script's stdout."""
    from leakaudit.data.pii_mask import mask_message

    print(mask_message(line), file=sys.stderr, flush=True)
