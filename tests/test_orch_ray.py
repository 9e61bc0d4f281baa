"""The driver and actors on a real local Ray session: complete sweeps, widening, NaN, dead actors.

One Ray session for the module; each unit sleeps UNISWEEP_TEST_UNIT_DELAY_S so a test can kill
an actor in the middle of one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from orchestrator.driver import Driver, actor_plan, submit
from orchestrator.spec import Resources, spec_from_dict
from tasks.errors import UnisweepError
from tasks.layout import ENGINE_SCHEMA, SHARD_SCHEMA
from tasks.run_unit import NonFiniteResponse, add_unit_columns, check_finite
from tests.orch_helpers import (
    ACTOR_START_S,
    UNIT_DELAY_ENV,
    check_complete,
    spec_dict,
    start_ray,
    stop_ray,
    units,
    wait_for,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
DELAY = "0.2"


@pytest.fixture(scope="module")
def ray_delay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    addr = start_ray(tmp_path_factory.mktemp("ray"), env={UNIT_DELAY_ENV: DELAY})
    yield addr
    stop_ray((UNIT_DELAY_ENV,))


# ---- pure parts -------------------------------------------------------------------------------


def test_actor_plan() -> None:
    res = Resources()
    gpu = actor_plan(res, {"CPU": 16, "GPU": 4})
    assert (gpu.n, gpu.options["num_gpus"], gpu.device) == (4, 1.0, "gpu")
    assert actor_plan(Resources(gpus_per_actor=2), {"CPU": 16, "GPU": 4}).n == 2
    assert actor_plan(Resources(actors_per_node=1), {"CPU": 16, "GPU": 4}, n_nodes=2).n == 2
    cpu = actor_plan(Resources(cpu_actors=2), {"CPU": 2})
    assert (cpu.n, cpu.options, cpu.device) == (2, {"num_cpus": 1}, "cpu")
    assert actor_plan(Resources(cpu_actors=1), {"CPU": 2}).options == {"num_cpus": 2}
    with pytest.raises(UnisweepError, match="cpu_fallback is false"):
        actor_plan(Resources(cpu_fallback=False), {"CPU": 8})


def test_check_finite_and_unit_columns() -> None:
    rows = {f.name: [] for f in ENGINE_SCHEMA}
    for r, kl in ((0.5, None), (float("nan"), None), (0.1, float("inf"))):
        for k, v in zip(rows, (0, "repeat", 0, 1, 1e-3, 0, 0, 1, r, None, None, kl), strict=True):
            rows[k].append(v)
    t = pa.Table.from_pydict(rows, schema=ENGINE_SCHEMA)
    with pytest.raises(NonFiniteResponse, match=r"r: 1 of 3 rows; kl: 1 of 3 rows"):
        check_finite(t)
    check_finite(t.slice(0, 1))  # NULLs (r_attn at l = L, kl off l = L) are not errors
    s = add_unit_columns(t, sweep="s", unit_key="k", model="m", dtype="float32", T=4, n_layers=2)
    assert s.schema == SHARD_SCHEMA and s.num_rows == 3


# ---- on Ray -----------------------------------------------------------------------------------


def _run(spec_d: dict, db_url: str, **kw: object) -> tuple[object, object, set[str]]:
    spec = spec_from_dict(spec_d)
    store, plan, _ = submit(spec, db_url)
    summary = Driver(store, spec.name, spec, db_url, progress=False, **kw).run()
    return store, summary, {u.key for u in plan.units}


def test_sweep_resubmit_and_widen(ray_delay: str, db_url: str, tmp_path: Path) -> None:
    d = spec_dict("widen", tmp_path / "out")
    spec = spec_from_dict(d)
    store, plan1, added1 = submit(spec, db_url)
    keys = {u.key for u in plan1.units}
    assert added1 == len(keys) == 12
    # The same spec again adds nothing.
    _, plan2, added2 = submit(spec, db_url)
    assert (len(plan2.units), added2) == (0, 0)
    # A wider eps grid: only units for the new eps values; old units keep their keys.
    wide = spec_from_dict(dict(d, eps=[1e-4, 1e-3, 1e-2, 1e-1]))
    _, plan3, added3 = submit(wide, db_url)
    new_keys = {u.key for u in plan3.units}
    assert added3 == len(new_keys) == 12 and new_keys.isdisjoint(keys)
    new_eps = {float(e) for r in units(store, "widen") if r["unit_key"] in new_keys
               for e in json.loads(r["params"])["eps"]}
    assert new_eps == {1e-4, 1e-1}
    summary = Driver(store, "widen", wide, db_url, progress=False, actors=2).run()
    assert summary.counts == {"pending": 0, "leased": 0, "done": 24, "failed": 0}
    assert summary.cells_this_run == 12 * (2 * 2 * 3) + 12 * (2 * 2 * 2)
    got = check_complete(store, "widen", keys | new_keys)
    assert got["units"] == 24
    # Nothing left: a second run does not even start Ray actors.
    again = Driver(store, "widen", wide, db_url, progress=False, actors=2).run()
    assert again.cells_this_run == 0 and again.counts["done"] == 24
    store.close()


def test_batched_leases_exact_rows(ray_delay: str, tmp_path: Path) -> None:
    """lease.batch 5 on 2 actors: every unit done once, each shard exactly the rows (and,
    in float64, the values to 1e-9) that one unit computed alone gives."""
    import pyarrow.parquet as pq

    from tasks.models import load_model
    from tasks.run_unit import run_unit_tables
    from tasks.work import UnitWork
    from tests.test_unit_batch import SORT, _same

    db_url = f"sqlite:///{tmp_path / 'b.db'}"
    d = spec_dict("rbatch", tmp_path / "out", dtype="float64",
                  lease={"ttl_s": 30, "heartbeat_s": 1, "max_attempts": 2, "batch": 5})
    store, summary, keys = _run(d, db_url, actors=2)
    assert summary.counts["done"] == 12 and check_complete(store, "rbatch", keys)["units"] == 12
    lm = load_model("tiny:llama", dtype="float64", check=False)
    for r in units(store, "rbatch"):
        work = UnitWork.from_json(json.loads(r["params"]))
        _same(run_unit_tables(lm, work, sweep="rbatch", unit_key=r["unit_key"])[0],
              pq.read_table(r["result_path"]), SORT)
    store.close()


def test_nan_response_fails_unit(ray_delay: str, db_url: str, tmp_path: Path) -> None:
    # eps = 1e30 overflows the residual stream: the responses are NaN and must never be data.
    d = spec_dict("nan", tmp_path / "out", eps=[1e-2, 1e30], linear=False, cells_per_unit=4,
                  layers=[0], positions=[1], prompts={"T": 4, "count": 1}, lease={"ttl_s": 3, "heartbeat_s": 0.5, "max_attempts": 2})
    store, summary, keys = _run(d, db_url, actors=1)
    rows = {float(json.loads(r["params"])["eps"][0]): r for r in units(store, "nan")}
    assert set(rows) == {1e-2, 1e30}
    assert rows[1e-2]["status"] == "done"
    bad = rows[1e30]
    assert bad["status"] == "failed" and bad["attempts"] == 2
    assert "non-finite response" in bad["error"] and bad["result_path"] is None
    assert len(store.done_shards("nan")) == 1
    assert summary.counts["failed"] == 1 and summary.failed[0].key == bad["unit_key"]
    store.close()


def test_kill_actor_mid_unit(ray_delay: str, tmp_path: Path) -> None:
    """ray.kill an actor while it computes: the unit is re-leased and done exactly once.

    SQLite only: the lease/fail statements are the same on both backends (tests/test_db_*),
    and the driver-kill tests run on PostgreSQL too."""
    db_url = f"sqlite:///{tmp_path / 'u.db'}"
    import ray

    from db.store import connect

    # One unit per lease, so that exactly one unit is in flight when the actor dies (with
    # lease.batch k, every unit the actor holds counts the attempt).
    d = spec_dict("killactor", tmp_path / "out", lease={"ttl_s": 3, "heartbeat_s": 0.5,
                                                        "max_attempts": 3, "batch": 1})
    spec = spec_from_dict(d)
    store, plan, _ = submit(spec, db_url)
    keys = {u.key for u in plan.units}
    driver = Driver(store, spec.name, spec, db_url, progress=False, actors=2)
    result: dict[str, object] = {}
    th = threading.Thread(target=lambda: result.update(summary=driver.run()), daemon=True)
    th.start()
    probe = connect(db_url)
    # Wait until both actors are up (the driver itself gives up after ACTOR_START_S: start-up
    # time depends on the machine's load, not on the code under test), then until some actor
    # holds a lease, and kill that very actor mid-unit.
    assert wait_for(lambda: len(driver.slots) == 2 or not th.is_alive(), ACTOR_START_S)
    assert wait_for(lambda: any(r["status"] == "leased" for r in units(probe, spec.name)), 60)
    leased = next(r for r in units(probe, spec.name) if r["status"] == "leased")
    victim = next(s for s in driver.slots if s.worker_id == leased["lease_owner"])
    ray.kill(victim.actor, no_restart=False)
    th.join(timeout=120)
    assert not th.is_alive()
    summary = result["summary"]
    assert summary.actor_deaths == 1 and summary.counts["done"] == len(keys)
    check_complete(probe, spec.name, keys)
    row = probe.unit(leased["unit_key"])
    assert row["status"] == "done" and row["attempts"] == 2
    assert row["lease_owner"] != leased["lease_owner"]
    assert sorted(r["attempts"] for r in units(probe, spec.name)).count(1) == len(keys) - 1
    probe.close()
    store.close()


def test_several_models_no_reload(ray_delay: str, tmp_path: Path) -> None:
    """Two models, one actor slot: each actor serves one (model, dtype) group only."""
    db_url = f"sqlite:///{tmp_path / 'u.db'}"  # grouping is backend-independent
    d = spec_dict("multi", tmp_path / "out", models=["tiny:llama", "tiny:gpt2"], layers=[0],
                  positions=[1, 2])
    store, summary, keys = _run(d, db_url, actors=1)
    rows = units(store, "multi")
    assert {r["group"] for r in rows} == {"tiny:llama|float32", "tiny:gpt2|float32"}
    groups_of: dict[str, set[str]] = {}
    for r in rows:
        groups_of.setdefault(r["lease_owner"], set()).add(r["group"])
    assert len(groups_of) == 2 and all(len(g) == 1 for g in groups_of.values()), groups_of
    check_complete(store, "multi", keys)
    models = {json.loads(r["params"])["run"]["model"] for r in rows}
    assert models == {"tiny:llama", "tiny:gpt2"}
    store.close()
