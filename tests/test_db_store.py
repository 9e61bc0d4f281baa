"""The Store API on SQLite and PostgreSQL: sweeps, units, leases, completion outcomes, status.

Every test gets a fresh database (file or schema) from tests/fixtures_db.py; no mocks.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import text

from db.migrate import head_revision
from db.shards import ShardInfo
from db.store import Store, UnitSpec, connect, mask_url
from tasks.errors import InvalidInput
from tests.fixtures_db import make_db_url

SHARD = ShardInfo("/data/x.parquet", 10, 100, "a" * 64)


def _sweep(store: Store, tmp_path: Path, n: int = 10, name: str = "s1", groups: tuple[str, ...] = ("g",)) -> int:
    sid = store.create_sweep(name, {"models": ["m"], "n": n}, "hash1", tmp_path)
    store.add_units(sid, [UnitSpec(f"{name}-u{i:03d}", groups[i % len(groups)], {"i": i}, 4) for i in range(n)])
    return sid


def test_migrations_land_in_own_schema(store: Store, db_url: str) -> None:
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head_revision()
        if store.dialect == "postgresql":
            schema = conn.execute(text("SELECT current_schema()")).scalar()
            assert schema.startswith("t_")
            tables = set(conn.execute(text(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = :s"), {"s": schema}
            ).scalars())
            assert {"alembic_version", "sweeps", "units", "workers"} <= tables
        else:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 1000
    again = connect(db_url)  # a second connect finds the schema at head: nothing to do
    assert again.revisions == (head_revision(), head_revision())
    again.close()


def test_create_sweep_idempotent_and_spec_conflict(store: Store, tmp_path: Path) -> None:
    sid = store.create_sweep("alpha", {"a": 1}, "h1", tmp_path)
    assert store.create_sweep("alpha", {"a": 1}, "h1", tmp_path) == sid
    with pytest.raises(InvalidInput, match="sweep") as exc:
        store.create_sweep("alpha", {"a": 2}, "h2", tmp_path)
    assert "h1" in str(exc.value) and "h2" in str(exc.value)
    with pytest.raises(InvalidInput, match="sweep"):
        store.create_sweep("bad/name", {}, "h", tmp_path)
    with pytest.raises(InvalidInput, match="one of: alpha"):
        store.status("nope")
    assert store.get_sweep("alpha").output_dir == str(tmp_path.resolve())


def test_add_units_insert_or_ignore(store: Store, tmp_path: Path) -> None:
    sid = store.create_sweep("s", {}, "h", tmp_path)
    specs = [UnitSpec(f"k{i}", None, {"i": i}, 2) for i in range(2500)]
    assert store.add_units(sid, specs) == 2500
    assert store.add_units(sid, specs[:100] + [UnitSpec("k-new", None, {}, 2)]) == 1
    assert store.status("s").units_total == 2501
    with pytest.raises(InvalidInput, match=r"units\[1\].key"):
        store.add_units(sid, [UnitSpec("ok", None, {}, 1), UnitSpec("bad key", None, {}, 1)])
    with pytest.raises(InvalidInput, match=r"units\[0\].n_cells"):
        store.add_units(sid, [UnitSpec("ok2", None, {}, -1)])
    assert store.unit("ok") is None  # validation happens before any write


def test_lease_group_order_and_args(store: Store, tmp_path: Path) -> None:
    _sweep(store, tmp_path, n=10, groups=("a", "b"))
    got = store.lease("w1", 3, 30, sweep_id="s1", group="b")
    assert [u.key for u in got] == ["s1-u001", "s1-u003", "s1-u005"]
    assert all(u.group == "b" and u.attempts == 1 and u.n_cells == 4 for u in got)
    assert got[0].params == {"i": 1}
    got2 = store.lease("w2", 100, 30, sweep_id="s1")
    assert len(got2) == 7 and not {u.key for u in got} & {u.key for u in got2}
    assert store.lease("w3", 5, 30, sweep_id="s1") == []
    with pytest.raises(InvalidInput, match="n"):
        store.lease("w1", 0, 30, sweep_id="s1")
    with pytest.raises(InvalidInput, match="ttl_s"):
        store.lease("w1", 1, -1, sweep_id="s1")


def test_complete_outcomes_change_nothing(store: Store, tmp_path: Path) -> None:
    _sweep(store, tmp_path, n=3)
    [u] = store.lease("w1", 1, 30, sweep_id="s1")
    assert store.complete(u.key, "intruder", SHARD, 1.0) == "not_leased"
    assert store.unit(u.key)["status"] == "leased" and store.unit(u.key)["result_path"] is None
    assert store.complete(u.key, "w1", SHARD, 2.5) == "done"
    before = store.unit(u.key)
    assert before["status"] == "done" and before["result_sha256"] == "a" * 64 and before["compute_s"] == 2.5
    other = ShardInfo("/data/other.parquet", 1, 1, "b" * 64)
    assert store.complete(u.key, "w1", other, 9.0) == "already_done"
    assert store.complete(u.key, "intruder", other, 9.0) == "already_done"
    assert store.unit(u.key) == before  # nothing changed
    assert store.complete("no-such-key", "w1", other) == "unknown"
    assert store.unit("no-such-key") is None
    # A pending (never leased) unit cannot be completed either.
    assert store.complete("s1-u002", "w1", other) == "not_leased"
    assert store.done_shards("s1") == [SHARD]


def test_fail_retry_then_failed_with_error(store: Store, tmp_path: Path) -> None:
    _sweep(store, tmp_path, n=1)
    for attempt in (1, 2):
        [u] = store.lease("w", 1, 30, sweep_id="s1")
        assert u.attempts == attempt
        assert store.fail(u.key, "w", f"boom {attempt}", max_attempts=3) == "retry"
    [u] = store.lease("w", 1, 30, sweep_id="s1")
    assert store.fail(u.key, "other", "x", max_attempts=3) == "not_leased"
    assert store.fail(u.key, "w", "CUDA out of memory", max_attempts=3) == "failed"
    assert store.fail(u.key, "w", "again", max_attempts=3) == "not_leased"
    assert store.lease("w", 1, 30, sweep_id="s1") == []
    st = store.status("s1")
    assert st.counts["failed"] == 1
    assert st.failed[0].attempts == 3 and "CUDA out of memory" in st.failed[0].error


def test_heartbeat_release_and_expiry(store: Store, tmp_path: Path) -> None:
    _sweep(store, tmp_path, n=4)
    a = store.lease("w1", 2, 0.6, sweep_id="s1")
    b = store.lease("w2", 2, 0.6, sweep_id="s1")
    assert store.heartbeat("w1", [u.key for u in a], 30) == 2
    assert store.heartbeat("w1", [b[0].key], 30) == 0  # not its lease
    time.sleep(0.8)
    # w2 stopped heartbeating: its units go to the next leaser, w1's extended leases hold.
    c = store.lease("w3", 10, 30, sweep_id="s1")
    assert sorted(u.key for u in c) == sorted(u.key for u in b)
    assert all(u.attempts == 2 for u in c)
    assert store.heartbeat("w2", None, 30) == 0  # w2 learns it lost them
    assert store.complete(b[0].key, "w2", SHARD) == "not_leased"
    assert store.release("w1") == 2
    again = store.lease("w4", 10, 30, sweep_id="s1")
    assert sorted(u.key for u in again) == sorted(u.key for u in a)
    assert all(u.attempts == 1 for u in again)  # a release does not count as an attempt


def test_reclaim_marks_poison_units_failed(store: Store, tmp_path: Path) -> None:
    _sweep(store, tmp_path, n=2)
    for _ in range(2):
        store.lease("w", 2, 0.05, sweep_id="s1", max_attempts=2)
        time.sleep(0.1)
    assert store.lease("w", 2, 30, sweep_id="s1", max_attempts=2) == []
    assert store.reclaim_expired("s1", max_attempts=2) == (0, 2)
    st = store.status("s1")
    assert st.counts["failed"] == 2 and "lease expired" in st.failed[0].error


def test_status_rate_eta_and_tables(store: Store, tmp_path: Path) -> None:
    _sweep(store, tmp_path, n=10)
    st = store.status("s1")
    assert (st.cells_total, st.cells_done, st.cells_per_s, st.eta_s) == (40, 0, None, None)
    units = store.lease("w", 5, 30, sweep_id="s1")
    time.sleep(0.2)
    for u in units:
        assert store.complete(u.key, "w", SHARD, 0.5) == "done"
    st = store.status("s1")
    assert st.counts == {"pending": 5, "leased": 0, "done": 5, "failed": 0}
    assert st.cells_done == 20 and st.compute_s == pytest.approx(2.5)
    # 20 cells in a bit over 0.2 s since the first start: < 100 cells/s (> 4 unless very slow).
    assert 4 < st.cells_per_s < 100
    assert st.eta_s == pytest.approx(20 / st.cells_per_s)
    # The speed is over the done units' compute window: it does not fall while time passes.
    time.sleep(0.3)
    assert store.status("s1").cells_per_s == pytest.approx(st.cells_per_s, rel=1e-6)
    t = store.table_arrow("units", "s1")
    assert t.num_rows == 10 and t.column("status").to_pylist().count("done") == 5
    assert t.column("sweep").to_pylist() == ["s1"] * 10
    sw = store.table_arrow("sweeps")
    assert sw.column("sweep").to_pylist() == ["s1"] and sw.column("spec_hash").to_pylist() == ["hash1"]
    with pytest.raises(InvalidInput, match="units | sweeps"):
        store.table_arrow("runs")


def test_workers(store: Store) -> None:
    store.register_worker("actor-0", host="node1", device="cuda:0", model="smollm2-135m")
    store.register_worker("actor-0", host="node2", device="cuda:1", model="gpt2")  # restart
    assert store.worker_heartbeat("actor-0") is True
    assert store.worker_heartbeat("ghost") is False
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT host, device, model FROM workers")).all()
    assert [tuple(r) for r in rows] == [("node2", "cuda:1", "gpt2")]


def test_mask_url() -> None:
    assert mask_url("postgresql://user:secret@host/db") == "postgresql://user:***@host/db"
    assert "secret" not in mask_url("postgresql+psycopg://u:secret@h:5432/d?sslmode=require")
    assert mask_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert "s3cr" not in mask_url("not a url://u:s3cr@x")


def test_models_match_migrations(store: Store) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from db.models import Base

    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []  # a model change without a migration fails here


@pytest.mark.postgres
def test_dropped_connections_are_survived(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with make_db_url("postgres", tmp_path) as db_url:
        _dropped_connections(db_url, tmp_path, caplog)


def _dropped_connections(db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = connect(db_url)
    _sweep(store, tmp_path, n=3)
    [u] = store.lease("w", 1, 30, sweep_id="s1")
    # Kill every pooled connection of this store, as a server restart or a firewall would.
    pids = set()
    for engine in (store.engine, store._hot_engine):
        with engine.connect() as conn:
            pids.add(conn.execute(text("SELECT pg_backend_pid()")).scalar())
    admin = connect(db_url)
    with admin.engine.connect() as conn:
        for pid in pids:
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        conn.commit()
    admin.close()
    time.sleep(0.2)  # the backends exit asynchronously
    with caplog.at_level("INFO", logger="unisweep.db"):
        assert store.complete(u.key, "w", SHARD, 1.0) == "done"  # hot path: retried once
    assert "retrying once" in caplog.text
    assert store.status("s1").counts["done"] == 1  # management path: pre-ping reconnects
    store.close()


def test_module_scoped_fixture(db_url_module: str, tmp_path: Path) -> None:
    # The shared fixture other areas use: a database that outlives one test, still isolated.
    with connect(db_url_module) as st:
        sid = st.create_sweep(f"m{tmp_path.name[-6:].replace('_', '')}", {}, "h", tmp_path)
        assert st.add_units(sid, [UnitSpec("mod-u1", None, {}, 1)]) == 1
        assert st.get_sweep(sid).id == sid


@pytest.mark.postgres
def test_password_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with make_db_url("postgres", tmp_path) as url:
        # The test server trusts local connections, so a password in the URL is accepted and unused.
        with_pw = url.replace("postgres@", "postgres:Pw-s3cret-42@", 1)
        assert "Pw-s3cret-42" in with_pw
        with caplog.at_level("DEBUG"):
            store = connect(with_pw)
            _sweep(store, tmp_path, n=2)
            [u] = store.lease("w", 1, 30, sweep_id="s1")
            store.complete(u.key, "w", SHARD)
            store.complete(u.key, "w", SHARD)  # logs the no-op
            store.close()
        assert store.url.startswith("postgresql+psycopg://postgres:***@")
        assert caplog.records and "Pw-s3cret-42" not in caplog.text
