"""Where a sweep's data comes from: the result database's done shards and run tables.

`load_sweep` asks the Store; `from_shards` takes paths and Arrow tables directly (tests, tools).
Shard paths may be local files or object store URIs (s3://, gs://, abfs://): analysis.views
reads either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from analysis.views import open_sweep
from db import storage
from tasks.errors import InvalidInput


@dataclass
class SweepData:
    """A sweep opened for analysis: a DuckDB connection with the views, and where it came from."""

    con: duckdb.DuckDBPyConnection
    sweep: str | None
    shard_paths: list[str | Path] = field(default_factory=list)  # local Paths or object URIs

    def sql(self, query: str) -> duckdb.DuckDBPyRelation:
        """Run SQL on the views (internal use: no read-only check); returns a DuckDB relation."""
        return self.con.sql(query)


def from_shards(shard_paths: Sequence[str | Path], units: pa.Table | None = None,
                sweeps: pa.Table | None = None, *, sweep: str | None = None,
                threads: int | None = None) -> SweepData:
    """Open exactly these shard files (plus optional units / sweeps tables) for analysis."""
    con = open_sweep(shard_paths, units, sweeps, threads=threads)
    return SweepData(con=con, sweep=sweep, shard_paths=[
        p if storage.is_object_store(p) else Path(p) for p in shard_paths])


def load_sweep(sweep: str | None, db: str | None = None, out: str | Path | None = None, *,
               threads: int | None = None) -> SweepData:
    """Open a sweep from the result database: its done shards and its units / sweeps rows.

    `db` is a SQLAlchemy URL; else env UNISWEEP_DB; else `<out or runs/>/unisweep.db`.
    `sweep` None opens every sweep in the database. Nothing is written to the database.
    Every shard is checked against its recorded sha256 first (db.shards.check_shards,
    cached by path, size and mtime): a changed or missing shard raises ShardMismatch.
    """
    from db.shards import check_shards
    from db.store import connect  # the database layer is only needed on this path

    if sweep is not None and not sweep:
        raise InvalidInput("sweep", "the name of a sweep in the database", sweep)
    store = connect(db, output_dir=out, create=False, upgrade_schema=False)
    try:
        names = [sweep] if sweep is not None else [s.name for s in store.list_sweeps()]
        # Unknown name: raises. A unit shared by two sweeps is read once.
        shards = list({s.path: s for name in names for s in store.done_shards(name)}.values())
        # Never return rows of a shard whose bytes changed since its unit was done.
        check_shards(shards)
        units = store.table_arrow("units", sweep)
        sweeps = store.table_arrow("sweeps", sweep)
    finally:
        store.close()
    return from_shards([s.path for s in shards], units, sweeps, sweep=sweep, threads=threads)
