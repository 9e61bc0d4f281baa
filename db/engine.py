"""Engines for the two backends: SQLite (WAL, busy timeout, writer lock up front) and PostgreSQL.

Connection failures become DatabaseError with the URL's password masked, never a traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine

from db.urls import mask_url, normalize_url
from tasks.errors import InvalidInput

logger = logging.getLogger("unisweep.db")

SQLITE_BUSY_MS = 60_000
PG_CONNECT_TIMEOUT_S = 5


def make_engine(url: str | URL, *, create_dir: bool = True, pre_ping: bool = True) -> Engine:
    """An engine for `url` (checked by normalize_url); nothing is connected yet.

    pre_ping (PostgreSQL): test each pooled connection before use, so a worker that lives for
    days survives a server restart; costs one round trip per checkout.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, create_dir=create_dir)
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    return create_engine(parsed, connect_args=connect_args, pool_pre_ping=pre_ping, pool_size=2)


def _sqlite_engine(url: URL, *, create_dir: bool) -> Engine:
    path = Path(url.database or "")
    if create_dir:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file where the folder should be, no permission, ...
            raise InvalidInput("db", "a SQLite file in a folder that exists or can be created",
                               mask_url(url), detail=f"{path.parent}: {exc.strerror}") from None
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (below) instead of pysqlite's implicit deferred BEGIN.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
        # NORMAL under WAL survives any process crash; only power loss can undo the last
        # commits, which at worst leaves an orphan shard and re-runs its unit.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Take the writer lock at BEGIN: a deferred transaction that later writes can fail
        # with SQLITE_BUSY without waiting; IMMEDIATE waits in the busy handler instead.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
