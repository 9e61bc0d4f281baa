"""Units across sweeps and across failures (issue 15, items 1, 3 and 5), without Ray.

The worker (orchestrator.actor.UnitRunner) runs in this process on tiny:llama, so every unit
is really computed, its shard written and completed through the real Store.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import yaml

import orchestrator.actor as actor_mod
from orchestrator.actor import UnitRunner, WorkerEnvironmentError
from orchestrator.spec import spec_from_dict
from orchestrator.submit import submit
from tasks.run_unit import NonFiniteResponse
from tests.orch_helpers import check_complete, run_main, spec_dict, units

pytestmark = pytest.mark.slow  # real (tiny) model passes, a few seconds


def _drain(db_url: str, store, sweep: str) -> dict:  # noqa: ANN001
    """Run every open group of `sweep` to the end with in-process workers."""
    info = store.get_sweep(sweep)
    spec = spec_from_dict(info.spec)
    counts: dict = {}
    for group in sorted({r["group"] for r in units(store, sweep)}):
        runner = UnitRunner(db_url, info.id, sweep, group, info.output_dir, ttl_s=30,
                            heartbeat_s=5, max_attempts=spec.lease.max_attempts, threads=1)
        for k, v in runner.run().items():
            if k != "worker_id":
                counts[k] = counts.get(k, 0) + v
    return counts



def test_same_grid_new_sweep_sees_all_cells_computed_once(db_url: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    a = spec_from_dict(spec_dict("grid-a", out))
    store, plan_a, added = submit(a, db_url)
    assert added == len(plan_a.units) == 12
    keys_a = {u.key for u in plan_a.units}
    assert _drain(db_url, store, "grid-a")["done"] == 12
    rows_a = check_complete(store, "grid-a", keys_a)["rows"]
    before = {r["unit_key"]: (r["attempts"], r["lease_owner"], r["result_sha256"]) for r in units(store, "grid-a")}
    # Same grid, new name: all 12 units are the new sweep's, already done; nothing recomputed.
    b = spec_from_dict(spec_dict("grid-b", out))
    store_b, plan_b, added_b = submit(b, db_url)
    assert {u.key for u in plan_b.units} == keys_a and added_b == 12
    st = store.status("grid-b")
    assert st.counts == {"pending": 0, "leased": 0, "done": 12, "failed": 0}
    assert st.cells_done == st.cells_total == store.status("grid-a").cells_total
    assert {r["sweep"] for r in units(store, "grid-b")} == {"grid-b"}
    assert _drain(db_url, store, "grid-b") == {"units": 0}
    check_complete(store, "grid-b", keys_a)
    code, text, err = run_main(capsys, "query", "SELECT count(*) AS n FROM responses", "--sweep",
                               "grid-b", "--db", db_url, "-f", "json")
    assert code == 0 and json.loads(text) == [{"n": rows_a}], err
    # Every sweep in one view: the shared shards once, not twice.
    code, text, err = run_main(capsys, "query", "SELECT count(*) AS n FROM responses", "--db", db_url, "-f", "json")
    assert code == 0 and json.loads(text) == [{"n": rows_a}], err
    # A wider grid: only the new cells are computed; the old units keep keys and results.
    c = spec_from_dict(spec_dict("grid-c", out, positions=[1, 2, 3, 4]))
    store_c, plan_c, added_c = submit(c, db_url)
    assert added_c == 16 and keys_a < {r["unit_key"] for r in units(store, "grid-c")}
    assert _drain(db_url, store, "grid-c")["done"] == 4
    after = {r["unit_key"]: (r["attempts"], r["lease_owner"], r["result_sha256"]) for r in units(store, "grid-a")}
    assert after == before
    for s in (store_b, store_c):
        s.close()
    store.close()


def test_shared_pending_units_are_leased_by_either_sweep(db_url: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    store, plan_e, _ = submit(spec_from_dict(spec_dict("plan-e", out)), db_url)  # planned only
    store_f, _, added = submit(spec_from_dict(spec_dict("run-f", out)), db_url)
    assert added == 12 and store.status("run-f").counts["pending"] == 12
    assert _drain(db_url, store, "run-f")["done"] == 12  # F's workers lease E's units
    keys = {u.key for u in plan_e.units}
    check_complete(store, "plan-e", keys)
    check_complete(store, "run-f", keys)
    assert all(r["attempts"] == 1 for r in units(store, "plan-e"))  # each computed once
    store_f.close()
    store.close()


def test_environment_errors_keep_attempts_then_retry(db_url: str, tmp_path: Path, capsys,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(actor_mod, "ENV_BACKOFF_S", 0.01)
    spec = spec_dict("envfail", tmp_path / "out", lease={"ttl_s": 30, "heartbeat_s": 5, "max_attempts": 2})
    store, the_plan, _ = submit(spec_from_dict(spec), db_url)
    real_write = actor_mod.write_shard

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(actor_mod, "write_shard", disk_full)
    info = store.get_sweep("envfail")
    group = units(store, "envfail")[0]["group"]
    runner = UnitRunner(db_url, info.id, "envfail", group, info.output_dir, ttl_s=30,
                        heartbeat_s=5, max_attempts=2, threads=1)
    with pytest.raises(WorkerEnvironmentError, match="3 units in a row failed on this machine: OSError"):
        runner.run()
    rows = units(store, "envfail")
    assert {r["status"] for r in rows} == {"pending"} and {r["attempts"] for r in rows} == {0}
    # The same (first) unit was tried 3 times, each time given its attempt back.
    errs = [r["error"] for r in rows if r["error"]]
    assert len(errs) == 1 and "[environment] OSError: [Errno 28] No space left" in errs[0]
    # A deterministic failure (here: the engine's NaN check) uses attempts until `failed`.
    monkeypatch.setattr(actor_mod, "write_shard", real_write)

    def nan(self, key, params):  # noqa: ANN001, ANN202
        raise NonFiniteResponse("non-finite response (NaN or inf) in r: 3 of 9 rows")

    monkeypatch.setattr(UnitRunner, "compute_unit_tables", nan)  # what the run loop calls
    runner.run()
    rows = units(store, "envfail")
    assert {r["status"] for r in rows} == {"failed"} and {r["attempts"] for r in rows} == {2}
    code, _, err = run_main(capsys, "resume", "envfail", "--db", db_url, "--no-progress")
    assert code == 1  # nothing open: failed units are not retried by resume
    # `retry --unit` and `retry --failed` give them fresh attempts.
    code, _, err = run_main(capsys, "retry", "envfail", "--unit", "nope", "--db", db_url, "--no-run")
    assert code == 2 and "invalid --unit" in err
    first = rows[0]["unit_key"]
    code, text, err = run_main(capsys, "retry", "envfail", "--unit", first, "--db", db_url, "--no-run")
    assert code == 0 and "1 units requeued" in text, err
    code, text, err = run_main(capsys, "retry", "envfail", "--failed", "--db", db_url, "--no-run")
    assert code == 0 and f"{len(rows) - 1} units requeued" in text, err
    monkeypatch.undo()
    assert _drain(db_url, store, "envfail")["done"] == len(rows)
    check_complete(store, "envfail", {u.key for u in the_plan.units})
    store.close()


def test_lost_and_changed_shards_recomputed(db_url: str, tmp_path: Path, capsys) -> None:
    from orchestrator.run_commands import _requeue_lost_shards

    store, the_plan, _ = submit(spec_from_dict(spec_dict("lost", tmp_path / "out")), db_url)
    _drain(db_url, store, "lost")
    rows = sorted(units(store, "lost"), key=lambda r: r["unit_key"])
    Path(rows[0]["result_path"]).unlink()  # a missing shard
    data = bytearray(Path(rows[1]["result_path"]).read_bytes())
    data[len(data) // 2] ^= 0x10  # a changed one (same size)
    Path(rows[1]["result_path"]).write_bytes(bytes(data))
    code, text, err = run_main(capsys, "status", "lost", "--db", db_url)
    assert code == 0 and "1 done units have a missing or changed shard" in text, text + err
    # resume's check (a stat per shard) finds the missing one; --bad-shards also the changed.
    assert _requeue_lost_shards(store, "lost", checksum=False) == 1
    code, text, err = run_main(capsys, "retry", "lost", "--bad-shards", "--db", db_url, "--no-run")
    assert code == 0 and "1 units requeued" in text, err
    assert {r["unit_key"] for r in units(store, "lost") if r["status"] == "pending"} == {
        rows[0]["unit_key"], rows[1]["unit_key"]}
    assert _drain(db_url, store, "lost")["done"] == 2
    check_complete(store, "lost", {u.key for u in the_plan.units})
    assert yaml  # (spec files are written by other tests of this module)
    store.close()
