"""Drivers as real subprocesses: SIGKILL at several moments then resume, Ctrl-C, two drivers.

The module owns one Ray session; each driver joins it (`--address`), so a killed driver's
actors die with it as on a cluster. Units sleep UNISWEEP_TEST_UNIT_DELAY_S to be killable.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.orch_helpers import (
    UNIT_DELAY_ENV,
    check_complete,
    cli,
    sigkill,
    spec_dict,
    start_ray,
    stop_ray,
    units,
    wait_for,
    write_spec,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    addr = start_ray(tmp_path_factory.mktemp("ray"), env={UNIT_DELAY_ENV: "0.2"})
    yield addr
    stop_ray((UNIT_DELAY_ENV,))


def _args(address: str, db_url: str) -> list[str]:
    return ["--db", db_url, "--address", address, "--no-ship", "--no-progress"]


def _store(db_url: str):  # noqa: ANN202
    from db.store import connect

    return connect(db_url)


def _planned(spec_path: Path) -> set[str]:
    from orchestrator.planner import plan
    from orchestrator.spec import load_spec

    return {u.key for u in plan(load_spec(spec_path)).units}


def _count(store, sweep: str, status: str) -> int:  # noqa: ANN001
    return sum(r["status"] == status for r in units(store, sweep))


def test_sigkill_driver_then_resume(address: str, db_url: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml", spec_dict("killed", tmp_path / "out",
                                                       resources={"cpus_per_actor": 1}))
    # Moment 1: right after the first lease, before anything is done.
    p = cli("run", str(spec), "--actors", "1", *_args(address, db_url))
    assert wait_for(lambda: _sweep_ready(db_url, "killed"), 60)
    store = _store(db_url)
    assert wait_for(lambda: _count(store, "killed", "leased") >= 1, 60)
    sigkill(p)
    assert _count(store, "killed", "done") == 0
    # Moment 2: a second run (adds no unit), killed once a few more units are done.
    p = cli("run", str(spec), "--actors", "1", *_args(address, db_url))
    assert wait_for(lambda: _count(store, "killed", "done") >= 3, 90)
    sigkill(p)
    done_mid = _count(store, "killed", "done")
    assert 3 <= done_mid < 12
    # Final resume: finishes, exit 0, and the result set is exactly the planned one.
    p = cli("resume", "killed", "--actors", "1", *_args(address, db_url))
    out, _ = p.communicate(timeout=180)
    assert p.returncode == 0, out
    assert "12 done, 0 failed" in out
    got = check_complete(store, "killed", _planned(spec))
    assert got["units"] == 12
    store.close()


def test_ctrl_c_releases_leases(address: str, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'u.db'}"  # releasing is one UPDATE: SQLite is enough here
    spec = write_spec(tmp_path / "s.yaml", spec_dict("ctrlc", tmp_path / "out",
                                                       resources={"cpus_per_actor": 1}))
    p = cli("run", str(spec), "--actors", "1", *_args(address, db_url))
    assert wait_for(lambda: _sweep_ready(db_url, "ctrlc"), 60)
    store = _store(db_url)
    assert wait_for(lambda: _count(store, "ctrlc", "done") >= 2, 60)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 130, out
    assert "leases released" in out
    rows = units(store, "ctrlc")
    assert not [r for r in rows if r["status"] == "leased"]
    assert all(r["attempts"] == 0 for r in rows if r["status"] == "pending")
    assert store.get_sweep("ctrlc").status == "stopped"
    store.close()


def _sweep_ready(db_url: str, name: str) -> bool:
    try:
        s = _store(db_url)
        try:
            return bool(units(s, name))
        finally:
            s.close()
    except Exception:  # noqa: BLE001 (not created yet)
        return False


@pytest.mark.postgres
def test_two_drivers_same_sweep(address: str, tmp_path: Path) -> None:
    """Two drivers, one sweep, one PostgreSQL: every unit done exactly once, both exit 0."""
    from tests.fixtures_db import make_db_url

    with make_db_url("postgres", tmp_path) as db_url:
        spec = write_spec(tmp_path / "s.yaml", spec_dict(
            "twodrivers", tmp_path / "out", prompts={"T": 4, "count": 3},
            resources={"cpus_per_actor": 1}))
        procs = [cli("run", str(spec), "--actors", "1", *_args(address, db_url)) for _ in range(2)]
        outs = [p.communicate(timeout=240)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        store = _store(db_url)
        planned = _planned(spec)
        check_complete(store, "twodrivers", planned)
        rows = units(store, "twodrivers")
        assert all(r["attempts"] == 1 for r in rows)  # no unit was ever run twice
        owners = {r["lease_owner"] for r in rows}
        assert len(owners) == 2, owners  # both drivers' actors did work
        assert sum(f"{len(planned)} units planned" in o or "units planned" in o for o in outs) == 2
        store.close()
