"""The one session helper: every read and write of the database goes through session_scope.

It commits or rolls back, turns a unique-key race into a logged no-op, and reports a lost
database as a DatabaseError naming the (masked) URL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.urls import mask_url, scrub
from tasks.errors import UnisweepError

logger = logging.getLogger("unisweep.db")


class DatabaseError(UnisweepError):
    """The database cannot be reached, opened or used (bad server, locked file, wrong schema)."""

    def __init__(self, url: str | URL | None, reason: str) -> None:
        self.url = mask_url(url)
        first = scrub(str(reason), url).strip().splitlines()
        super().__init__(f"database {self.url}: {first[0] if first else 'unknown error'}")


@contextmanager
def session_scope(factory: sessionmaker[Session], *, ignore_integrity: bool = False) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error.

    With ignore_integrity, a unique-key violation (another process inserted the same row
    first) is logged and swallowed: the caller's work was already done by someone else.
    """
    session = factory()
    try:
        yield session
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        if not ignore_integrity:
            raise
        logger.info("ignored a unique-key race (another process won): %s", str(exc.orig).splitlines()[0])
    except (OperationalError, InterfaceError) as exc:
        _quiet_rollback(session)
        bind = session.get_bind()
        raise DatabaseError(bind.engine.url, str(exc.orig or exc)) from exc
    except BaseException:
        _quiet_rollback(session)
        raise
    finally:
        session.close()


def _quiet_rollback(session: Session) -> None:
    # The connection may be gone (server down, process interrupted): the original error matters.
    try:
        session.rollback()
    except Exception:  # noqa: BLE001
        logger.debug("rollback failed after an error", exc_info=True)
