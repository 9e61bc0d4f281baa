"""CLI commands of this package (placeholder until the package's issue lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this package's commands to the `unisweep` app."""
