"""A sweep whose shards go to S3 (SeaweedFS on 127.0.0.1): kill -9 of the driver mid-sweep,
resume, and exactly the planned rows in the bucket; `verify` and `query` over them. A sweep
that records heads: exactly the planned rows in both the shard and the head_responses file of
every unit, the `heads` view over them, and a changed head object recomputed by
`retry --bad-shards`.

The driver is a real subprocess joining this module's Ray session; endpoint and credentials
reach it and the actors only through the standard AWS variables.
"""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from db import storage
from db.shards import head_shard, heads_path, shard_files
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


# tiny:llama (tasks.models): 4 blocks of 4 heads.
TINY_LAYERS, TINY_HEADS = 4, 4


def _planned_rows(params: dict) -> set[tuple]:
    """(prompt_kind, direction, j, eps, l, i) of every shard row a unit must hold: each kind and
    direction, at its position j, each eps and the linear limit (eps NULL), levels l = lp..L,
    positions i >= j."""
    n = 2 * params["prompt"]["T"] + 1
    eps = [*params["eps"], None] if params["linear"] else list(params["eps"])
    return {(k, d, j, e, lvl, i) for k, d, j, e, lvl, i in itertools.product(
        params["prompt"]["kinds"], range(params["directions"]["count"]), params["positions"], eps,
        range(params["lp"], TINY_LAYERS + 1), range(n)) if i >= j}


def _planned_head_rows(params: dict) -> set[tuple]:
    """(prompt_kind, direction, j, eps, l, head, i) of every head row: blocks l = lp..L-1, each
    head, at the kept offsets i - j (record.heads.offsets) that fall inside the prompt."""
    n = 2 * params["prompt"]["T"] + 1
    eps = [*params["eps"], None] if params["linear"] else list(params["eps"])
    offsets = params["record"]["heads"]["offsets"]
    return {(k, d, j, e, lvl, h, j + o) for k, d, j, e, lvl, h, o in itertools.product(
        params["prompt"]["kinds"], range(params["directions"]["count"]), params["positions"], eps,
        range(params["lp"], TINY_LAYERS), range(TINY_HEADS), offsets) if j + o < n}


def _rows_of(path: str, cols: tuple[str, ...]) -> list[tuple]:
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    t = pq.read_table(p, filesystem=fs)
    return list(zip(*(t.column(c).to_pylist() for c in cols), strict=True))


def _query(db_url: str, sweep: str, sql: str) -> list[list[str]]:
    """`unisweep query` in a fresh process: the CSV rows after the header."""
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "query", sql, "--sweep", sweep,
                          "--db", db_url, "--format", "csv"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return list(csv.reader(res.stdout.strip().splitlines()))[1:]


def _offset_class(i: int, j: int, T: int) -> str:
    """analysis.views.OFFSET_CLASS_SQL, restated for the offsets this test keeps."""
    if i == j:
        return "diagonal"
    if 1 <= j <= T and i - j in (T - 1, T):
        return "induction_T-1" if i - j == T - 1 else "induction_T"
    return "near" if 1 <= i - j <= 3 else "background"


def test_heads_sweep_to_s3_then_retry_bad_shards(address: str, s3_server: S3Server,
                                                 tmp_path: Path) -> None:
    from db.store import connect
    from orchestrator.planner import plan
    from orchestrator.spec import load_spec

    db_url = f"sqlite:///{tmp_path / 'h.db'}"
    output = s3_server.uri("sweeps", "heads")
    spec = write_spec(tmp_path / "h.yaml", spec_dict(
        "s3heads", Path("unused"), output=output, layers=[1], positions=[1, 5],
        record={"heads": True}, resources={"cpus_per_actor": 1}))
    args = ["--db", db_url, "--address", address, "--no-ship", "--no-progress"]
    p = cli("run", str(spec), *args)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "4 done, 0 failed" in out

    store = connect(db_url)
    rows = units(store, "s3heads")
    assert {r["unit_key"] for r in rows} == {u.key for u in plan(load_spec(spec)).units}
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    shard_cols = ("prompt_kind", "direction", "j", "eps", "l", "i")
    head_cols = ("prompt_kind", "direction", "j", "eps", "l", "head", "i")
    files, total, total_heads, classes = set(), 0, 0, Counter()
    for r in rows:
        params = json.loads(r["params"])
        assert params["run"]["n_layers"] == TINY_LAYERS
        got = _rows_of(r["result_path"], shard_cols)
        assert len(got) == len(set(got)) == r["result_rows"] == expected_rows(params, TINY_LAYERS)
        assert set(got) == _planned_rows(params)
        info = head_shard(r["result_path"])
        assert info is not None and info.path == heads_path(r["result_path"])
        assert info.path.startswith(f"{output}/shards/s3heads/")
        got = _rows_of(info.path, head_cols)
        assert len(got) == len(set(got)) == info.rows
        assert set(got) == _planned_head_rows(params)
        classes.update(_offset_class(i, j, params["prompt"]["T"]) for *_, j, _, _, _, i in got)
        files |= {r["result_path"], info.path}
        total += r["result_rows"]
        total_heads += info.rows
    assert set(shard_files(output, "s3heads")) == files  # the shard and head file of each unit
    assert store.verify("s3heads").ok and store.orphans("s3heads", include_in_flight=True) == []

    # The `heads` view reads the head objects from the bucket (in a fresh process).
    by_class = _query(db_url, "s3heads", "SELECT offset_class, count(*) AS n FROM heads "
                                         "GROUP BY offset_class")
    assert {c: int(n) for c, n in by_class} == classes and sum(classes.values()) == total_heads
    assert set(classes) == {"diagonal", "near", "induction_T-1", "induction_T"}
    assert _query(db_url, "s3heads", "SELECT count(*) FROM responses") == [[str(total)]]

    # A head object changed in the bucket (same size): verify names it, query refuses, and
    # `retry --bad-shards` recomputes that unit through the same storage layer.
    victim = rows[0]
    hp = heads_path(victim["result_path"])
    fs, p = storage.resolve(hp)
    with fs.open_input_stream(p) as f:
        body = bytearray(f.read())
    body[len(body) // 2] ^= 0xFF
    with fs.open_output_stream(p) as f:
        f.write(bytes(body))
    [problem] = store.verify("s3heads").problems
    assert problem.key == victim["unit_key"] and "head_responses" in problem.reason
    store.close()
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "query", "SELECT 1",
                          "--sweep", "s3heads", "--db", db_url], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "head_responses" in res.stderr, res.stderr
    p = cli("retry", "s3heads", "--bad-shards", *args)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "1 units requeued" in out and "4 done, 0 failed" in out

    store = connect(db_url)
    after = {r["unit_key"]: r for r in units(store, "s3heads")}
    fresh = after[victim["unit_key"]]
    assert fresh["status"] == "done" and fresh["result_path"] != victim["result_path"]
    params = json.loads(fresh["params"])
    assert set(_rows_of(heads_path(fresh["result_path"]), head_cols)) == _planned_head_rows(params)
    assert store.verify("s3heads").ok
    # The bad pair is garbage now: gc removes exactly it.
    assert set(store.gc("s3heads")) == {victim["result_path"], hp}
    assert len(shard_files(output, "s3heads")) == 8
    store.close()
    assert _query(db_url, "s3heads", "SELECT count(*) FROM heads") == [[str(total_heads)]]
