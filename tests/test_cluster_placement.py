"""Mixed GPU nodes: actor counts from each node's GPUs, models that need several GPUs, secrets.

A simulated cluster (ray.cluster_utils) with a 1-GPU and a 4-GPU node. The GPUs are declared,
not real: actors land where the ledger pins them and torch runs on the CPU there.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.placement import GpuLedger, Node, check_fits, slots_per_node
from tasks.errors import UnisweepError
from tests.orch_helpers import check_complete, simulated_cluster, spec_dict, units

SMALL, BIG = Node("one-gpu", 1), Node("four-gpu", 4)


# ---- the ledger alone ---------------------------------------------------------------------


def test_slots_from_each_nodes_gpus() -> None:
    # 1 + 4 GPUs: five 1-GPU actors; 2-GPU actors only on the 4-GPU node (a pooled count of
    # 5 GPUs would say two and a half).
    assert slots_per_node([SMALL, BIG], 1) == {"one-gpu": 1, "four-gpu": 4}
    assert slots_per_node([SMALL, BIG], 2) == {"one-gpu": 0, "four-gpu": 2}
    assert slots_per_node([SMALL, BIG], 0.5) == {"one-gpu": 2, "four-gpu": 8}
    assert slots_per_node([SMALL, BIG], 1, actors_per_node=2) == {"one-gpu": 1, "four-gpu": 2}


def test_ledger_best_fit_and_give_back() -> None:
    ledger = GpuLedger([SMALL, BIG])
    # Best fit: the 1-GPU model takes the small node first and keeps the big one whole.
    assert ledger.take(1) == "one-gpu"
    assert [ledger.take(2), ledger.take(2), ledger.take(2)] == ["four-gpu", "four-gpu", None]
    ledger.give("four-gpu", 2)
    assert ledger.take(1) == "four-gpu" and ledger.take(1) == "four-gpu" and ledger.take(1) is None
    five = GpuLedger([SMALL, BIG])
    assert sorted(n for n in iter(lambda: five.take(1), None)) == ["four-gpu"] * 4 + ["one-gpu"]


def test_a_model_that_fits_no_node_names_itself() -> None:
    check_fits({"m": 4}, [SMALL, BIG])
    with pytest.raises(UnisweepError) as err:
        check_fits({"small-model": 1, "huge-model": 8}, [SMALL, BIG])
    msg = str(err.value)
    assert "huge-model" in msg and "8 GPUs" in msg and "largest node of the Ray cluster has 4" in msg


# ---- on a simulated cluster -----------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    ray_tmp = Path("/tmp") / f"usm{os.getpid()}"  # short: Ray's socket paths have a length limit
    with simulated_cluster(tmp_path_factory.mktemp("mixed"), {"num_cpus": 1, "temp_dir": str(ray_tmp)},
                           [{"num_cpus": 2, "num_gpus": 1}, {"num_cpus": 5, "num_gpus": 4}]) as (_, (small, big)):
        yield {"one-gpu": small.node_id, "four-gpu": big.node_id, "temp_dir": str(ray_tmp)}


def _run(name: str, tmp_path: Path, models: list, monkeypatch: pytest.MonkeyPatch,
         env: dict[str, str] | None = None) -> tuple[object, object, dict[str, str], dict]:
    import ray

    from orchestrator.driver import Driver, submit
    from orchestrator.spec import spec_from_dict

    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    spec = spec_from_dict(spec_dict(name, tmp_path / "out", models=models,
                                    resources={"cpu_fallback": False}))
    db_url = f"sqlite:///{tmp_path / 'u.db'}"
    store, plan, _ = submit(spec, db_url)
    driver = Driver(store, name, spec, db_url, progress=False)
    nodes: dict[str, str] = {}
    seen_env: dict = {}

    def record(_st: object) -> None:
        for slot in driver.slots:
            if slot.worker_id not in nodes:
                nodes[slot.worker_id] = ray.get(slot.actor.node_id.remote(), timeout=60)
                seen_env[slot.worker_id] = ray.get(slot.actor.__ray_call__.remote(
                    lambda _self: {k: os.environ.get(k) for k in ("HF_TOKEN", "UNISWEEP_DB")}),
                    timeout=60)

    driver.on_progress = record
    summary = driver.run()
    assert summary.counts["done"] == len(plan.units), summary
    check_complete(store, name, {u.key for u in plan.units})
    return store, plan, nodes, seen_env


@pytest.mark.ray
@pytest.mark.slow
def test_two_gpu_model_only_on_the_four_gpu_node(mixed_cluster: dict, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    token = f"hf_{secrets.token_hex(8)}"
    store, _, nodes, seen_env = _run("twogpu", tmp_path, [{"name": "tiny:llama", "gpus_per_actor": 2}],
                                     monkeypatch, env={"HF_TOKEN": token})
    assert len(nodes) == 2, nodes  # 4 // 2 on the big node, 1 // 2 = 0 on the small one
    assert set(nodes.values()) == {mixed_cluster["four-gpu"]}
    assert len({r["lease_owner"] for r in units(store, "twogpu")}) == 2
    # The secrets reached every actor's environment ...
    db_url = f"sqlite:///{tmp_path / 'u.db'}"
    assert all(e == {"HF_TOKEN": token, "UNISWEEP_DB": db_url} for e in seen_env.values()), seen_env
    store.close()
    # ... and no file of the cluster's session (logs of every node and process) holds it.
    leaked = [str(p) for p in Path(mixed_cluster["temp_dir"]).rglob("*")
              if p.is_file() and not p.is_socket() and token.encode() in p.read_bytes()]
    assert not leaked


@pytest.mark.ray
@pytest.mark.slow
def test_one_gpu_model_gets_an_actor_per_gpu(mixed_cluster: dict, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store, _, nodes, _ = _run("onegpu", tmp_path, ["tiny:llama"], monkeypatch)
    by_node = sorted(nodes.values())
    assert len(nodes) == 5, nodes
    assert by_node.count(mixed_cluster["four-gpu"]) == 4
    assert by_node.count(mixed_cluster["one-gpu"]) == 1
    store.close()


@pytest.mark.ray
@pytest.mark.slow
def test_model_too_big_for_any_node_fails_before_work(mixed_cluster: dict, tmp_path: Path) -> None:
    from orchestrator.driver import Driver, submit
    from orchestrator.spec import spec_from_dict

    spec = spec_from_dict(spec_dict("huge", tmp_path / "out",
                                    models=["tiny:gpt2", {"name": "tiny:llama", "gpus_per_actor": 8}]))
    db_url = f"sqlite:///{tmp_path / 'u.db'}"
    store, plan, _ = submit(spec, db_url)
    with pytest.raises(UnisweepError) as err:
        Driver(store, "huge", spec, db_url, progress=False).run()
    msg = str(err.value)
    assert "tiny:llama" in msg and "8 GPUs" in msg and "has 4 GPUs" in msg
    rows = units(store, "huge")
    assert len(rows) == len(plan.units)
    assert all(r["status"] == "pending" and r["attempts"] == 0 for r in rows)  # no work at all
    store.close()
