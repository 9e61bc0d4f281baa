"""Units shared between sweeps: a sweep whose grid overlaps another's sees those cells too.

A unit's key hashes what determines its numbers, not the sweep, so two sweeps over the same
cells share one unit, computed once. `units.sweep_id` stays the sweep that planned it first;
`sweep_members` lists the other sweeps it belongs to. Existing unit keys do not change.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sweep_members",
        sa.Column("sweep_id", sa.Integer(), sa.ForeignKey("sweeps.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("unit_id", sa.Integer(), sa.ForeignKey("units.id", ondelete="CASCADE"),
                  nullable=False),
        sa.PrimaryKeyConstraint("sweep_id", "unit_id", name="pk_sweep_members"),
    )
    op.create_index("ix_sweep_members_unit", "sweep_members", ["unit_id"])


def downgrade() -> None:
    op.drop_index("ix_sweep_members_unit", table_name="sweep_members")
    op.drop_table("sweep_members")
