"""The worker without Ray: a UnitRunner drains its group on SQLite, and the test-only fault
hook (tests/fault_site) reaches a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from orchestrator.actor import UnitRunner
from orchestrator.spec import spec_from_dict
from orchestrator.submit import submit
from tasks.work import UnitWork
from tests.orch_helpers import FAULT_SITE, ROOT, UNIT_DELAY_ENV, spec_dict


def test_runner_drains_its_group(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'u.db'}"
    spec = spec_from_dict(spec_dict("runner", tmp_path / "out", models=["tiny:llama", "tiny:gpt2"]))
    store, plan, added = submit(spec, db_url)
    assert added == len(plan.units) and set(store.open_by_group("runner")) == {
        "tiny:llama|float32", "tiny:gpt2|float32"}
    info = store.get_sweep("runner")
    runner = UnitRunner(db_url, info.id, "runner", "tiny:llama|float32", info.output_dir,
                        device="cpu", idle_poll_s=0.01)
    counts = runner.run()
    mine = [u for u in plan.units if u.group == "tiny:llama|float32"]
    assert counts["units"] == counts["done"] == len(mine)
    assert store.group_finished(info.id, "tiny:llama|float32")
    assert not store.group_finished(info.id, "tiny:gpt2|float32")
    assert set(store.open_by_group("runner")) == {"tiny:gpt2|float32"}
    assert store.leased_by(runner.worker_id) == []
    for u in mine:
        row = store.unit(u.key)
        assert row["status"] == "done" and row["lease_owner"] == runner.worker_id
        work = UnitWork.from_json(row["params"])
        assert pq.read_metadata(row["result_path"]).num_rows == row["result_rows"] == \
            work.expected_rows(2 * work.prompt.T + 1)
    store.close()


def test_fault_hook_patches_the_worker_in_a_new_process() -> None:
    code = "import orchestrator.actor as a; print(a.UnitRunner.compute_units_tables.__name__)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAULT_SITE), str(ROOT)])}
    for delay, name in (("0.5", "slow_compute_units_tables"), ("", "compute_units_tables")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                             check=True, env={**env, UNIT_DELAY_ENV: delay})
        assert out.stdout.strip() == name
