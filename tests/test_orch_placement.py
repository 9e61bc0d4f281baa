"""One actor per GPU across nodes, on a simulated three-node Ray cluster (ray.cluster_utils).

The declared GPUs do not exist: actors with num_gpus=1 land one per node and torch runs on
the CPU there (FACTS.md), which exercises placement and the GPU branch of the driver.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.driver import Driver, actor_plan, submit
from orchestrator.spec import spec_from_dict
from tests.orch_helpers import check_complete, simulated_cluster, spec_dict, units

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    with simulated_cluster(tmp_path_factory.mktemp("cluster"), {"num_cpus": 1},
                           [{"num_cpus": 1, "num_gpus": 1}] * 2) as (cluster, nodes):
        yield cluster, nodes


def test_one_actor_per_gpu_across_nodes(gpu_cluster: object, tmp_path: Path) -> None:
    import ray

    res = ray.cluster_resources()
    assert res.get("GPU") == 2
    spec = spec_from_dict(spec_dict("gpus", tmp_path / "out", resources={"gpus_per_actor": 1}))
    ap = actor_plan(spec.resources, res, n_nodes=3)
    # Two GPUs -> two GPU actors (a third would stay PENDING forever, so none is asked for).
    assert (ap.n, ap.device, ap.options["num_gpus"]) == (2, "gpu", 1.0)
    db_url = f"sqlite:///{tmp_path / 'u.db'}"
    store, plan, _ = submit(spec, db_url)
    driver = Driver(store, "gpus", spec, db_url, progress=False)
    seen: dict[str, str] = {}

    def record(_st: object) -> None:
        # Where each actor runs: its node id, read while the actors are alive.
        for slot in driver.slots:
            if slot.worker_id not in seen:
                seen[slot.worker_id] = ray.get(slot.actor.node_id.remote(), timeout=30)

    driver.on_progress = record
    summary = driver.run()
    assert summary.counts["done"] == len(plan.units)
    check_complete(store, "gpus", {u.key for u in plan.units})
    owners = {r["lease_owner"] for r in units(store, "gpus")}
    assert len(owners) == 2  # both GPU actors did work
    assert len(seen) == 2
    assert len(set(seen.values())) == 2, seen  # one per GPU node, never both on one node
    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")}
    assert set(seen.values()) == gpu_nodes
    store.close()
