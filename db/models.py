"""SQLAlchemy models of the result database: sweeps, work units and workers.

Only table definitions (and `in_sweep`, the one condition for "a unit of this sweep") live here; queries are in store.py and leasing.py, schema changes in migrations/.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# JSONB on PostgreSQL (compact, indexable), plain JSON text elsewhere.
JsonType = JSON().with_variant(JSONB(), "postgresql")

UNIT_STATUSES = ("pending", "leased", "done", "failed")
SWEEP_STATUSES = ("created", "running", "done", "failed", "stopped")


class Base(DeclarativeBase):
    pass


class Sweep(Base):
    """One named sweep: its spec as given, the spec's hash and where its shards go."""

    __tablename__ = "sweeps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType, nullable=False)
    spec_hash: Mapped[str] = mapped_column(String(128), nullable=False)
    output_dir: Mapped[str] = mapped_column(Text, nullable=False)
    # All timestamps are naive UTC (datetime.now(timezone.utc) without tzinfo).
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="created")

    __table_args__ = (UniqueConstraint("name", name="uq_sweeps_name"),)


class Unit(Base):
    """One unit of work, addressed by a deterministic key; done exactly once."""

    __tablename__ = "units"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(128), nullable=False)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), nullable=False)
    # Free-form partition (e.g. "model|dtype") so an actor holding one model leases only its units.
    group: Mapped[str | None] = mapped_column(String(256), nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(JsonType, nullable=False)
    n_cells: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(256), nullable=True)
    lease_expires: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_rows: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    result_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    result_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    compute_s: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (
        UniqueConstraint("key", name="uq_units_key"),
        # The lease queries: next pending (or expired) units of a sweep, or of one of its
        # groups, already in plan order (id) so that LIMIT n stops early without a sort.
        Index("ix_units_sweep_status_id", "sweep_id", "status", "id"),
        Index("ix_units_sweep_group_status_id", "sweep_id", "group", "status", "id"),
        Index("ix_units_lease_owner", "lease_owner"),
    )


class SweepMember(Base):
    """A unit that belongs to a sweep besides the one that planned it (same cells, same key).

    A sweep's units are those with units.sweep_id = its id, plus those listed here.
    """

    __tablename__ = "sweep_members"

    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True)
    unit_id: Mapped[int] = mapped_column(ForeignKey("units.id", ondelete="CASCADE"), primary_key=True)

    __table_args__ = (Index("ix_sweep_members_unit", "unit_id"),)


class Worker(Base):
    """A process that leases units (a Ray actor, a bench worker), with its liveness."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(256), primary_key=True)
    host: Mapped[str] = mapped_column(String(256), nullable=False)
    device: Mapped[str] = mapped_column(String(64), nullable=False)
    model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)


def in_sweep(sweep_id: Any) -> Any:
    """The condition "this unit belongs to sweep_id": planned by it, or shared with it.

    Every query over a sweep's units uses it, so a unit shared by two sweeps is counted,
    leased, verified and read by both, and stored once.
    """
    return or_(Unit.__table__.c.sweep_id == sweep_id, Unit.__table__.c.id.in_(member_ids(sweep_id)))


def member_ids(sweep_id: Any) -> Any:
    """Subquery: ids of the units shared with sweep_id (planned by another sweep)."""
    members = SweepMember.__table__.c
    return select(members.unit_id).where(members.sweep_id == sweep_id).scalar_subquery()
