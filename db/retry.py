"""Riding out database outages: which errors are a lost connection, and a Store that retries them.

The driver and the workers talk to the database through `Resilient(store)`: a call that fails
because the server went away (restart, network cut, full disk under SQLite) is retried with
backoff for up to `budget_s`; any other error is raised at once. Past the budget the call
raises DatabaseUnavailable, one line for the user; leases are left to expire.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable
from typing import Any

import tenacity
from sqlalchemy.exc import DBAPIError

from db.session import DatabaseError

logger = logging.getLogger("unisweep.db")

ENV_BUDGET = "UNISWEEP_DB_OUTAGE_S"  # seconds of outage to ride out (tests shorten it)
DEFAULT_BUDGET_S = 120.0

# SQLite errors that are the machine's state, not the statement's: worth waiting for.
_SQLITE_TRANSIENT = ("database is locked", "disk i/o error", "database or disk is full",
                     "unable to open database file", "attempt to write a readonly database")


class DatabaseUnavailable(DatabaseError):
    """The database stayed unreachable for the whole retry budget."""


def budget_s() -> float:
    """The outage budget: env UNISWEEP_DB_OUTAGE_S, else DEFAULT_BUDGET_S (>= 60 s by design)."""
    try:
        return float(os.environ.get(ENV_BUDGET, DEFAULT_BUDGET_S))
    except ValueError:
        return DEFAULT_BUDGET_S


def is_transient(exc: BaseException) -> bool:
    """True for a lost or refused connection (or SQLite's full/locked/unreadable file).

    A wrong statement, a missing table or a constraint violation is not: retrying it would
    only delay the same error.
    """
    cause = exc.__cause__ if isinstance(exc, DatabaseError) else exc
    if isinstance(cause, DBAPIError):
        if cause.connection_invalidated:
            return True
        orig = cause.orig
    else:
        orig = cause
    try:
        import psycopg

        if isinstance(orig, psycopg.OperationalError):
            # Refused, reset, server shutting down or starting up, admin shutdown, timeout.
            return True
        if isinstance(orig, psycopg.InterfaceError):
            return True  # the connection object is closed
    except ImportError:  # pragma: no cover - psycopg is a dependency
        pass
    if isinstance(orig, sqlite3.OperationalError):
        return any(s in str(orig).lower() for s in _SQLITE_TRANSIENT)
    return isinstance(orig, (ConnectionError, TimeoutError))


class Resilient:
    """A Store whose every method call is retried on transient database errors.

    Each Store method is one or more self-contained transactions, so running it again after
    a lost connection is safe: reads repeat, and the writes are idempotent (a lease whose
    commit was lost expires; a repeated complete answers already_done; a repeated fail finds
    the unit no longer leased by this worker and changes nothing).
    """

    def __init__(self, store: Any, budget: float | None = None,
                 sleep: Callable[[float], None] | None = None) -> None:
        self._store = store
        self._budget = budget_s() if budget is None else budget
        self._sleep = sleep

    @property
    def inner(self) -> Any:
        return self._store

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.run(attr, *args, **kwargs)

        return call

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs), retried with backoff while the database is unreachable."""
        extra = {} if self._sleep is None else {"sleep": self._sleep}
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            wait=tenacity.wait_exponential(multiplier=0.25, max=5.0),
            stop=tenacity.stop_after_delay(self._budget),
            before_sleep=_log_retry,
            reraise=False,
            **extra,
        )
        try:
            return retrying(fn, *args, **kwargs)
        except tenacity.RetryError as exc:
            last = exc.last_attempt.exception()
            url = getattr(last, "url", None) or getattr(self._store, "url", None)
            reason = str(last).split(": ", 1)[-1] if isinstance(last, DatabaseError) else str(last)
            raise DatabaseUnavailable(
                url, f"unreachable for {self._budget:.0f} s ({reason}); leases held now "
                "expire on their own: run `unisweep resume` once it is back") from None


def _log_retry(state: tenacity.RetryCallState) -> None:
    # One line when an outage starts (what the user sees), the rest for debugging only.
    exc = state.outcome.exception() if state.outcome else None
    level = logging.WARNING if state.attempt_number == 1 else logging.DEBUG
    logger.log(level, "database unreachable, retrying (attempt %d, %.0f s so far): %s",
               state.attempt_number, state.seconds_since_start or 0.0,
               str(exc).splitlines()[0] if exc else "")


def connect_resilient(url: str | None, **kwargs: Any) -> Resilient:
    """db.store.connect, retried through an outage, returning a Resilient store."""
    from db.store import connect

    probe = Resilient(None)
    return Resilient(probe.run(connect, url, **kwargs))
