"""First schema: sweeps, units (leases and result shards) and workers.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copy of the column type at this revision (models.py may move on).
JsonType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("spec", JsonType, nullable=False),
        sa.Column("spec_hash", sa.String(128), nullable=False),
        sa.Column("output_dir", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.UniqueConstraint("name", name="uq_sweeps_name"),
    )
    op.create_table(
        "units",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("sweep_id", sa.Integer(), sa.ForeignKey("sweeps.id", ondelete="CASCADE"), nullable=False),
        sa.Column("group", sa.String(256), nullable=True),
        sa.Column("params", JsonType, nullable=False),
        sa.Column("n_cells", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(256), nullable=True),
        sa.Column("lease_expires", sa.DateTime(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result_path", sa.Text(), nullable=True),
        sa.Column("result_rows", sa.BigInteger(), nullable=True),
        sa.Column("result_bytes", sa.BigInteger(), nullable=True),
        sa.Column("result_sha256", sa.String(64), nullable=True),
        sa.Column("compute_s", sa.Float(), nullable=True),
        sa.UniqueConstraint("key", name="uq_units_key"),
    )
    op.create_index("ix_units_sweep_status_id", "units", ["sweep_id", "status", "id"])
    op.create_index("ix_units_sweep_group_status_id", "units", ["sweep_id", "group", "status", "id"])
    op.create_index("ix_units_lease_owner", "units", ["lease_owner"])
    op.create_table(
        "workers",
        sa.Column("id", sa.String(256), primary_key=True),
        sa.Column("host", sa.String(256), nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("model", sa.String(256), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index("ix_units_lease_owner", table_name="units")
    op.drop_index("ix_units_sweep_group_status_id", table_name="units")
    op.drop_index("ix_units_sweep_status_id", table_name="units")
    op.drop_table("units")
    op.drop_table("sweeps")
