"""The result database's public face: Store (sweeps, units, leases, shards, status) and connect().

Queries live here; leases in leasing.py; every transaction goes through session.session_scope.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from db import leasing
from db.engine import make_engine
from db.leasing import CompleteOutcome, FailOutcome, LeasedUnit, utcnow
from db.migrate import current_revision, head_revision, upgrade
from db.models import SWEEP_STATUSES, Sweep, Unit, Worker
from db.session import DatabaseError, session_scope
from db.shards import ShardInfo, check_key, check_name, key_of, shard_files, verify_shard
from db.urls import default_url, mask_url, normalize_url, resolve_url
from tasks.errors import InvalidInput

__all__ = [
    "DatabaseError",
    "FailedUnit",
    "LeasedUnit",
    "ShardInfo",
    "ShardProblem",
    "Store",
    "SweepInfo",
    "SweepStatus",
    "UnitSpec",
    "VerifyReport",
    "connect",
    "default_url",
    "mask_url",
    "resolve_url",
]

logger = logging.getLogger("unisweep.db")
T = TypeVar("T")

_INSERT_CHUNK = 10_000  # rows per executemany when adding units
EXPIRED_CHECK_S = 0.5  # lease() looks for expired leases first at most this often (per Store)
RATE_WINDOW_S = 300.0  # cells/s is measured over the units finished in the last 5 minutes


@dataclass(frozen=True)
class UnitSpec:
    """A planned unit: its deterministic key, its group (e.g. "model|dtype"), what to compute."""

    key: str
    group: str | None
    params: dict[str, Any]
    n_cells: int


@dataclass(frozen=True)
class SweepInfo:
    id: int
    name: str
    spec: dict[str, Any]
    spec_hash: str
    output_dir: str
    created_at: datetime
    status: str


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


@dataclass(frozen=True)
class ShardProblem:
    key: str
    path: str | None
    reason: str


@dataclass(frozen=True)
class VerifyReport:
    sweep: str
    checked: int
    problems: list[ShardProblem]

    @property
    def ok(self) -> bool:
        return not self.problems


class Store:
    """One database (SQLite file or PostgreSQL schema) holding sweeps, units and workers."""

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

    def __enter__(self) -> Store:
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

    # ---- sweeps -------------------------------------------------------------------------

    def create_sweep(
        self, name: str, spec: dict[str, Any], spec_hash: str, output_dir: str | os.PathLike[str]
    ) -> int:
        """The id of sweep `name`, creating it if new. Same name with another spec_hash is an error."""
        check_name("sweep", name)
        if not isinstance(spec, dict):
            raise InvalidInput("spec", "a dict (the sweep spec)", type(spec).__name__)
        try:
            json.dumps(spec)
        except (TypeError, ValueError) as exc:
            raise InvalidInput("spec", "a JSON-serialisable dict", detail=str(exc)) from exc
        if not isinstance(spec_hash, str) or not spec_hash:
            raise InvalidInput("spec_hash", "a non-empty string", spec_hash)
        out = str(output_dir) if "://" in str(output_dir) else str(Path(output_dir).resolve())
        # Two drivers starting the same sweep at once: the loser's insert is a logged no-op.
        with self._session(ignore_integrity=True) as s:
            if s.execute(select(Sweep.id).where(Sweep.name == name)).first() is None:
                s.add(
                    Sweep(
                        name=name, spec=spec, spec_hash=spec_hash, output_dir=out,
                        created_at=utcnow(), status="created",
                    )
                )
                s.flush()
        info = self.get_sweep(name)
        if info.output_dir != out and info.spec_hash == spec_hash:
            logger.warning("sweep %s keeps its output folder %s (asked for %s)", name, info.output_dir, out)
        if info.spec_hash != spec_hash:
            raise InvalidInput(
                "sweep",
                "a new name for a changed spec, or the spec the sweep was created with",
                name,
                detail=f"sweep {name!r} exists with spec_hash {info.spec_hash[:12]}..., "
                f"got {spec_hash[:12]}...",
            )
        return info.id

    def get_sweep(self, sweep: int | str) -> SweepInfo:
        """A sweep by id or name; InvalidInput listing the known names if there is none."""
        with self._session() as s:
            cond = Sweep.id == sweep if isinstance(sweep, int) else Sweep.name == sweep
            row = s.execute(select(Sweep).where(cond)).scalar_one_or_none()
            if row is None:
                names = s.execute(select(Sweep.name).order_by(Sweep.id)).scalars().all()
                allowed = ", ".join(names[:20]) if names else "(no sweeps in this database yet)"
                raise InvalidInput("sweep", f"one of: {allowed}", sweep, detail=f"database {self.url}")
            return SweepInfo(
                row.id, row.name, row.spec, row.spec_hash, row.output_dir, row.created_at, row.status
            )

    def list_sweeps(self) -> list[SweepInfo]:
        with self._session() as s:
            rows = s.execute(select(Sweep).order_by(Sweep.id)).scalars().all()
            return [
                SweepInfo(r.id, r.name, r.spec, r.spec_hash, r.output_dir, r.created_at, r.status)
                for r in rows
            ]

    def set_sweep_status(self, sweep: int | str, status: str) -> None:
        if status not in SWEEP_STATUSES:
            raise InvalidInput("status", " | ".join(SWEEP_STATUSES), status)
        sid = self._sweep_id(sweep)
        with self._session() as s:
            s.execute(update(Sweep).where(Sweep.id == sid).values(status=status))

    def _sweep_id(self, sweep: int | str) -> int:
        if isinstance(sweep, int) and not isinstance(sweep, bool):
            return sweep
        if sweep not in self._sweep_ids:
            self._sweep_ids[sweep] = self.get_sweep(sweep).id
        return self._sweep_ids[sweep]

    # ---- units --------------------------------------------------------------------------

    def add_units(self, sweep: int | str, units: Iterable[UnitSpec]) -> int:
        """Insert units, ignoring keys already present (any sweep); returns how many were new."""
        sid = self._sweep_id(sweep)
        rows = []
        for i, u in enumerate(units):
            check_key(f"units[{i}].key", u.key)
            if isinstance(u.n_cells, bool) or not isinstance(u.n_cells, int) or u.n_cells < 0:
                raise InvalidInput(f"units[{i}].n_cells", "an integer >= 0", u.n_cells)
            if not isinstance(u.params, dict):
                raise InvalidInput(f"units[{i}].params", "a JSON-serialisable dict", type(u.params).__name__)
            if u.group is not None and (not isinstance(u.group, str) or len(u.group) > 256):
                raise InvalidInput(f"units[{i}].group", "None or a string of at most 256 characters", u.group)
            rows.append(
                {"key": u.key, "sweep_id": sid, "group": u.group, "params": u.params,
                 "n_cells": u.n_cells, "status": "pending", "attempts": 0}
            )
        if not rows:
            return 0
        insert = pg_insert if self.dialect == "postgresql" else sqlite_insert
        # executemany: SQLAlchemy batches it into multi-row INSERTs ("insertmanyvalues");
        # RETURNING counts the rows really added (rowcount is unreliable for this on psycopg).
        stmt = insert(Unit).on_conflict_do_nothing(index_elements=["key"]).returning(Unit.id)
        added = 0
        with self._session() as s:
            for start in range(0, len(rows), _INSERT_CHUNK):
                added += len(s.execute(stmt, rows[start : start + _INSERT_CHUNK]).all())
        return added

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

    def fail(self, key: str, worker_id: str, error: str, max_attempts: int = 3) -> FailOutcome:
        """Record a failed attempt: "retry" (pending again) or "failed" once attempts reach max."""
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise InvalidInput("max_attempts", "an integer >= 1", max_attempts)
        return self._hot(lambda s: leasing.fail(s, key, worker_id, str(error)[:20_000], max_attempts))

    def release(self, worker_id: str) -> int:
        """Give back all leases of worker_id (Ctrl-C, clean stop); returns how many."""
        return self._hot(lambda s: leasing.release(s, worker_id))

    def reclaim_expired(self, sweep: int | str | None = None, max_attempts: int | None = None) -> tuple[int, int]:
        """Expired leases -> pending (or failed after max_attempts); returns (reset, failed)."""
        sid = None if sweep is None else self._sweep_id(sweep)
        with self._session() as s:
            return leasing.reclaim_expired(s, sid, max_attempts)

    def unit(self, key: str) -> dict[str, Any] | None:
        """Every column of one unit, or None if the key is unknown (for tests and debugging)."""
        with self._session() as s:
            row = s.execute(select(Unit).where(Unit.key == key)).scalar_one_or_none()
            if row is None:
                return None
            return {c.name: getattr(row, c.key) for c in Unit.__table__.columns}

    # ---- workers ------------------------------------------------------------------------

    def register_worker(
        self, worker_id: str, host: str | None = None, device: str = "cpu", model: str | None = None
    ) -> None:
        """Record (or refresh) a worker: host, device, the model it holds."""
        import socket

        now = utcnow()
        values = {"id": worker_id, "host": host or socket.gethostname(), "device": device,
                  "model": model, "started_at": now, "heartbeat_at": now}
        insert = pg_insert if self.dialect == "postgresql" else sqlite_insert
        stmt = insert(Worker).values(values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["id"],
            set_={k: stmt.excluded[k] for k in ("host", "device", "model", "started_at", "heartbeat_at")},
        )
        with self._session() as s:
            s.execute(stmt)

    def worker_heartbeat(self, worker_id: str) -> bool:
        """Mark a worker alive now; False if it was never registered."""
        with self._session() as s:
            res = s.execute(update(Worker).where(Worker.id == worker_id).values(heartbeat_at=utcnow()))
            return bool(res.rowcount)

    # ---- results ------------------------------------------------------------------------

    def done_shards(self, sweep: int | str) -> list[ShardInfo]:
        """The shards of a sweep's done units, in plan order: the only files that are data."""
        sid = self._sweep_id(sweep)
        with self._session() as s:
            rows = s.execute(
                select(Unit.result_path, Unit.result_rows, Unit.result_bytes, Unit.result_sha256)
                .where(Unit.sweep_id == sid, Unit.status == "done")
                .order_by(Unit.id)
            ).all()
        return [ShardInfo(r[0], r[1], r[2], r[3]) for r in rows]

    def status(self, sweep: int | str, window_s: float = RATE_WINDOW_S) -> SweepStatus:
        """Counts by status, cells done, cells/s (recent window, else overall), ETA, failures."""
        info = self.get_sweep(sweep)
        now = utcnow()
        with self._session() as s:
            by_status = s.execute(
                select(Unit.status, func.count(), func.coalesce(func.sum(Unit.n_cells), 0),
                       func.coalesce(func.sum(Unit.compute_s), 0.0))
                .where(Unit.sweep_id == info.id)
                .group_by(Unit.status)
            ).all()
            expired = s.execute(
                select(func.count()).where(
                    Unit.sweep_id == info.id, Unit.status == "leased", Unit.lease_expires < now
                )
            ).scalar_one()
            since = now - timedelta(seconds=window_s)
            recent = s.execute(
                select(func.coalesce(func.sum(Unit.n_cells), 0), func.min(Unit.started_at))
                .where(Unit.sweep_id == info.id, Unit.status == "done", Unit.finished_at >= since)
            ).one()
            overall = s.execute(
                select(func.min(Unit.started_at), func.max(Unit.finished_at))
                .where(Unit.sweep_id == info.id, Unit.status == "done")
            ).one()
            failed = s.execute(
                select(Unit.key, Unit.attempts, Unit.error)
                .where(Unit.sweep_id == info.id, Unit.status == "failed")
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
        if recent[0] and recent[1] is not None:
            span = (now - max(since, recent[1])).total_seconds()
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

    def verify(self, sweep: int | str, *, quick: bool = False) -> VerifyReport:
        """Check every done unit's shard: file exists, size, sha256 and Parquet row count match.

        quick skips the sha256 (which reads every byte): existence, size and row count only.
        """
        info = self.get_sweep(sweep)
        with self._session() as s:
            rows = s.execute(
                select(Unit.key, Unit.result_path, Unit.result_rows, Unit.result_bytes, Unit.result_sha256)
                .where(Unit.sweep_id == info.id, Unit.status == "done")
                .order_by(Unit.id)
            ).all()
        problems = []
        for key, path, nrows, nbytes, sha in rows:
            if not path or nrows is None or nbytes is None or not sha:
                problems.append(ShardProblem(key, path, "done without a recorded shard"))
                continue
            reason = verify_shard(ShardInfo(path, nrows, nbytes, sha), checksum=not quick)
            if reason:
                problems.append(ShardProblem(key, path, reason))
        return VerifyReport(info.name, len(rows), problems)

    def orphans(self, sweep: int | str, *, include_in_flight: bool = False) -> list[Path]:
        """Files under the sweep's shard folder that are not the shard of a done unit.

        Files of units whose lease is live are being written right now: left out unless asked.
        """
        info = self.get_sweep(sweep)
        now = utcnow()
        with self._session() as s:
            done = {
                os.path.realpath(p)
                for (p,) in s.execute(
                    select(Unit.result_path).where(Unit.sweep_id == info.id, Unit.status == "done")
                )
                if p
            }
            live = set(
                s.execute(
                    select(Unit.key).where(
                        Unit.sweep_id == info.id, Unit.status == "leased", Unit.lease_expires >= now
                    )
                ).scalars()
            )
        out = []
        for path in shard_files(info.output_dir, info.name):
            if os.path.realpath(path) in done:
                continue
            if not include_in_flight and key_of(path) in live:
                continue
            out.append(path)
        return out

    def gc(self, sweep: int | str, *, include_in_flight: bool = False, dry_run: bool = False) -> list[Path]:
        """Delete orphan files (torn, temporary, superseded shards); returns what was (or would be) removed."""
        paths = self.orphans(sweep, include_in_flight=include_in_flight)
        if not dry_run:
            for p in paths:
                p.unlink(missing_ok=True)
        return paths

    def table_arrow(self, name: str, sweep: int | str | None = None) -> pa.Table:
        """The `units` or `sweeps` table (one sweep's rows, or all) as Arrow, for DuckDB."""
        if name == "sweeps":
            rows = [
                {"sweep_id": i.id, "sweep": i.name, "spec": json.dumps(_masked_spec(i.spec), sort_keys=True),
                 "spec_hash": i.spec_hash, "output_dir": i.output_dir, "created_at": i.created_at,
                 "status": i.status}
                for i in ([self.get_sweep(sweep)] if sweep is not None else self.list_sweeps())
            ]
            return pa.Table.from_pylist(rows, schema=SWEEPS_ARROW)
        if name != "units":
            raise InvalidInput("name", "units | sweeps", name)
        stmt = select(Unit, Sweep.name).join(Sweep, Sweep.id == Unit.sweep_id).order_by(Unit.id)
        if sweep is not None:
            stmt = stmt.where(Unit.sweep_id == self._sweep_id(sweep))
        with self._session() as s:
            rows = [
                {"unit_key": u.key, "sweep": sweep_name, "group": u.group,
                 "params": json.dumps(u.params, sort_keys=True), "n_cells": u.n_cells,
                 "status": u.status, "attempts": u.attempts, "lease_owner": u.lease_owner,
                 "lease_expires": u.lease_expires, "heartbeat_at": u.heartbeat_at,
                 "started_at": u.started_at, "finished_at": u.finished_at, "error": u.error,
                 "result_path": u.result_path, "result_rows": u.result_rows,
                 "result_bytes": u.result_bytes, "result_sha256": u.result_sha256,
                 "compute_s": u.compute_s}
                for u, sweep_name in s.execute(stmt).all()
            ]
        return pa.Table.from_pylist(rows, schema=UNITS_ARROW)


def _masked_spec(spec: dict[str, Any]) -> dict[str, Any]:
    # Sweeps stored before passwords were masked at write time still hold them in clear.
    if isinstance(spec, dict) and isinstance(spec.get("database"), str):
        return dict(spec, database=mask_url(spec["database"]))
    return spec


_TS = pa.timestamp("us")
SWEEPS_ARROW = pa.schema([
    ("sweep_id", pa.int64()), ("sweep", pa.string()), ("spec", pa.string()),
    ("spec_hash", pa.string()), ("output_dir", pa.string()), ("created_at", _TS),
    ("status", pa.string()),
])
UNITS_ARROW = pa.schema([
    ("unit_key", pa.string()), ("sweep", pa.string()), ("group", pa.string()), ("params", pa.string()),
    ("n_cells", pa.int64()), ("status", pa.string()), ("attempts", pa.int32()),
    ("lease_owner", pa.string()), ("lease_expires", _TS), ("heartbeat_at", _TS),
    ("started_at", _TS), ("finished_at", _TS), ("error", pa.string()), ("result_path", pa.string()),
    ("result_rows", pa.int64()), ("result_bytes", pa.int64()), ("result_sha256", pa.string()),
    ("compute_s", pa.float64()),
])


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
