"""Database outages (issue 15, item 2): calls ride out a cut connection, then fail in one line.

PostgreSQL is reached through a TCP proxy on 127.0.0.1 that the test cuts, never by stopping
the shared server.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

import db.store as store_mod
from db.retry import DatabaseUnavailable, Resilient, is_transient
from db.session import DatabaseError
from tests.fixtures_db import make_db_url
from tests.tcp_proxy import TcpProxy


def via_proxy(url: str, proxy: TcpProxy) -> str:
    u = make_url(url)
    return u.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


@pytest.mark.postgres
def test_store_rides_out_a_cut_connection(tmp_path: Path) -> None:
    with make_db_url("postgres", tmp_path) as url:
        target = make_url(url).port or 5432
        with TcpProxy(target) as proxy:
            store = Resilient(store_mod.connect(via_proxy(url, proxy)), budget=60)
            store.create_sweep("o", {"x": 1}, "h", str(tmp_path))
            store.add_units("o", [store_mod.UnitSpec(f"k{i}", "g", {"i": i}, 1) for i in range(4)])
            proxy.cut()
            threading.Timer(4.0, proxy.restore).start()
            t0 = time.monotonic()
            leased = store.lease("w", 2, 30.0, sweep_id="o")  # blocks through the outage
            waited = time.monotonic() - t0
            assert [u.key for u in leased] == ["k0", "k1"] and waited >= 3.5
            proxy.cut()
            threading.Timer(3.0, proxy.restore).start()
            assert store.status("o").counts == {"pending": 2, "leased": 2, "done": 0, "failed": 0}
            store.close()


@pytest.mark.postgres
def test_outage_past_the_budget_is_one_error(tmp_path: Path) -> None:
    with make_db_url("postgres", tmp_path) as url:
        target = make_url(url).port or 5432
        with TcpProxy(target) as proxy:
            store = Resilient(store_mod.connect(via_proxy(url, proxy)), budget=3)
            store.create_sweep("o", {"x": 1}, "h", str(tmp_path))
            proxy.cut()
            t0 = time.monotonic()
            with pytest.raises(DatabaseUnavailable) as ei:
                store.status("o")
            assert 3 <= time.monotonic() - t0 < 20
            msg = str(ei.value)
            assert "unreachable for 3 s" in msg and "\n" not in msg and "resume" in msg
            store.inner.engine.dispose()
            store.inner._hot_engine.dispose()


def test_only_connection_errors_are_retried(tmp_path: Path) -> None:
    calls = []

    def bad_sql() -> None:
        calls.append(1)
        with store.inner.engine.connect() as conn:
            conn.exec_driver_sql("SELECT nope FROM nowhere")

    store = Resilient(store_mod.connect(f"sqlite:///{tmp_path / 'u.db'}"), budget=30)
    with pytest.raises(Exception) as ei:
        store.run(bad_sql)
    assert not is_transient(ei.value) and len(calls) == 1
    # An unknown sweep is the user's error: raised at once, never retried.
    t0 = time.monotonic()
    with pytest.raises(Exception, match="invalid sweep"):
        store.status("nope")
    assert time.monotonic() - t0 < 5
    store.close()
    assert issubclass(DatabaseUnavailable, DatabaseError)


def test_sqlite_full_or_locked_file_counts_as_an_outage() -> None:
    import sqlite3

    from sqlalchemy.exc import OperationalError

    def wrapped(msg: str) -> DatabaseError:
        err = DatabaseError("sqlite:///x.db", msg)
        err.__cause__ = OperationalError("INSERT ...", {}, sqlite3.OperationalError(msg))
        return err

    assert is_transient(wrapped("database or disk is full"))
    assert is_transient(wrapped("database is locked"))
    assert not is_transient(wrapped("no such table: units"))
