"""The one way leakaudit draws a progress bar: rich, on stderr, gone when done.

Why: only a terminal shows a live bar; into a pipe or a log file rich draws nothing until the end and then
prints an empty line, one per bar, between the run's progress lines. So the bar is drawn on a terminal (or in a
notebook, where rich draws it as a widget) only.
"""

from __future__ import annotations

from typing import Any


def progress_bar(*columns: Any) -> Any:
    """A transient rich Progress on stderr with these columns, disabled where stderr is neither a terminal nor
    a notebook's output."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    import importlib.util

    # rich draws a notebook's bar with ipywidgets, and without them warns on every refresh
    notebook = console.is_jupyter and importlib.util.find_spec("ipywidgets") is not None
    return Progress(*columns, console=console, transient=True, disable=not (console.is_terminal or notebook))
