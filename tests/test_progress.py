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



def test_a_dumb_terminal_gets_the_log_lines_not_a_live_bar(monkeypatch):
    """TERM=dumb (an editor's shell, some CI runners) is a terminal that cannot redraw a line: it gets the plain
    lines a log gets."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich reads stderr as a terminal
    monkeypatch.setenv("TERM", "xterm")
    assert not progress_bar(TextColumn("{task.description}")).disable  # a real terminal: the live bar
    monkeypatch.setenv("TERM", "dumb")
    assert progress_bar(TextColumn("{task.description}")).disable


def test_an_interval_that_is_no_number_is_the_default(monkeypatch):
    """A progress setting is not worth stopping a run for, nor a line at every step of it."""
    from leakaudit.progress import LOG_INTERVAL_S, log_interval

    monkeypatch.setenv("LEAKAUDIT_PROGRESS_INTERVAL", "a minute")
    assert log_interval() == LOG_INTERVAL_S
    monkeypatch.setenv("LEAKAUDIT_PROGRESS_INTERVAL", "2.5")
    assert log_interval() == 2.5


def test_a_line_counts_hours_and_leaves_out_fields_not_set_yet():
    """An hour-long pass reads 1:02:05, not 62:05; a loss not logged yet (`-`) is no field of the line."""
    from types import SimpleNamespace

    from leakaudit.progress import _line

    task = SimpleNamespace(description="fine-tuning", completed=30, total=120, time_remaining=None, elapsed=3725,
                           fields={"loss": "-"})
    assert _line(task, "steps") == "fine-tuning: 30/120 steps (25%), 1:02:05 elapsed"
    task.fields, task.time_remaining = {"loss": "2.5000"}, 59
    assert _line(task, "steps") == "fine-tuning: 30/120 steps (25%), 1:02:05 elapsed, about 0:59 left, loss 2.5000"


def test_a_line_is_pii_masked(monkeypatch, capsys):
    """A pass's description names a model spec, which may name a person."""
    monkeypatch.setenv("LEAKAUDIT_PROGRESS_INTERVAL", "0.000001")
    with progress_bar(TextColumn("{task.description}"), unit="tok") as bar:
        task = bar.add_task("scoring (models/jane.doe@enron.com)", total=10)
        time.sleep(0.01)
        bar.update(task, advance=1)
    err = capsys.readouterr().err
    assert err.startswith("scoring (models/j***@enron.com): 1/10 tok") and "jane.doe" not in err
