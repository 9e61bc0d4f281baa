"""The DuckDB views every analysis reads: `responses` over a sweep's done shards, `heads` over
their head_responses files (units that recorded heads), `units`, `sweeps`.

Local files are read by DuckDB's own Parquet reader; files in an object store (s3://, gs://,
abfs://) through a pyarrow dataset over exactly those files, since DuckDB's httpfs is not
bundled.

Opened read-only: after the views exist, file access is limited to those shards and locked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from db import storage
from db.shards import head_shard
from tasks.errors import InvalidInput
from tasks.layout import HEAD_SHARD_SCHEMA, SHARD_SCHEMA

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

# A model planned from `revisions:` has the id NAME@REVISION (tasks.hub): its revision (NULL
# for other models) and its name without it, so training checkpoints group and order.
REVISION_SQL = "NULLIF(regexp_extract(model, '@([^@/]+)$', 1), '')"
MODEL_NAME_SQL = "regexp_replace(model, '@[^@/]+$', '')"



def open_sweep(
    shard_paths: Sequence[str | Path],
    units: pa.Table | None = None,
    sweeps: pa.Table | None = None,
    *,
    threads: int | None = None,
    lock: bool = True,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with views `responses`, `heads`, `units` and `sweeps`.

    `responses` reads exactly `shard_paths` (the done shards from the database, never a
    glob) and adds `chi`, `delta` (= i - j), `offset_class`, `depth` (= l / n_layers),
    `revision` and `model_name` (the model id split at '@', for checkpoint sweeps).
    `heads` reads the head_responses files those shards name and adds `chi_head` (r_head per
    unit eps), `delta`, `offset_class` and `depth` alike. Shards (and so their head files)
    may be local paths or object store URIs. With `lock`, the connection can afterwards
    read only those local files and cannot change its own settings, so user SQL cannot
    reach other files or write any (object store files are scanned in process).
    """
    paths = [str(p) if storage.is_object_store(p) else str(Path(p).resolve()) for p in shard_paths]
    for p in paths:
        if not storage.is_object_store(p) and not Path(p).is_file():
            raise InvalidInput("shard_paths", "existing Parquet files of done units", p,
                               detail="a done shard is missing on disk; run `unisweep verify`")
    try:
        head_paths = [h.path for p in paths if (h := head_shard(p)) is not None]
    except FileNotFoundError as exc:
        raise InvalidInput("shard_paths", "existing Parquet files of done units",
                           str(exc).splitlines()[0],
                           detail="a done shard is missing; run `unisweep verify`") from None
    con = duckdb.connect(":memory:")
    if threads is not None:
        con.execute(f"SET threads = {int(threads)}")
    source = _scan(con, "shards", paths, SHARD_SCHEMA)
    con.execute(
        f"""CREATE VIEW responses AS
        SELECT *, {CHI_SQL} AS chi, i - j AS delta, {OFFSET_CLASS_SQL} AS offset_class,
               l::DOUBLE / n_layers AS depth, {REVISION_SQL} AS revision,
               {MODEL_NAME_SQL} AS model_name
        FROM {source}"""
    )
    head_source = _scan(con, "heads", head_paths, HEAD_SHARD_SCHEMA)
    con.execute(
        f"""CREATE VIEW heads AS
        SELECT *, CASE WHEN eps IS NULL THEN r_head ELSE r_head / eps END AS chi_head,
               i - j AS delta, {OFFSET_CLASS_SQL} AS offset_class, l::DOUBLE / n_layers AS depth
        FROM {head_source}"""
    )
    for name, table in (("units", units), ("sweeps", sweeps)):
        if table is None:
            table = pa.table({"sweep": pa.array([], pa.string())})
        con.register(f"_{name}_arrow", table)
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM _{name}_arrow")
    if lock:
        local = [p for p in paths + head_paths if not storage.is_object_store(p)]
        if local:
            con.execute(f"SET allowed_paths = {_sql_list(local)}")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


def _scan(con: duckdb.DuckDBPyConnection, name: str, paths: list[str], schema: pa.Schema) -> str:
    """The relation a view selects from for exactly `paths`: DuckDB's read_parquet when all
    are local; else a pyarrow dataset (one per store, unioned, local files included)
    registered on `con`; with none (no done shard yet), an empty table of `schema`, which
    keeps every query valid."""
    if not paths:
        con.register(f"_empty_{name}", schema.empty_table())
        return f"_empty_{name}"
    if not any(storage.is_object_store(p) for p in paths):
        return f"read_parquet({_sql_list(paths)})"
    con.register(f"_{name}_dataset", dataset_of(paths, schema))  # scanned in process
    return f"_{name}_dataset"


def dataset_of(paths: Sequence[str], schema: pa.Schema) -> pads.Dataset:
    """One pyarrow dataset over exactly these Parquet files, local or in object stores."""
    by_store: dict[tuple[str, str], list[str]] = {}
    local = []
    for p in paths:
        if storage.is_object_store(p):
            parts = urlsplit(p)
            by_store.setdefault((parts.scheme, parts.netloc), []).append(p)
        else:
            local.append(p)
    datasets = []
    try:
        for uris in by_store.values():
            fs, _ = storage.resolve(uris[0])
            datasets.append(pads.dataset([storage.resolve(u)[1] for u in uris], schema=schema,
                                         format="parquet", filesystem=fs))
        if local:
            datasets.append(pads.dataset(local, schema=schema, format="parquet"))
    except FileNotFoundError as exc:
        raise InvalidInput("shard_paths", "existing Parquet files of done units", str(exc).splitlines()[0],
                           detail="a done shard is missing; run `unisweep verify`") from None
    except OSError as exc:
        raise storage.StorageError(f"reading shards: {storage.reason(exc)}") from None
    return datasets[0] if len(datasets) == 1 else pads.dataset(datasets)


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
