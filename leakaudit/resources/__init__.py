"""Data files shipped with leakaudit (see README.md here for sources and licenses)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent


def path(*parts: str) -> Path:
    """Absolute path of a shipped file, e.g. path("pii-enron-pil", "name2email.jsonl")."""
    p = ROOT.joinpath(*parts)
    if not p.exists():
        raise FileNotFoundError(f"shipped resource missing: {p}")
    return p
