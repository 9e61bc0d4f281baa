"""Database fixtures (SQLite file and real PostgreSQL, one schema per test run).

`db_url` is parametrized over both backends and yields a URL string that any process can use
(subprocesses, the CLI); on PostgreSQL it points at a fresh schema `t_<random>` via search_path.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, text

if TYPE_CHECKING:
    from db.store import Store

# The admin URL of the test server; override to point the suite at another PostgreSQL.
PG_TEST_URL = os.environ.get("UNISWEEP_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]

_pg_ok: bool | None = None


def postgres_available() -> bool:
    """Whether the test PostgreSQL answers (checked once per session)."""
    global _pg_ok
    if _pg_ok is None:
        engine = create_engine(PG_TEST_URL, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            _pg_ok = True
        except Exception:
            _pg_ok = False
        finally:
            engine.dispose()
    return _pg_ok


def sqlite_url(folder: str | os.PathLike[str]) -> str:
    """A SQLite URL for a new file in `folder`."""
    return f"sqlite:///{Path(folder).resolve() / 'unisweep.db'}"


@contextmanager
def postgres_schema_url() -> Iterator[str]:
    """A URL whose search_path is a fresh schema `t_<random>`; the schema is dropped on exit."""
    schema = f"t_{secrets.token_hex(6)}"
    admin = create_engine(PG_TEST_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        sep = "&" if "?" in PG_TEST_URL else "?"
        yield f"{PG_TEST_URL}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.connect() as conn:
            # Never hang a test run on a leaked connection that still holds a lock.
            conn.execute(text("SET lock_timeout = '10s'"))
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def make_db_url(backend: str, folder: str | os.PathLike[str]) -> Iterator[str]:
    """A fresh, empty database of `backend` ("sqlite" or "postgres"); skips if PG is down."""
    if backend == "sqlite":
        yield sqlite_url(folder)
    elif backend == "postgres":
        if not postgres_available():
            if os.environ.get("UNISWEEP_REQUIRE_PG"):
                pytest.fail(f"PostgreSQL not reachable at {PG_TEST_URL}")
            pytest.skip(f"PostgreSQL not reachable at {PG_TEST_URL}")
        with postgres_schema_url() as url:
            yield url
    else:
        raise ValueError(f"backend must be sqlite or postgres, got {backend!r}")


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database URL per test, on SQLite and on PostgreSQL."""
    with make_db_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture(scope="module", params=BACKENDS)
def db_url_module(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One database URL shared by a test module (cheaper when tests use distinct sweeps)."""
    with make_db_url(request.param, tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """A connected, migrated db.store.Store on each backend, closed after the test."""
    from db.store import connect

    st = connect(db_url)
    try:
        yield st
    finally:
        st.close()
