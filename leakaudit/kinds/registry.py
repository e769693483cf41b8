"""The registry of evaluation and generation kinds (filled by the kind modules on import).

`get_kind(name)` finds one (an unknown name lists the valid ones and suggests the closest);
`kind_names(section)` lists them. Import `leakaudit.kinds` (not this module) to get the
registry filled with the built-in kinds. See leakaudit/kinds/base.py for the contract and docs/architecture.md for the flow.
"""

from __future__ import annotations

import difflib

from leakaudit.kinds.base import Kind, Section

_REGISTRY: dict[str, type[Kind]] = {}


def register(cls: type[Kind]) -> type[Kind]:
    """Class decorator: add a kind to the registry under its `name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two kinds are named '{cls.name}'")
    _REGISTRY[cls.name] = cls
    return cls


def kind_names(section: Section | None = None) -> list[str]:
    """Registered kind names (of one section: 'evaluate' or 'generate'), in registration order."""
    return [n for n, k in _REGISTRY.items() if section is None or k.section == section]


def unknown_kind_message(name: str, section: Section | None = None) -> str:
    """'unknown kind 'mai'; did you mean 'mia'? valid: ...' (shared by every front end)."""
    valid = kind_names(section)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ";"
    return f"unknown kind '{name}'{hint} valid: {', '.join(valid)}"


def get_kind(name: str, section: Section | None = None) -> Kind:
    """An instance of the registered kind (ValueError with the valid names when unknown)."""
    cls = _REGISTRY.get(name)
    if cls is None or (section is not None and cls.section != section):
        raise ValueError(unknown_kind_message(name, section))
    return cls()


