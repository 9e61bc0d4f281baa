"""Progress of a sweep: unit counts by status, cells done, cells/s, ETA and what failed.

Aggregates only (GROUP BY, MIN/MAX): cheap on a sweep of any size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import func, select

from db.leasing import utcnow
from db.models import Unit, in_sweep
from db.sweeps import SweepStore

RATE_WINDOW_S = 300.0  # cells/s is measured over the units finished in the last 5 minutes


@dataclass(frozen=True)
class FailedUnit:
    key: str
    attempts: int
    error: str | None


@dataclass(frozen=True)
class SweepStatus:
    """Progress of a sweep: unit counts by status, cells, throughput and what failed."""

    sweep: str
    counts: dict[str, int]  # pending / leased / done / failed (all four keys present)
    units_total: int
    cells_total: int
    cells_done: int
    cells_per_s: float | None  # None until some unit is done
    eta_s: float | None  # None when no rate is known; 0.0 when nothing is left
    compute_s: float  # summed compute time of done units
    expired_leases: int  # leased units whose holder stopped heartbeating
    failed: list[FailedUnit] = field(default_factory=list)



class StatusStore(SweepStore):
    """The status() read-out of a sweep."""

    def cells_done_by(self, sweep: int | str, worker_ids: Sequence[str]) -> int:
        """Cells of the sweep's done units that these workers completed (one driver's share)."""
        sid = self._sweep_id(sweep)
        if not worker_ids:
            return 0
        with self._session() as s:
            return int(s.execute(
                select(func.coalesce(func.sum(Unit.n_cells), 0))
                .where(in_sweep(sid), Unit.status == "done", Unit.lease_owner.in_(list(worker_ids)))
            ).scalar_one())

    def status(self, sweep: int | str, window_s: float = RATE_WINDOW_S) -> SweepStatus:
        """Counts by status, cells done, cells/s, ETA, failures. cells/s: the cells of the units
        finished in the last `window_s` over their compute window (first start to last
        finish), else over all done units."""
        info = self.get_sweep(sweep)
        now = utcnow()
        with self._session() as s:
            by_status = s.execute(
                select(Unit.status, func.count(), func.coalesce(func.sum(Unit.n_cells), 0),
                       func.coalesce(func.sum(Unit.compute_s), 0.0))
                .where(in_sweep(info.id))
                .group_by(Unit.status)
            ).all()
            expired = s.execute(
                select(func.count()).where(
                    in_sweep(info.id), Unit.status == "leased", Unit.lease_expires < now
                )
            ).scalar_one()
            since = now - timedelta(seconds=window_s)
            recent = s.execute(
                select(func.coalesce(func.sum(Unit.n_cells), 0), func.min(Unit.started_at),
                       func.max(Unit.finished_at))
                .where(in_sweep(info.id), Unit.status == "done", Unit.finished_at >= since)
            ).one()
            overall = s.execute(
                select(func.min(Unit.started_at), func.max(Unit.finished_at))
                .where(in_sweep(info.id), Unit.status == "done")
            ).one()
            failed = s.execute(
                select(Unit.key, Unit.attempts, Unit.error)
                .where(in_sweep(info.id), Unit.status == "failed")
                .order_by(Unit.id)
            ).all()
        counts = {k: 0 for k in ("pending", "leased", "done", "failed")}
        cells = dict.fromkeys(counts, 0)
        compute = 0.0
        for st, n, c, cs in by_status:
            counts[st] = int(n)
            cells[st] = int(c)
            compute += float(cs) if st == "done" else 0.0
        cells_done = cells["done"]
        rate = None
        if recent[0] and recent[1] is not None and recent[2] is not None:
            # Over the compute window of those units (first start to last finish), not up to
            # now: a finished sweep keeps the speed it ran at instead of decaying with time.
            span = (recent[2] - recent[1]).total_seconds()
            rate = float(recent[0]) / span if span > 0 else None
        if rate is None and cells_done and overall[0] is not None and overall[1] is not None:
            span = (overall[1] - overall[0]).total_seconds()
            rate = cells_done / span if span > 0 else None
        remaining = cells["pending"] + cells["leased"]
        eta = 0.0 if remaining == 0 else (remaining / rate if rate else None)
        return SweepStatus(
            sweep=info.name, counts=counts, units_total=sum(counts.values()),
            cells_total=sum(cells.values()), cells_done=cells_done, cells_per_s=rate, eta_s=eta,
            compute_s=compute, expired_leases=int(expired),
            failed=[FailedUnit(k, a, e) for k, a, e in failed],
        )
