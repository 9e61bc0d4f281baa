"""Alembic environment for the result database: runs on the connection db.migrate hands in.

Used programmatically (connect() upgrades to head) and by `unisweep db upgrade --db URL`.
"""

from __future__ import annotations

from alembic import context

from db.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reached by a bare `alembic` command line
    from db.engine import make_engine

    connection = make_engine(config.get_main_option("sqlalchemy.url")).connect()

# Unqualified tables: on PostgreSQL they (and alembic_version) land in the first schema of
# the connection's search_path, which is how a per-run schema works.
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    transactional_ddl=True,
    render_as_batch=connection.dialect.name == "sqlite",  # ALTER on SQLite copies the table
)
with context.begin_transaction():
    context.run_migrations()
