"""The Store's core: one database's engines, sessions and the one-statement retry path.

The Store's jobs live in classes stacked on this one: sweeps.py (sweeps, units, workers),
work_queue.py (leases and the queue's questions), status.py (progress), integrity.py (verify,
orphans, gc); db/store.py composes them into Store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from db.session import DatabaseError, session_scope
from db.urls import mask_url

logger = logging.getLogger("unisweep.db")
T = TypeVar("T")


class StoreCore:
    """One database (SQLite file or PostgreSQL schema): engines, sessions, the hot path."""

    def __init__(
        self,
        engine: Engine,
        revisions: tuple[str | None, str | None] = (None, None),
        hot_engine: Engine | None = None,
    ) -> None:
        self.engine = engine
        # Schema revision before and after connect() (equal when nothing had to be migrated).
        self.revisions = revisions
        self._factory = sessionmaker(bind=engine, expire_on_commit=False)
        # Leases and completions are single statements, atomic on their own: on PostgreSQL they
        # run in autocommit on a pool without pre-ping, one round trip each instead of four
        # (ping, BEGIN, statement, COMMIT); a dropped connection is retried once (_hot).
        # SQLite keeps BEGIN IMMEDIATE, which costs no round trip.
        self._hot_engine = hot_engine or engine
        if self.dialect == "postgresql":
            hot = self._hot_engine.execution_options(isolation_level="AUTOCOMMIT")
        else:
            hot = self._hot_engine
        self._fast_factory = sessionmaker(bind=hot, expire_on_commit=False)
        self._sweep_ids: dict[str, int] = {}
        self._next_expired_check = 0.0  # time.monotonic() after which lease() looks for expired first

    @property
    def url(self) -> str:
        """The database URL with its password masked."""
        return mask_url(self.engine.url)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()
        self._hot_engine.dispose()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _session(self, *, ignore_integrity: bool = False) -> Any:
        return session_scope(self._factory, ignore_integrity=ignore_integrity)

    def _hot(self, fn: Callable[[Session], T]) -> T:
        """Run one self-contained statement; retry once if the pooled connection had died.

        Safe to repeat: a retried lease whose first try committed leaves units that expire
        after the TTL; a retried completion whose first try committed answers already_done.
        """
        for attempt in (1, 2):
            try:
                with session_scope(self._fast_factory) as s:
                    return fn(s)
            except DatabaseError as exc:
                if attempt == 1 and getattr(exc.__cause__, "connection_invalidated", False):
                    logger.info("database connection lost, retrying once: %s", exc)
                    continue
                raise
        raise AssertionError("unreachable")
