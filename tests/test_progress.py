"""Progress where no bar can be drawn (a pipe, a log file, nohup, CI): a plain line now and then, not silence."""

from __future__ import annotations

import time

from rich.progress import TextColumn

from leakaudit.progress import progress_bar


def _pass(steps: list[tuple[float, int]], unit: str = "tok", **fields) -> list[str]:
    """Run one task of 100 through a bar: each step sleeps, then advances."""
    with progress_bar(TextColumn("{task.description}"), unit=unit) as bar:
        task = bar.add_task("scoring (target)", total=100, **fields)
        for pause, n in steps:
            time.sleep(pause)
            bar.update(task, advance=n)


def test_a_log_gets_a_plain_line_per_interval_and_none_at_the_end(monkeypatch, capsys):
    """Into a pipe rich draws nothing, and an hour-long pass wrote nothing between its start and its end."""
    monkeypatch.setenv("LEAKAUDIT_PROGRESS_INTERVAL", "0.2")
    _pass([(0, 10), (0.25, 10), (0, 10), (0.25, 70)])  # a line after the first wait only: the last step ends it
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("scoring (target): 20/100 tok (20%), 0:00 elapsed, about 0:0"), lines
    assert "\x1b" not in lines[0] and "\r" not in lines[0]


def test_a_short_pass_says_nothing_and_zero_turns_lines_off(monkeypatch, capsys):
    _pass([(0, 50), (0, 50)])  # the default interval (a minute): a short command prints as before
    monkeypatch.setenv("LEAKAUDIT_PROGRESS_INTERVAL", "0")
    _pass([(0.01, 50), (0.01, 40)])
    assert capsys.readouterr().err == ""


def test_a_lines_fields_are_named(monkeypatch, capsys):
    monkeypatch.setenv("LEAKAUDIT_PROGRESS_INTERVAL", "0.1")
    _pass([(0, 1), (0.15, 1)], unit="steps", loss="6.9219")
    assert capsys.readouterr().err.rstrip().endswith("left, loss 6.9219")

