"""Leases on work units: lease atomically, heartbeat, complete or fail as the holder, reclaim.

Every function is one short statement on a session from session_scope; the database's row
locks (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: the writer lock) make them atomic.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from sqlalchemy import and_, case, or_, select, update
from sqlalchemy.orm import Session

from db.models import Unit
from tasks.errors import InvalidInput

logger = logging.getLogger("unisweep.db")

CompleteOutcome = Literal["done", "already_done", "not_leased", "unknown"]
FailOutcome = Literal["retry", "failed", "already_done", "not_leased", "unknown"]


@dataclass(frozen=True)
class LeasedUnit:
    """A unit handed to a worker: what to compute and how often it was tried (this one included)."""

    key: str
    group: str | None
    params: dict[str, Any]
    attempts: int
    n_cells: int


def utcnow() -> datetime:
    """Naive UTC, the convention of every timestamp column (hosts must keep clocks in sync)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def check_lease_args(n: int, ttl_s: float) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidInput("n", "an integer >= 1 (units per lease call)", n)
    check_ttl(ttl_s)


def check_ttl(ttl_s: float) -> None:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not ttl_s > 0:
        raise InvalidInput("ttl_s", "a number of seconds > 0", ttl_s)


def _leasable(now: datetime) -> Any:
    # Pending, or leased by a holder that stopped heartbeating: an expired lease is reclaimed
    # by the next lease call, so a killed worker loses at most its units in flight.
    return or_(Unit.status == "pending", and_(Unit.status == "leased", Unit.lease_expires < now))


def lease_units(
    session: Session,
    worker_id: str,
    n: int,
    ttl_s: float,
    sweep_id: int,
    group: str | None = None,
    max_attempts: int | None = None,
) -> list[LeasedUnit]:
    """Lease up to n units of a sweep (and group) for worker_id, in plan order, atomically."""
    now = utcnow()
    cond = [Unit.sweep_id == sweep_id, _leasable(now)]
    if group is not None:
        cond.append(Unit.group == group)
    if max_attempts is not None:
        cond.append(Unit.attempts < max_attempts)
    candidates = select(Unit.id).where(*cond).order_by(Unit.id).limit(n)
    if session.get_bind().dialect.name == "postgresql":
        # Concurrent leasers skip each other's rows instead of queueing on them.
        candidates = candidates.with_for_update(skip_locked=True)
    stmt = (
        update(Unit)
        .where(Unit.id.in_(candidates.scalar_subquery()))
        .values(
            status="leased",
            lease_owner=worker_id,
            lease_expires=now + timedelta(seconds=ttl_s),
            heartbeat_at=now,
            started_at=now,
            attempts=Unit.attempts + 1,
        )
        .returning(Unit.id, Unit.key, Unit.group, Unit.params, Unit.attempts, Unit.n_cells)
        .execution_options(synchronize_session=False)
    )
    rows = sorted(session.execute(stmt).all())
    return [LeasedUnit(r.key, r.group, r.params, r.attempts, r.n_cells) for r in rows]


def heartbeat(session: Session, worker_id: str, keys: Sequence[str] | None, ttl_s: float) -> int:
    """Extend worker_id's leases (all of them, or those in keys) to now + ttl_s; returns how many.

    Fewer than asked means a lease was lost (expired and taken over): drop that unit.
    """
    now = utcnow()
    cond = [Unit.lease_owner == worker_id, Unit.status == "leased"]
    if keys is not None:
        if not keys:
            return 0
        cond.append(Unit.key.in_(list(keys)))
    stmt = (
        update(Unit)
        .where(*cond)
        .values(lease_expires=now + timedelta(seconds=ttl_s), heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).rowcount or 0


def _why_not(session: Session, key: str, worker_id: str) -> Literal["already_done", "not_leased", "unknown"]:
    row = session.execute(select(Unit.status, Unit.lease_owner).where(Unit.key == key)).first()
    if row is None:
        return "unknown"
    if row.status == "done":
        return "already_done"
    return "not_leased"


def complete(
    session: Session,
    key: str,
    worker_id: str,
    *,
    path: str,
    rows: int,
    nbytes: int,
    sha256: str,
    compute_s: float,
) -> CompleteOutcome:
    """Mark key done with its shard, in one statement, only if worker_id holds the lease.

    A lease that expired but was not taken over still counts (the holder finished late).
    A second completion, or one without the lease, changes nothing and says why.
    """
    stmt = (
        update(Unit)
        .where(Unit.key == key, Unit.status == "leased", Unit.lease_owner == worker_id)
        .values(
            status="done",
            finished_at=utcnow(),
            lease_expires=None,
            result_path=path,
            result_rows=rows,
            result_bytes=nbytes,
            result_sha256=sha256,
            compute_s=compute_s,
            error=None,
        )
        .execution_options(synchronize_session=False)
    )
    if session.execute(stmt).rowcount == 1:
        return "done"
    outcome = _why_not(session, key, worker_id)
    logger.info("complete %s by %s: no-op (%s)", key, worker_id, outcome)
    return outcome


def fail(
    session: Session, key: str, worker_id: str, error: str, max_attempts: int
) -> FailOutcome:
    """Record a failed attempt: back to pending for a retry, or failed once attempts reach max."""
    final = Unit.attempts >= max_attempts
    stmt = (
        update(Unit)
        .where(Unit.key == key, Unit.status == "leased", Unit.lease_owner == worker_id)
        .values(
            status=case((final, "failed"), else_="pending"),
            error=f"[{worker_id}] {error}",
            lease_owner=None,
            lease_expires=None,
            finished_at=utcnow(),
        )
        .returning(Unit.status)
        .execution_options(synchronize_session=False)
    )
    row = session.execute(stmt).first()
    if row is not None:
        return "failed" if row.status == "failed" else "retry"
    outcome = _why_not(session, key, worker_id)
    logger.info("fail %s by %s: no-op (%s)", key, worker_id, outcome)
    return outcome


def release(session: Session, worker_id: str) -> int:
    """Give back every lease of worker_id (clean shutdown): pending again, attempt not counted."""
    stmt = (
        update(Unit)
        .where(Unit.lease_owner == worker_id, Unit.status == "leased")
        .values(
            status="pending",
            lease_owner=None,
            lease_expires=None,
            attempts=case((Unit.attempts > 0, Unit.attempts - 1), else_=0),
        )
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).rowcount or 0


def reclaim_expired(
    session: Session, sweep_id: int | None = None, max_attempts: int | None = None
) -> tuple[int, int]:
    """Expired leases back to pending; those that already used max_attempts become failed.

    Returns (reset, failed). lease_units takes expired units anyway; this keeps counts honest
    and stops a unit that kills its worker every time from being retried forever.
    """
    now = utcnow()
    base = [Unit.status == "leased", Unit.lease_expires < now]
    if sweep_id is not None:
        base.append(Unit.sweep_id == sweep_id)
    n_failed = 0
    if max_attempts is not None:
        n_failed = (
            session.execute(
                update(Unit)
                .where(*base, Unit.attempts >= max_attempts)
                .values(
                    status="failed",
                    error="lease expired on every attempt (worker lost each time); last holder "
                    + Unit.lease_owner,
                    lease_expires=None,
                    finished_at=now,
                )
                .execution_options(synchronize_session=False)
            ).rowcount
            or 0
        )
    n_reset = (
        session.execute(
            update(Unit)
            .where(*base)
            .values(status="pending", lease_owner=None, lease_expires=None)
            .execution_options(synchronize_session=False)
        ).rowcount
        or 0
    )
    return n_reset, n_failed
