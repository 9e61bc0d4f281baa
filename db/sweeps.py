"""Sweeps, their units and the workers: create and read sweeps, add units, register workers.

Also the read-outs of those tables: done shards (the data) and whole tables as Arrow for DuckDB.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from db.leasing import utcnow
from db.models import SWEEP_STATUSES, Sweep, SweepMember, Unit, Worker, in_sweep
from db.shards import ShardInfo, check_key, check_name
from db.store_core import StoreCore, logger
from db.urls import mask_url
from tasks.errors import InvalidInput

_INSERT_CHUNK = 10_000  # rows per executemany when adding units


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



class SweepStore(StoreCore):
    """Sweeps, units and workers of one database."""

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
        """Insert units; a key another sweep has becomes shared with this one. Returns how many
        units are new to this sweep."""
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
        # A key another sweep planned already: the same cells, so the same unit, shared
        # (computed once, seen by both) through a sweep_members row.
        member = insert(SweepMember).on_conflict_do_nothing(index_elements=["sweep_id", "unit_id"])
        added = 0
        with self._session() as s:
            for start in range(0, len(rows), _INSERT_CHUNK):
                chunk = rows[start : start + _INSERT_CHUNK]
                added += len(s.execute(stmt, chunk).all())
                foreign = s.execute(
                    select(Unit.id).where(Unit.key.in_([r["key"] for r in chunk]), Unit.sweep_id != sid)
                ).scalars().all()
                if foreign:
                    added += len(s.execute(member.returning(SweepMember.unit_id),
                                           [{"sweep_id": sid, "unit_id": i} for i in foreign]).all())
        return added
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
                .where(in_sweep(sid), Unit.status == "done")
                .order_by(Unit.id)
            ).all()
        return [ShardInfo(r[0], r[1], r[2], r[3]) for r in rows]
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
        if sweep is None:
            # One row per (sweep, unit): a unit shared by two sweeps is listed under each.
            parts = [self.table_arrow("units", info.id) for info in self.list_sweeps()]
            return pa.concat_tables(parts) if parts else UNITS_ARROW.empty_table()
        sid = self._sweep_id(sweep)
        name_of = select(Sweep.name).where(Sweep.id == sid).scalar_subquery()
        stmt = select(Unit, name_of).where(in_sweep(sid)).order_by(Unit.id)
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
