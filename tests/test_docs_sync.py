"""The reference docs list what the code accepts: every evaluation kind and each of its options in
docs/experiments.md, every attack in docs/attacks.md's definitions table (a new option or attack without its
line there fails here, instead of drifting)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import leakaudit.attacks  # noqa: F401  (fills the attack registry)
import leakaudit.kinds  # noqa: F401  (fills the kind registry)
from leakaudit.attacks.base import ATTACKS
from leakaudit.kinds.registry import get_kind, kind_names

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _table_row(text: str, first_cell: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    assert rows, f"no table row starting with {first_cell}"
    return rows[0]


@pytest.mark.parametrize("name", kind_names("evaluate"))
def test_every_evaluation_kind_and_option_is_in_the_experiments_doc(name):
    text = (DOCS / "experiments.md").read_text()
    kinds_row = _table_row(text, "`evaluate`")
    assert f"`{name}`" in kinds_row
    options_row = _table_row(text, f"`{name}`")
    documented = set(re.findall(r"`([a-z_]+)`", options_row))
    missing = sorted(set(get_kind(name).Options.model_fields) - documented)
    assert not missing, f"docs/experiments.md's `{name}` row does not name {missing}"


def test_every_attack_has_a_definition_row():
    text = (DOCS / "attacks.md").read_text()
    for name in ATTACKS:
        _table_row(text, f"`{name}`")
