"""The MIA and user-inference summary tables keep every number, on a narrow terminal and in a log."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

METRICS = {name: {"auc": 0.501, "auc_ci": [0.471, 0.534], "tpr_at_fpr": {"0.01": 0.008, "0.001": None},
                  "tpr_needs_nonmembers": {"0.001": 1000}, "tpr_ci": {"0.01": [0.002, 0.052]}, "advantage": 0.072}
           for name in ("loss", "min_k", "min_k_pp")}


@pytest.mark.parametrize("terminal,width", [(True, 40), (False, 80)])
def test_the_mia_summary_keeps_every_number_in_a_narrow_terminal_and_in_a_log(monkeypatch, terminal, width):
    """At 40 columns rich cut every cell to `0.5…` (min_k and min_k_pp both read `mi…`); into a log it drew the
    table at 80 columns, a row over five lines and `non-memb…` cut."""
    import leakaudit.cli.core as cli_core
    import leakaudit.cli.mia as cli_mia

    out = io.StringIO()
    monkeypatch.setattr(cli_core, "results", Console(file=out, width=width, force_terminal=terminal, soft_wrap=True,
                                                    no_color=True))
    cli_mia._summary("MIA on m (150 members, 150 non-members)", METRICS)
    text = out.getvalue()
    assert "…" not in text
    assert text.splitlines()[0].strip() == "MIA on m (150 members, 150 non-members)"
    rows = [line for line in text.splitlines() if "min_k_pp" in line]
    assert len(rows) == 1 and all(x in rows[0] for x in ("0.501", "[0.471, 0.534]", "0.008 [0.002, 0.052]",
                                                         "1000 non-members", "0.072")), text


def test_a_result_table_keeps_its_first_column_left_and_a_narrow_terminal_names_each_cell(monkeypatch):
    """audit-data's table right-aligns its counts, not the row names; too narrow a terminal gets a line per row
    with each number after its column's name."""
    import leakaudit.cli.core as cli_core

    heads, rows = ("what", "in source", "reproduced"), [("email", "12", "3"), ("ip", "4", "0")]
    out = io.StringIO()
    monkeypatch.setattr(cli_core, "results", Console(file=out, width=80, soft_wrap=True, no_color=True))
    cli_core.print_table("leakage", heads, rows, justify="right")
    assert out.getvalue().splitlines()[0] == "leakage" and out.getvalue().count("leakage") == 1  # its own line
    lines = out.getvalue().splitlines()
    email, ip = (next(x for x in lines if x.startswith(f"│ {name} ")) for name in ("email", "ip"))
    assert "│          3 │" in email and ip.startswith("│ ip    │"), out.getvalue()
    out = io.StringIO()
    monkeypatch.setattr(cli_core, "results", Console(file=out, width=20, force_terminal=True, soft_wrap=True,
                                                    no_color=True))
    cli_core.print_table("leakage", heads, rows, justify="right")
    assert out.getvalue().splitlines() == ["leakage", "email: in source 12, reproduced 3",
                                           "ip: in source 4, reproduced 0"]


def test_a_table_on_a_terminal_shows_its_title_and_cells_as_written(monkeypatch):
    """rich read the title and cells as markup and emoji codes on a terminal: a grid variant's `ft[lr=0.1]`
    lost its `[lr=0.1]` and a path's `:fire:` became an emoji."""
    import leakaudit.cli.core as cli_core

    out = io.StringIO()
    monkeypatch.setattr(cli_core, "results", Console(file=out, width=120, force_terminal=True, soft_wrap=True,
                                                    no_color=True))
    cli_core.print_table("MIA on runs/a:fire:b/ft[lr=0.1]", ("", "AUC"), [("ft[lr=0.1]", "[0.4, 0.6]")])
    text = out.getvalue()
    assert "runs/a:fire:b/ft[lr=0.1]" in text and "│ ft[lr=0.1] │ [0.4, 0.6] │" in text, text
