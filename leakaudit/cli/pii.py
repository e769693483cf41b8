"""CLI commands for this topic (filled in by its issue)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this topic's commands to the app."""
