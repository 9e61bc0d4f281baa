"""Alembic migrations run from code: upgrade a database to head, read its revision.

Concurrent starters are serialised (PostgreSQL advisory lock, SQLite writer lock).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Any constant: serialises `upgrade head` between processes that start at the same moment.
_PG_LOCK_ID = 0x756E6973  # "unis"


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    """The newest revision shipped with this code."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(conn: Connection) -> str | None:
    """The revision the database is at (None for an empty database)."""
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade to `revision`; returns (before, after). A no-op when already there."""
    with engine.connect() as conn:
        before = current_revision(conn)
        conn.rollback()
    if revision == "head" and before == head_revision():
        return before, before
    cfg = _config()
    with engine.begin() as conn:  # on SQLite this BEGIN IMMEDIATE already holds the writer lock
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_ID})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        after = current_revision(conn)
    return before, after
