"""A sweep whose shards go to S3 (SeaweedFS on 127.0.0.1): kill -9 of the driver mid-sweep,
resume, and exactly the planned rows in the bucket; `verify` and `query` over them.

The driver is a real subprocess joining this module's Ray session; endpoint and credentials
reach it and the actors only through the standard AWS variables.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from db import storage
from db.shards import shard_files
from tests.fixtures_s3 import S3Server
from tests.orch_helpers import (
    ROOT,
    UNIT_DELAY_ENV,
    cli,
    expected_rows,
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
def address(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {**s3_server.env, UNIT_DELAY_ENV: "0.2"}
    storage.forget_filesystems()
    addr = start_ray(tmp_path_factory.mktemp("ray"), env=env)
    yield addr
    stop_ray(tuple(env))
    storage.forget_filesystems()


def _count(db_url: str, sweep: str, status: str) -> int:
    from db.store import connect

    try:
        store = connect(db_url, create=False)
    except Exception:  # noqa: BLE001 (not created yet)
        return 0
    try:
        return sum(r["status"] == status for r in units(store, sweep))
    except Exception:  # noqa: BLE001 (sweep not planned yet)
        return 0
    finally:
        store.close()


def test_sweep_to_s3_killed_then_resumed(address: str, s3_server: S3Server, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from db.store import connect
    from orchestrator.planner import plan
    from orchestrator.spec import load_spec

    db_url = f"sqlite:///{tmp_path / 'u.db'}"
    output = s3_server.uri("sweeps", "killed")
    spec = write_spec(tmp_path / "s.yaml", spec_dict("s3killed", Path("unused"), output=output,
                                                       resources={"cpus_per_actor": 1}))
    args = ["--db", db_url, "--address", address, "--no-ship", "--no-progress", "--actors", "1"]
    p = cli("run", str(spec), *args)
    assert wait_for(lambda: _count(db_url, "s3killed", "done") >= 3, 120), p.poll()
    sigkill(p)
    done_mid = _count(db_url, "s3killed", "done")
    assert 3 <= done_mid < 12

    p = cli("resume", "s3killed", *args)
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out
    assert "12 done, 0 failed" in out

    store = connect(db_url)
    rows = units(store, "s3killed")
    planned = {u.key for u in plan(load_spec(spec)).units}
    assert {r["unit_key"] for r in rows} == planned and len(rows) == 12
    assert all(r["status"] == "done" for r in rows)
    total = 0
    for r in rows:
        assert r["result_path"].startswith(f"{output}/shards/s3killed/")
        params = json.loads(r["params"])
        fs, path = storage.resolve(r["result_path"])
        t = pq.read_table(path, filesystem=fs)
        assert t.num_rows == r["result_rows"] == expected_rows(params, params["run"]["n_layers"])
        assert set(t.column("unit_key").to_pylist()) == {r["unit_key"]}
        total += t.num_rows
    assert store.verify("s3killed").ok
    # What the killed driver's actor left half-done is garbage, never data; gc clears it.
    done_paths = {r["result_path"] for r in rows}
    orphans = store.orphans("s3killed", include_in_flight=True)
    assert not set(orphans) & done_paths
    store.gc("s3killed", include_in_flight=True)
    assert set(shard_files(output, "s3killed")) == done_paths
    store.close()

    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "query",
                          "SELECT count(*) AS n, count(DISTINCT unit_key) AS u FROM responses",
                          "--sweep", "s3killed", "--db", db_url, "--format", "csv"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == f"{total},12"
