"""`unisweep probe`: chi for one prompt pair on one model (placeholder until the engine lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add `probe` to the `unisweep` app."""
