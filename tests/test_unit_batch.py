"""Several units in shared engine calls (tasks.run_unit.run_units, lease.batch): the same rows
as one unit at a time, a failing unit failing alone, and a batched worker draining a sweep."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import tasks.run_unit as run_unit_mod
from orchestrator.actor import UnitRunner
from orchestrator.planner import plan
from orchestrator.spec import spec_from_dict
from orchestrator.submit import submit
from tasks.errors import InvalidInput, UnisweepError
from tasks.models import load_model
from tasks.run_unit import NonFiniteResponse, plan_calls, run_unit_tables, run_units
from tasks.work import UnitWork
from tests.orch_helpers import check_complete, spec_dict, units

SORT = ["prompt_kind", "lp", "j", "eps", "direction", "l", "i"]
HEAD_SORT = ["prompt_kind", "lp", "j", "eps", "direction", "l", "head", "i"]


@pytest.fixture(scope="module")
def lm64():
    return load_model("tiny:llama", dtype="float64", check=False)


def _works(tmp_path: Path, **over: object) -> list[UnitWork]:
    # spec_dict: 12 cells per position, so one (prompt, lp, j) per unit; 2 x 2 x 3 = 12 units.
    d = spec_dict("b", tmp_path / "out", dtype="float64", **over)
    return [u.work for u in plan(spec_from_dict(d)).units]


def _sorted(t: pa.Table, keys: list[str]) -> pa.Table:
    return t.sort_by([(k, "ascending") for k in keys])


def _same(a: pa.Table, b: pa.Table, keys: list[str]) -> None:
    a, b = _sorted(a, keys), _sorted(b, keys)
    assert a.num_rows == b.num_rows > 0 and a.schema == b.schema
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        if pa.types.is_floating(a.schema.field(name).type):
            xa = np.array([np.nan if v is None else v for v in x], dtype=float)
            ya = np.array([np.nan if v is None else v for v in y], dtype=float)
            assert np.array_equal(np.isnan(xa), np.isnan(ya)), name
            np.testing.assert_allclose(xa, ya, rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=name)
        else:
            assert x == y, name


def _count_engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[int], list[int]]]:
    calls: list[tuple[list[int], list[int]]] = []
    real = run_unit_mod.compute_tables

    def counting(lm, prompts, lps, positions, *a, **k):  # noqa: ANN001, ANN202
        calls.append((list(lps), list(positions)))
        return real(lm, prompts, lps, positions, *a, **k)

    monkeypatch.setattr(run_unit_mod, "compute_tables", counting)
    return calls


def test_plan_calls_merge_only_full_products(tmp_path: Path) -> None:
    works = _works(tmp_path)
    assert len(works) == 12 and all(len(w.positions) == 1 for w in works)
    calls = plan_calls(works)
    # Per prompt id, lps {0, 1} x positions {1, 2, 3}: one call of 6 units each.
    assert sorted((lps, pos, len(idx)) for idx, lps, pos in calls) == [
        ([0, 1], (1, 2, 3), 6), ([0, 1], (1, 2, 3), 6)]
    assert sorted(i for idx, _, _ in calls for i in idx) == list(range(12))
    # Not a product: lp 0 at {1, 2}, lp 1 at {1}: two calls, no cell computed for nobody.
    pick = [w for w in works if w.prompt.id == 0 and (w.lp, w.positions[0]) in
            {(0, 1), (0, 2), (1, 1)}]
    assert sorted((lps, pos) for _, lps, pos in plan_calls(pick)) == [([0], (1, 2)), ([1], (1,))]
    # Different eps (or any other setting): never merged.
    other = dataclasses.replace(works[1], eps=(0.5,))
    assert len(plan_calls([works[0], other])) == 2


@pytest.mark.parametrize("heads", [False, True])
def test_run_units_equals_run_unit_row_for_row(tmp_path: Path, lm64, heads: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    works = _works(tmp_path, **({"record": {"heads": True, "head_offsets": "all"}} if heads else {}))
    # A non-product subset too (prompt 0: lp 0 at j 1, 2 and lp 1 at j 1), and all 12 units.
    pick = [w for w in works if w.prompt.id == 0 and (w.lp, w.positions[0]) in
            {(0, 1), (0, 2), (1, 1)}]
    for batch in (pick, works):
        alone = [run_unit_tables(lm64, w, sweep="b") for w in batch]
        calls = _count_engine_calls(monkeypatch)
        together = run_units(lm64, batch, sweep="b")
        monkeypatch.undo()
        assert len(calls) == len(plan_calls(batch)) < len(batch)
        for w, (t1, h1), res in zip(batch, alone, together, strict=True):
            assert not isinstance(res, Exception), res
            t2, h2 = res
            assert t2.num_rows == w.expected_rows(2 * w.prompt.T + 1)
            assert set(t2.column("unit_key").to_pylist()) == {w.key()}
            assert set(t2.column("j").to_pylist()) == set(w.positions)
            assert set(t2.column("lp").to_pylist()) == {w.lp}
            _same(t1, t2, SORT)
            if heads:
                assert h1 is not None and h2 is not None
                _same(h1, h2, HEAD_SORT)
            else:
                assert h1 is None and h2 is None


def test_a_failing_unit_fails_alone(tmp_path: Path, lm64, monkeypatch: pytest.MonkeyPatch) -> None:
    works = [w for w in _works(tmp_path) if w.prompt.id == 0]  # 6 units, one merged call
    # A bad input in one unit (a position past the prompt): the merged call raises, each
    # unit then runs alone and only the bad one fails.
    bad = dataclasses.replace(works[2], positions=(99,))
    batch = works[:2] + [bad] + works[3:]
    calls = _count_engine_calls(monkeypatch)
    out = run_units(lm64, batch, sweep="b")
    # lp 0's call (j 1, 2, 99) raises and its three units run alone; lp 1's stands.
    assert sorted(calls) == [([0], [1]), ([0], [1, 2, 99]), ([0], [2]), ([0], [99]),
                             ([1], [1, 2, 3])]
    assert isinstance(out[2], InvalidInput)
    for w, res in zip(batch, out, strict=True):
        if w is not bad:
            assert res[0].num_rows == w.expected_rows(9)
    monkeypatch.undo()
    # A NaN in one unit's rows only (the engine made to write one): the merged call stands,
    # the unit's own check fails it; the others keep their rows.
    real = run_unit_mod.compute_tables

    def nan_at_j2(*a, **k):  # noqa: ANN002, ANN003, ANN202
        table, heads = real(*a, **k)
        r = pc.if_else(pc.equal(table.column("j"), 2), float("nan"), table.column("r"))
        return table.set_column(table.schema.get_field_index("r"), "r", r), heads

    monkeypatch.setattr(run_unit_mod, "compute_tables", nan_at_j2)
    out = run_units(lm64, works, sweep="b")
    for w, res in zip(works, out, strict=True):
        if 2 in w.positions:
            assert isinstance(res, NonFiniteResponse) and "r: " in str(res)
        else:
            assert res[0].num_rows == w.expected_rows(9)


def test_batched_runner_drains_a_sweep_and_a_bad_unit_fails_alone(
        tmp_path: Path, lm64, monkeypatch: pytest.MonkeyPatch) -> None:
    db_url = f"sqlite:///{tmp_path / 'u.db'}"
    d = spec_dict("batched", tmp_path / "out", dtype="float64", lease={"ttl_s": 30, "heartbeat_s": 5,
                                                      "max_attempts": 2, "batch": 5})
    spec = spec_from_dict(d)
    store, the_plan, added = submit(spec, db_url)
    assert added == 12 and spec.lease.batch == 5
    info = store.get_sweep("batched")
    group = the_plan.units[0].group
    calls = _count_engine_calls(monkeypatch)
    runner = UnitRunner(db_url, info.id, "batched", group, info.output_dir, ttl_s=30,
                        heartbeat_s=5, max_attempts=2, threads=1, batch=spec.lease.batch)
    counts = runner.run()
    assert counts["units"] == counts["done"] == 12
    # Leases of 5, 5, 2 in plan order; each lease's units of one prompt share a call.
    merged = [c for c in calls if len(c[0]) * len(c[1]) > 1]
    assert merged and len(calls) < 12
    check_complete(store, "batched", {u.key for u in the_plan.units})
    assert store.leased_by(runner.worker_id) == []
    # Exactly the rows of one unit at a time, read back from the shards.
    for r in units(store, "batched")[:4]:
        work = UnitWork.from_json(json.loads(r["params"]))
        _same(run_unit_tables(lm64, work, sweep="batched")[0], pq.read_table(r["result_path"]), SORT)
    monkeypatch.undo()

    # Second sweep: the engine refuses one position (lp 1, j 3) of prompt 0; the merged calls
    # that hold it fall back to one unit at a time: that unit fails (attempts counted), the
    # others are done.
    d2 = dict(d, name="batched-bad", output=str(tmp_path / "out2"), eps=[1e-3, 2e-2])  # new keys
    store2, plan2, _ = submit(spec_from_dict(d2), db_url)
    info2 = store2.get_sweep("batched-bad")
    real = run_unit_mod.compute_tables

    def refuse(lm, prompts, lps, positions, *a, **k):  # noqa: ANN001, ANN202
        if prompts[0].id == 0 and 1 in lps and 3 in positions:
            raise UnisweepError("refused (test)")
        return real(lm, prompts, lps, positions, *a, **k)

    monkeypatch.setattr(run_unit_mod, "compute_tables", refuse)
    runner2 = UnitRunner(db_url, info2.id, "batched-bad", group, info2.output_dir, ttl_s=30,
                         heartbeat_s=5, max_attempts=2, threads=1, batch=5)
    counts2 = runner2.run()
    rows = units(store2, "batched-bad")
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["attempts"] == 2 and "refused (test)" in failed[0]["error"]
    params = json.loads(failed[0]["params"])
    assert (params["prompt"]["id"], params["lp"], params["positions"]) == (0, 1, [3])
    assert sum(r["status"] == "done" for r in rows) == 11
    assert counts2["done"] == 11 and counts2["failed"] == 1 and counts2.get("retry") == 1
    store.close()
    store2.close()


def test_lease_batch_is_validated(tmp_path: Path) -> None:
    for bad in (0, -1, "many", 1.5):
        d = spec_dict("v", tmp_path / "out", lease={"batch": bad})
        with pytest.raises(InvalidInput) as ei:
            spec_from_dict(d)
        assert ei.value.field == "lease.batch"
    assert spec_from_dict(spec_dict("v", tmp_path / "out", lease={})).lease.batch == 8


def test_retried_units_run_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Units whose worker died (lease expired) come back one at a time: a unit that kills
    its worker must not take the units leased beside it down again."""
    import time

    db_url = f"sqlite:///{tmp_path / 'r.db'}"
    d = spec_dict("retried", tmp_path / "out", lease={"ttl_s": 30, "heartbeat_s": 5,
                                                      "max_attempts": 3, "batch": 4})
    store, the_plan, _ = submit(spec_from_dict(d), db_url)
    info = store.get_sweep("retried")
    group = the_plan.units[0].group
    dead = store.lease("dead-worker", 4, 0.2, sweep_id=info.id, group=group)  # then it "dies"
    assert len(dead) == 4
    time.sleep(0.5)
    calls = _count_engine_calls(monkeypatch)
    runner = UnitRunner(db_url, info.id, "retried", group, info.output_dir, ttl_s=30,
                        heartbeat_s=5, max_attempts=3, threads=1, batch=4)
    assert runner.run()["done"] == 12
    check_complete(store, "retried", {u.key for u in the_plan.units})
    attempts = {r["unit_key"]: r["attempts"] for r in units(store, "retried")}
    retried = {u.key for u in dead}
    assert {attempts[k] for k in retried} == {2} and {
        v for k, v in attempts.items() if k not in retried} == {1}
    # The 4 retried units (prompt 0: lp 0 at j 1, 2, 3 and lp 1 at j 1) ran one per call.
    singles = [c for c in calls if len(c[0]) == 1 and len(c[1]) == 1]
    assert len(singles) >= 4 and len(calls) < 12
    store.close()


def test_full_disk_gives_the_whole_batch_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import orchestrator.actor as actor_mod
    from orchestrator.actor import WorkerEnvironmentError

    monkeypatch.setattr(actor_mod, "ENV_BACKOFF_S", 0.01)
    db_url = f"sqlite:///{tmp_path / 'd.db'}"
    d = spec_dict("diskfull", tmp_path / "out", lease={"ttl_s": 30, "heartbeat_s": 5,
                                                       "max_attempts": 2, "batch": 4})
    store, the_plan, _ = submit(spec_from_dict(d), db_url)
    info = store.get_sweep("diskfull")

    def disk_full(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(actor_mod, "write_shard", disk_full)
    runner = UnitRunner(db_url, info.id, "diskfull", the_plan.units[0].group, info.output_dir,
                        ttl_s=30, heartbeat_s=5, max_attempts=2, threads=1, batch=4)
    with pytest.raises(WorkerEnvironmentError, match="3 units in a row failed on this machine"):
        runner.run()
    rows = units(store, "diskfull")
    assert {r["status"] for r in rows} == {"pending"} and {r["attempts"] for r in rows} == {0}
    assert sum(bool(r["error"]) for r in rows) == 1  # the first unit, tried 3 times
    assert store.leased_by(runner.worker_id) == []
    store.close()
