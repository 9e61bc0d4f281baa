"""The DuckDB views every analysis reads: `responses` over a sweep's done shards, `units`, `sweeps`.

Opened read-only: after the views exist, file access is limited to those shards and locked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import duckdb
import pyarrow as pa

from tasks.errors import InvalidInput
from tasks.layout import SHARD_SCHEMA

# Offset classes of a response (i, j), in the order reports show them.
OFFSET_CLASSES = ("diagonal", "near", "induction_T-1", "induction_T", "background")

# SQL for the class of a row.  Induction offsets come first so that a small T (T-1 <= 3)
# still counts its stripes as induction; only j in copy 1 (1..T) has stripes in the prompt.
OFFSET_CLASS_SQL = """CASE
    WHEN i = j THEN 'diagonal'
    WHEN j BETWEEN 1 AND T AND i - j = T - 1 THEN 'induction_T-1'
    WHEN j BETWEEN 1 AND T AND i - j = T THEN 'induction_T'
    WHEN i - j BETWEEN 1 AND 3 THEN 'near'
    ELSE 'background' END"""

# Linear rows (eps NULL) already hold the eps -> 0 limit of R/eps.
CHI_SQL = "CASE WHEN eps IS NULL THEN r ELSE r / eps END"



def open_sweep(
    shard_paths: Sequence[str | Path],
    units: pa.Table | None = None,
    sweeps: pa.Table | None = None,
    *,
    threads: int | None = None,
    lock: bool = True,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with views `responses`, `units` and `sweeps`.

    `responses` reads exactly `shard_paths` (the done shards from the database, never a
    glob) and adds `chi`, `delta` (= i - j), `offset_class` and `depth` (= l / n_layers).
    With `lock`, the connection can afterwards read only those files and cannot change
    its own settings, so user SQL cannot reach other files or write any.
    """
    paths = [str(Path(p).resolve()) for p in shard_paths]
    for p in paths:
        if not Path(p).is_file():
            raise InvalidInput("shard_paths", "existing Parquet files of done units", p,
                               detail="a done shard is missing on disk; run `unisweep verify`")
    con = duckdb.connect(":memory:")
    if threads is not None:
        con.execute(f"SET threads = {int(threads)}")
    if paths:
        source = f"read_parquet({_sql_list(paths)})"
    else:
        # No done shard yet: an empty relation with the shard columns keeps every query valid.
        con.register("_empty_shards", SHARD_SCHEMA.empty_table())
        source = "_empty_shards"
    con.execute(
        f"""CREATE VIEW responses AS
        SELECT *, {CHI_SQL} AS chi, i - j AS delta, {OFFSET_CLASS_SQL} AS offset_class,
               l::DOUBLE / n_layers AS depth
        FROM {source}"""
    )
    for name, table in (("units", units), ("sweeps", sweeps)):
        if table is None:
            table = pa.table({"sweep": pa.array([], pa.string())})
        con.register(f"_{name}_arrow", table)
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM _{name}_arrow")
    if lock:
        if paths:
            con.execute(f"SET allowed_paths = {_sql_list(paths)}")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


# EXPLAIN [ANALYZE] [(options)] before the statement it explains (comments allowed first).
_EXPLAIN_RE = re.compile(
    r"^\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?:\([^()]*\)\s*)?",
    re.IGNORECASE | re.DOTALL)
_PIVOT_RE = re.compile(r"^\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*U?N?PIVOT\b", re.IGNORECASE | re.DOTALL)
_ALLOWED = "one read-only statement: SELECT, WITH, FROM, PIVOT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN"


def check_read_only(sql: str) -> None:
    """Refuse SQL that is empty, holds several statements, or is anything but a read-only query.

    EXPLAIN ANALYZE runs the statement it explains, so the explained statement is checked
    too. A PIVOT without an IN list is DuckDB's only multi-step read (it first lists the
    pivot values), so it is allowed by name. Parse errors surface as DuckDB's own message.
    """
    statements = _statements(sql)
    if len(statements) != 1:
        raise InvalidInput("sql", _ALLOWED, f"{len(statements)} statements",
                           detail="run one statement per query" if statements else "")
    st = statements[0]
    if st.type == duckdb.StatementType.SELECT:
        return
    if st.type == duckdb.StatementType.MULTI and _PIVOT_RE.match(st.query):
        return
    if st.type == duckdb.StatementType.EXPLAIN:
        m = _EXPLAIN_RE.match(st.query)
        inner = st.query[m.end():] if m else ""
        try:
            check_read_only(inner)
            return
        except InvalidInput:
            pass
        raise InvalidInput("sql", "EXPLAIN [ANALYZE] of one read-only query", sql,
                           detail="EXPLAIN ANALYZE runs the statement it explains")
    raise InvalidInput("sql", _ALLOWED, st.type.name,
                       detail="queries cannot change data, settings or files")


def _statements(sql: str) -> list:
    try:
        return duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise InvalidInput("sql", _ALLOWED, sql, detail=str(exc)) from None


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """Run one read-only user query; DuckDB's error message becomes an InvalidInput."""
    check_read_only(sql)
    try:
        rel = con.sql(sql)
        if rel is None:  # pragma: no cover - SELECT/EXPLAIN always give a relation
            return pa.table({})
        return rel.to_arrow_table()
    except duckdb.Error as exc:
        raise InvalidInput("sql", "a query DuckDB accepts over responses, units, sweeps",
                           sql, detail=str(exc)) from None


def _sql_list(items: Sequence[str]) -> str:
    return "[" + ", ".join("'" + s.replace("'", "''") + "'" for s in items) + "]"
