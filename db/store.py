"""The result database's public face: Store (sweeps, units, leases, shards, status) and connect().

Store composes one class per job: sweeps.py, work_queue.py, status.py, integrity.py on
store_core.py; leases' statements in leasing.py; every transaction goes through session.session_scope.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from db.engine import make_engine
from db.integrity import IntegrityStore, ShardProblem, VerifyReport
from db.leasing import LeasedUnit
from db.migrate import current_revision, head_revision, upgrade
from db.session import DatabaseError
from db.shards import ShardInfo
from db.status import FailedUnit, StatusStore, SweepStatus
from db.sweeps import SWEEPS_ARROW, UNITS_ARROW, SweepInfo, UnitSpec
from db.urls import default_url, mask_url, normalize_url, resolve_url
from db.work_queue import QueueStore

__all__ = [
    "DatabaseError",
    "FailedUnit",
    "LeasedUnit",
    "ShardInfo",
    "SWEEPS_ARROW",
    "ShardProblem",
    "Store",
    "SweepInfo",
    "SweepStatus",
    "UNITS_ARROW",
    "UnitSpec",
    "VerifyReport",
    "connect",
    "default_url",
    "mask_url",
    "resolve_url",
]

logger = logging.getLogger("unisweep.db")


class Store(QueueStore, StatusStore, IntegrityStore):
    """One database (SQLite file or PostgreSQL schema) holding sweeps, units and workers."""


def connect(
    url: str | None = None,
    *,
    output_dir: str | os.PathLike[str] | None = None,
    upgrade_schema: bool = True,
    create: bool = True,
) -> Store:
    """Open the database: `url`, else env UNISWEEP_DB, else `<output_dir or runs/>/unisweep.db`.

    Upgrades the schema to head (upgrade_schema). create=False refuses to create a new SQLite
    file (for `status`, `verify`: a typo'd path should not make an empty database).
    Raises InvalidInput for a malformed URL and DatabaseError (URL masked) when unreachable.
    """
    raw = resolve_url(url, output_dir)
    parsed = normalize_url(raw)
    if not create and parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        raise DatabaseError(raw, f"no database file at {parsed.database} (pass --db URL or --out DIR)")
    engine = make_engine(parsed, create_dir=create)
    try:
        if upgrade_schema:
            before, after = revisions = upgrade(engine)
            if before != after:
                logger.info("database %s upgraded %s -> %s", mask_url(parsed), before, after)
        else:
            with engine.connect() as conn:
                rev = current_revision(conn)
            revisions = (rev, rev)
            if rev != head_revision():
                raise DatabaseError(
                    parsed, f"schema at revision {rev}, code expects {head_revision()}: run `unisweep db upgrade`"
                )
    except DBAPIError as exc:
        # Unreachable server, wrong role or database, missing schema, a file that is not a
        # database: all the user's environment, so one clear line instead of a traceback.
        engine.dispose()
        raise DatabaseError(raw, str(exc.orig or exc)) from exc
    except Exception:
        engine.dispose()
        raise
    hot = make_engine(parsed, pre_ping=False) if parsed.get_backend_name() == "postgresql" else None
    return Store(engine, revisions, hot)
