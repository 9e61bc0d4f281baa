"""The work queue as Store methods: lease, heartbeat, complete, fail, release, reclaim, and
the questions the driver and workers ask of it (open work per group, a worker's leases).

Lease statements live in leasing.py; this class checks arguments, picks the sweep and runs each
statement on the hot path (one round trip, retried once on a dropped connection). Questions are
answered in SQL (GROUP BY, EXISTS) on the units indexes, never by reading the table.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import exists, func, select

from db import leasing
from db.leasing import CompleteOutcome, FailOutcome, LeasedUnit
from db.models import Unit, in_sweep, member_ids
from db.shards import ShardInfo
from db.sweeps import SweepStore
from tasks.errors import InvalidInput

OPEN_STATUSES = ("pending", "leased")  # work not finished yet (done and failed are final)
EXPIRED_CHECK_S = 0.5  # lease() looks for expired leases first at most this often (per Store)


class QueueStore(SweepStore):
    """Leases on a sweep's units and what workers report back."""

    def lease(
        self,
        worker_id: str,
        n: int,
        ttl_s: float,
        sweep_id: int | str,
        group: str | None = None,
        max_attempts: int | None = None,
    ) -> list[LeasedUnit]:
        """Lease up to n pending (or expired) units of a sweep, optionally only of one group."""
        leasing.check_lease_args(n, ttl_s)
        sid = self._sweep_id(sweep_id)
        # Expired leases are looked for first at most every EXPIRED_CHECK_S (they cannot
        # appear faster than a TTL), and whenever pending units run short: one statement per
        # call in the common case, and a dead worker's units still come back promptly.
        now = time.monotonic()
        expired_first = now >= self._next_expired_check
        if expired_first:
            self._next_expired_check = now + EXPIRED_CHECK_S
        return self._hot(
            lambda s: leasing.lease_units(s, worker_id, n, ttl_s, sid, group, max_attempts, expired_first)
        )

    def heartbeat(self, worker_id: str, keys: Sequence[str] | None, ttl_s: float) -> int:
        """Extend worker_id's leases (keys=None: all of them); returns how many it still holds."""
        leasing.check_ttl(ttl_s)
        return self._hot(lambda s: leasing.heartbeat(s, worker_id, keys, ttl_s))

    def complete(
        self, key: str, worker_id: str, shard: ShardInfo, compute_s: float = 0.0
    ) -> CompleteOutcome:
        """Mark a unit done with its shard: "done", or a no-op "already_done" | "not_leased" | "unknown"."""
        return self._hot(
            lambda s: leasing.complete(
                s, key, worker_id, path=shard.path, rows=shard.rows, nbytes=shard.bytes,
                sha256=shard.sha256, compute_s=float(compute_s),
            )
        )

    def fail(self, key: str, worker_id: str, error: str, max_attempts: int = 3,
             environment: bool = False) -> FailOutcome:
        """Record a failed attempt: "retry" (pending again) or "failed" once attempts reach max.

        environment=True (disk full, read-only, connection lost): pending again, attempt not used.
        """
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise InvalidInput("max_attempts", "an integer >= 1", max_attempts)
        return self._hot(lambda s: leasing.fail(s, key, worker_id, str(error)[:20_000], max_attempts,
                                                environment))

    def requeue(self, sweep: int | str, *, failed: bool = True, keys: Sequence[str] | None = None,
                done_keys: Sequence[str] = ()) -> int:
        """Failed units (all, or `keys`) and done units with a bad shard (`done_keys`) back to
        pending with attempts 0, for `unisweep retry`; returns how many."""
        sid = self._sweep_id(sweep)
        with self._session() as s:
            return leasing.requeue(s, sid, failed=failed, keys=keys, done_keys=done_keys)

    def release(self, worker_id: str) -> int:
        """Give back all leases of worker_id (Ctrl-C, clean stop); returns how many."""
        return self._hot(lambda s: leasing.release(s, worker_id))

    def reclaim_expired(self, sweep: int | str | None = None, max_attempts: int | None = None) -> tuple[int, int]:
        """Expired leases -> pending (or failed after max_attempts); returns (reset, failed)."""
        sid = None if sweep is None else self._sweep_id(sweep)
        with self._session() as s:
            return leasing.reclaim_expired(s, sid, max_attempts)

    # ---- questions ----------------------------------------------------------------------

    def open_by_group(self, sweep: int | str) -> dict[str | None, dict[str, int]]:
        """group -> {"units": open units, "cells": their cells}, for pending and leased units."""
        sid = self._sweep_id(sweep)
        stmt = (select(Unit.group, func.count(), func.coalesce(func.sum(Unit.n_cells), 0))
                .where(in_sweep(sid), Unit.status.in_(OPEN_STATUSES))
                .group_by(Unit.group))
        with self._session() as s:
            rows = s.execute(stmt).all()
        return {g: {"units": int(n), "cells": int(c)} for g, n, c in rows}

    def group_finished(self, sweep: int | str, group: str | None) -> bool:
        """True when no unit of the group is pending or leased (all done or failed).

        Asked by every idle worker twice a second: one EXISTS on the (sweep, group, status) index.
        """
        sid = self._sweep_id(sweep)
        cond = Unit.group.is_(None) if group is None else Unit.group == group
        own = select(exists().where(Unit.sweep_id == sid, cond, Unit.status.in_(OPEN_STATUSES)))
        # Units shared from another sweep (same cells) count too; asked only when none of
        # the sweep's own is open, so the common case stays one index lookup.
        shared = select(exists().where(Unit.id.in_(member_ids(sid)), cond,
                                       Unit.status.in_(OPEN_STATUSES)))
        return not self._hot(lambda s: bool(s.execute(own).scalar()) or bool(s.execute(shared).scalar()))

    def leased_by(self, worker_id: str, sweep: int | str | None = None) -> list[str]:
        """Keys of the units worker_id holds a lease on (live or expired), in plan order."""
        stmt = select(Unit.key).where(Unit.lease_owner == worker_id, Unit.status == "leased")
        if sweep is not None:
            stmt = stmt.where(in_sweep(self._sweep_id(sweep)))
        with self._session() as s:
            return list(s.execute(stmt.order_by(Unit.id)).scalars())

    def unit_params(self, sweep: int | str) -> list[dict[str, Any]]:
        """The params of every unit of a sweep, in plan order (the planner subtracts their cells)."""
        sid = self._sweep_id(sweep)
        with self._session() as s:
            return list(s.execute(select(Unit.params).where(in_sweep(sid)).order_by(Unit.id)).scalars())
