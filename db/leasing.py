"""Leases on work units: lease atomically, heartbeat, complete or fail as the holder, reclaim.

Each operation is one statement (prebuilt, Core) on a session from session_scope; the
database's row locks (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: the writer lock) make it atomic.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cache
from typing import Any, Literal

from sqlalchemy import and_, bindparam, case, literal, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable

from db.models import SweepMember, Unit, in_sweep
from tasks.errors import InvalidInput

logger = logging.getLogger("unisweep.db")

CompleteOutcome = Literal["done", "already_done", "not_leased", "unknown"]
FailOutcome = Literal["retry", "failed", "already_done", "not_leased", "unknown"]

units = Unit.__table__
c = units.c


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


# Statements are built once per shape: building one costs more Python time than running it.
@cache
def _lease_stmt(postgres: bool, by_group: bool, capped: bool, expired: bool) -> Executable:
    # Two shapes, each served in plan order straight from an index (no sort of all pending
    # rows): units whose holder stopped heartbeating (reclaimed first: they were in flight),
    # then pending units.
    if expired:
        cond = [c.sweep_id == bindparam("p_sweep"), c.status == "leased", c.lease_expires < bindparam("p_now")]
    else:
        cond = [c.sweep_id == bindparam("p_sweep"), c.status == "pending"]
    return _leasing_update(_candidates(cond, postgres, by_group, capped))


def _candidates(cond: list[Any], postgres: bool, by_group: bool, capped: bool) -> Any:
    """Ids of the units matching `cond` (and the group / attempts cap), first n in plan order."""
    if by_group:
        cond = [*cond, c.group == bindparam("p_group")]
    if capped:
        cond = [*cond, c.attempts < bindparam("p_max")]
    candidates = select(c.id).where(*cond).order_by(c.id).limit(bindparam("p_n"))
    if postgres:
        # Concurrent leasers skip each other's rows instead of queueing on them.
        candidates = candidates.with_for_update(skip_locked=True)
    return candidates


def _leasing_update(candidates: Any) -> Executable:
    return (
        update(units)
        .where(c.id.in_(candidates.scalar_subquery()))
        .values(
            status="leased",
            lease_owner=bindparam("p_worker"),
            lease_expires=bindparam("p_expires"),
            heartbeat_at=bindparam("p_now"),
            started_at=bindparam("p_now"),
            attempts=c.attempts + 1,
        )
        .returning(c.id, c.key, c.group, c.params, c.attempts, c.n_cells)
    )


@cache
def _lease_shared_stmt(postgres: bool, by_group: bool, capped: bool) -> Executable:
    members = SweepMember.__table__.c
    shared = select(members.unit_id).where(members.sweep_id == bindparam("p_sweep"))
    open_ = or_(c.status == "pending",
                and_(c.status == "leased", c.lease_expires < bindparam("p_now")))
    cond = [c.id.in_(shared.scalar_subquery()), open_]
    return _leasing_update(_candidates(cond, postgres, by_group, capped))


def lease_units(
    session: Session,
    worker_id: str,
    n: int,
    ttl_s: float,
    sweep_id: int,
    group: str | None = None,
    max_attempts: int | None = None,
    expired_first: bool = True,
) -> list[LeasedUnit]:
    """Lease up to n units of a sweep (and group) for worker_id, from expired leases and pending.

    expired_first looks for expired leases before pending units (they were in flight);
    otherwise only when pending units run short: one statement in the common case. Each
    statement is atomic, and a killed worker's units come back after its TTL.
    """
    conn = session.connection()
    now = utcnow()
    shape = (conn.dialect.name == "postgresql", group is not None, max_attempts is not None)
    params = {
        "p_sweep": sweep_id, "p_now": now, "p_n": n, "p_worker": worker_id,
        "p_expires": now + timedelta(seconds=ttl_s), "p_group": group, "p_max": max_attempts,
    }
    rows = conn.execute(_lease_stmt(*shape, expired=expired_first), params).all()
    if len(rows) < n:
        params["p_n"] = n - len(rows)
        rows += conn.execute(_lease_stmt(*shape, expired=not expired_first), params).all()
    if len(rows) < n:
        # Units this sweep shares with the sweep that planned them (same cells), only once
        # its own are gone: the common case keeps its two index-ordered statements.
        params["p_n"] = n - len(rows)
        rows += conn.execute(_lease_shared_stmt(*shape), params).all()
    return [LeasedUnit(r.key, r.group, r.params, r.attempts, r.n_cells) for r in sorted(rows)]


def heartbeat(session: Session, worker_id: str, keys: Sequence[str] | None, ttl_s: float) -> int:
    """Extend worker_id's leases (all of them, or those in keys) to now + ttl_s; returns how many.

    Fewer than asked means a lease was lost (expired and taken over): drop that unit.
    """
    now = utcnow()
    cond = [c.lease_owner == worker_id, c.status == "leased"]
    if keys is not None:
        if not keys:
            return 0
        cond.append(c.key.in_(list(keys)))
    stmt = update(units).where(*cond).values(lease_expires=now + timedelta(seconds=ttl_s), heartbeat_at=now)
    return session.connection().execute(stmt).rowcount or 0


def _why_not(session: Session, key: str) -> Literal["already_done", "not_leased", "unknown"]:
    status = session.connection().execute(select(c.status).where(c.key == key)).scalar()
    if status is None:
        return "unknown"
    return "already_done" if status == "done" else "not_leased"


_COMPLETE = (
    update(units)
    .where(c.key == bindparam("p_key"), c.status == "leased", c.lease_owner == bindparam("p_worker"))
    .values(
        status="done",
        finished_at=bindparam("p_now"),
        lease_expires=None,
        result_path=bindparam("p_path"),
        result_rows=bindparam("p_rows"),
        result_bytes=bindparam("p_bytes"),
        result_sha256=bindparam("p_sha"),
        compute_s=bindparam("p_compute"),
        error=None,
    )
)


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
    params = {
        "p_key": key, "p_worker": worker_id, "p_now": utcnow(), "p_path": path, "p_rows": rows,
        "p_bytes": nbytes, "p_sha": sha256, "p_compute": compute_s,
    }
    if session.connection().execute(_COMPLETE, params).rowcount == 1:
        return "done"
    outcome = _why_not(session, key)
    logger.info("complete %s by %s: no-op (%s)", key, worker_id, outcome)
    return outcome


_FAIL = (
    update(units)
    .where(c.key == bindparam("p_key"), c.status == "leased", c.lease_owner == bindparam("p_worker"))
    .values(
        status=case((c.attempts >= bindparam("p_max"), "failed"), else_="pending"),
        error=bindparam("p_error"),
        lease_owner=None,
        lease_expires=None,
        finished_at=bindparam("p_now"),
    )
    .returning(c.status)
)


# The machine failed, not the unit (full or read-only disk, lost connection): pending again
# with its attempt given back, like a release; the error stays visible in `status`.
_FAIL_ENVIRONMENT = (
    update(units)
    .where(c.key == bindparam("p_key"), c.status == "leased", c.lease_owner == bindparam("p_worker"))
    .values(
        status="pending",
        error=bindparam("p_error"),
        lease_owner=None,
        lease_expires=None,
        attempts=case((c.attempts > 0, c.attempts - 1), else_=0),
    )
    .returning(c.status)
)


def fail(session: Session, key: str, worker_id: str, error: str, max_attempts: int,
         environment: bool = False) -> FailOutcome:
    """Record a failed attempt: back to pending for a retry, or failed once attempts reach max.

    environment=True (ENOSPC, EACCES, a lost connection): pending again without using an
    attempt; the worker, not the unit, has to wait for the machine to be fixed.
    """
    params = {"p_key": key, "p_worker": worker_id, "p_max": max_attempts,
              "p_error": f"[{worker_id}] {'[environment] ' if environment else ''}{error}",
              "p_now": utcnow()}
    stmt = _FAIL_ENVIRONMENT if environment else _FAIL
    status = session.connection().execute(stmt, params).scalar()
    if status is not None:
        return "failed" if status == "failed" else "retry"
    outcome = _why_not(session, key)
    logger.info("fail %s by %s: no-op (%s)", key, worker_id, outcome)
    return outcome


def release(session: Session, worker_id: str) -> int:
    """Give back every lease of worker_id (clean shutdown): pending again, attempt not counted."""
    stmt = (
        update(units)
        .where(c.lease_owner == worker_id, c.status == "leased")
        .values(
            status="pending",
            lease_owner=None,
            lease_expires=None,
            attempts=case((c.attempts > 0, c.attempts - 1), else_=0),
        )
    )
    return session.connection().execute(stmt).rowcount or 0


def reclaim_expired(
    session: Session, sweep_id: int | None = None, max_attempts: int | None = None
) -> tuple[int, int]:
    """Expired leases back to pending; those that already used max_attempts become failed.

    Returns (reset, failed). lease_units takes expired units anyway; this keeps counts honest
    and stops a unit that kills its worker every time from being retried forever.
    """
    conn = session.connection()
    now = utcnow()
    base = [c.status == "leased", c.lease_expires < now]
    if sweep_id is not None:
        base.append(in_sweep(sweep_id))
    n_failed = 0
    if max_attempts is not None:
        msg = literal("lease expired on every attempt (worker lost each time); last holder ")
        n_failed = conn.execute(
            update(units)
            .where(*base, c.attempts >= max_attempts)
            .values(status="failed", error=msg + c.lease_owner, lease_expires=None, finished_at=now)
        ).rowcount or 0
    n_reset = conn.execute(
        update(units).where(*base).values(status="pending", lease_owner=None, lease_expires=None)
    ).rowcount or 0
    return n_reset, n_failed


def requeue(session: Session, sweep_id: int, *, failed: bool, keys: Sequence[str] | None = None,
            done_keys: Sequence[str] = ()) -> int:
    """Give units of a sweep a fresh start (pending, attempts 0): its failed units (all, or
    those in `keys`), and the done units in `done_keys` (their shard was lost or changed).

    Leased units are never touched: a live worker holds them. Returns how many changed.
    """
    conn = session.connection()
    fresh = {"status": "pending", "attempts": 0, "lease_owner": None, "lease_expires": None,
             "started_at": None, "finished_at": None}
    n = 0
    if failed or keys:
        cond = [in_sweep(sweep_id), c.status == "failed"]
        if keys is not None:
            cond.append(c.key.in_(list(keys)))
        n += conn.execute(update(units).where(*cond).values(**fresh)).rowcount or 0
    if done_keys:
        n += conn.execute(
            update(units)
            .where(in_sweep(sweep_id), c.status == "done", c.key.in_(list(done_keys)))
            .values(**fresh, error="shard missing or changed: recomputed", result_path=None,
                    result_rows=None, result_bytes=None, result_sha256=None, compute_s=None)
        ).rowcount or 0
    return n
