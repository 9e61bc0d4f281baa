"""Errors a user can cause, with messages that name the field and what is allowed.

Every package raises these for bad input; the CLI prints them without a traceback.
"""

from __future__ import annotations

from typing import Any


class UnisweepError(Exception):
    """Base of every error the user can cause (bad input, unreachable database, ...)."""


class InvalidInput(UnisweepError, ValueError):
    """A named argument or spec field has a value outside what is allowed."""

    def __init__(self, field: str, allowed: str, got: Any = None, *, detail: str = "") -> None:
        self.field = field
        self.allowed = allowed
        self.got = got
        msg = f"invalid {field}: got {got!r}; allowed: {allowed}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)
