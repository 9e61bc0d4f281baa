"""Helpers for the orchestrator tests: a Ray session per module, specs, subprocess drivers, checks.

Imported by tests/test_orch_*.py (tests/conftest.py belongs to the lead).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).absolute().parents[1]  # not resolve(): keep a symlinked checkout
PY = sys.executable
FAULT_SITE = ROOT / "tests" / "fault_site"
# Seconds each unit of a worker sleeps before computing, so a test can kill it mid-unit
# (read by tests/fault_site/sitecustomize.py in the workers).
UNIT_DELAY_ENV = "UNISWEEP_TEST_UNIT_DELAY_S"
# How long a test waits for a driver's first actor to lease a unit: joining Ray, starting an
# actor process, importing torch and loading the model. Seconds on an idle machine, minutes
# on a loaded one; the driver's own limit for actor start-up is the same 600 s
# (orchestrator/driver.py), so a hung start still fails the test.
ACTOR_START_S = 600.0
_HOME: Path | None = None
_HOME_BEFORE: str | None = None


def _enter_ray_env(tmp: Path, paths: tuple[Path, ...]) -> str | None:
    """Set HOME and PYTHONPATH (`paths` first) for a Ray session started by this process;
    returns the HOME to restore afterwards."""
    global _HOME
    # One HOME per test process: Ray caches that it made ~/.ray/auth_token, so a second
    # session under another HOME finds no token and its GCS refuses to start.
    if _HOME is None:
        _HOME = tmp / "home"
        _HOME.mkdir(parents=True, exist_ok=True)
    home_before = os.environ.get("HOME")
    os.environ["HOME"] = str(_HOME)
    pp = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (*map(str, paths), pp) if p)
    return home_before


def start_ray(tmp: Path, num_cpus: int = 2, env: dict[str, str] | None = None) -> str:
    """A Ray session for one test module, isolated HOME (Ray 2.60 writes ~/.ray/auth_token).

    Returns the GCS address that subprocess drivers join with `--address`. Environment set
    here reaches every worker (workers inherit the raylet's environment).
    """
    import ray

    global _HOME_BEFORE
    # FAULT_SITE first: its sitecustomize injects the faults that `env` asks for (UNIT_DELAY_ENV).
    _HOME_BEFORE = _enter_ray_env(tmp, (FAULT_SITE, ROOT))
    for k, v in (env or {}).items():
        os.environ[k] = v
    ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=str(tmp / "ray"),
             log_to_driver=False)
    return ray.get_runtime_context().gcs_address


def stop_ray(env_keys: tuple[str, ...] = ()) -> None:
    import ray

    ray.shutdown()
    for k in env_keys:
        os.environ.pop(k, None)
    if _HOME_BEFORE is not None:
        os.environ["HOME"] = _HOME_BEFORE


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    addr = start_ray(tmp_path_factory.mktemp("ray"))
    yield addr
    stop_ray()


def spec_dict(name: str, out: Path, **over: Any) -> dict[str, Any]:
    """A tiny sweep: tiny:llama, T=4, 2 prompts, 2 layers, 3 positions, 2 eps + linear."""
    d: dict[str, Any] = {
        "name": name,
        "models": ["tiny:llama"],
        "prompts": {"T": 4, "count": 2, "seed": 0},
        "layers": [0, 1],
        "positions": [1, 2, 3],
        "eps": [1e-3, 1e-2],
        "directions": {"family": "random", "count": 2, "seed": 0},
        "linear": True,
        # 2 kinds x 2 directions x 3 eps-or-linear = 12 cells per position: 1 position a unit.
        "cells_per_unit": 12,
        "lease": {"ttl_s": 3, "heartbeat_s": 0.5, "max_attempts": 3},
        "output": str(out),
    }
    d.update(over)
    return d


def write_spec(path: Path, d: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(d))
    return path


def cli(*args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen:
    """`python -m orchestrator.cli ARGS` in a subprocess (its own process group)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH", "")) if p)
    e.update(env or {})
    return subprocess.Popen([PY, "-m", "orchestrator.cli", *args], cwd=ROOT, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def wait_for(pred: Any, timeout: float, poll: float = 0.1) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(poll)
    return False


def sigkill(proc: subprocess.Popen) -> None:
    # The driver only (not its group): Ray must clean up after a driver that vanished.
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def units(store: Any, sweep: str) -> list[dict[str, Any]]:
    return store.table_arrow("units", sweep).to_pylist()


def expected_rows(params: dict[str, Any], n_layers: int) -> int:
    """Rows the engine writes for a unit: one per (kind, direction, j, eps|linear, l >= lp, i >= j)."""
    T = params["prompt"]["T"]
    n = 2 * T + 1
    per_j = sum(n - j for j in params["positions"])
    levels = n_layers - params["lp"] + 1
    values = len(params["eps"]) + (1 if params["linear"] else 0)
    return len(params["prompt"]["kinds"]) * params["directions"]["count"] * per_j * levels * values


def check_complete(store: Any, sweep: str, planned_keys: set[str]) -> dict[str, Any]:
    """Every planned unit done exactly once, its shard intact, the rows exactly as expected."""
    rows = units(store, sweep)
    keys = [r["unit_key"] for r in rows]
    assert len(keys) == len(set(keys))
    assert set(keys) == planned_keys
    assert all(r["status"] == "done" for r in rows), {r["status"] for r in rows}
    assert store.verify(sweep).ok
    total = 0
    seen: set[str] = set()
    for r in rows:
        params = json.loads(r["params"])
        t = pq.read_table(r["result_path"])
        assert t.num_rows == r["result_rows"] == expected_rows(params, params["run"]["n_layers"])
        assert set(t.column("unit_key").to_pylist()) == {r["unit_key"]}
        seen.add(r["unit_key"])
        total += t.num_rows
    assert seen == planned_keys
    return {"rows": total, "units": len(rows)}


def run_main(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """`unisweep ARGV` in this process (no subprocess): exit code, stdout, stderr."""
    from orchestrator.cli import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@contextmanager
def simulated_cluster(tmp: Path, head: dict[str, Any], nodes: list[dict[str, Any]]) -> Iterator[tuple[Any, list[Any]]]:
    """A `ray.cluster_utils.Cluster` (head + `nodes`, e.g. {"num_cpus": 1, "num_gpus": 4}) with
    this process connected to it; HOME and PYTHONPATH as start_ray sets them, HOME restored
    after (also when the cluster fails to start)."""
    import ray
    from ray._private.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    home_before = _enter_ray_env(tmp, (ROOT,))
    cluster = None
    try:
        # Cluster writes the head's address into Ray's default temp folder (/tmp/ray), which
        # a machine that has never started Ray lacks: FileNotFoundError (seen on a fresh CI
        # machine).
        Path(get_ray_address_file(None)).parent.mkdir(parents=True, exist_ok=True)
        cluster = Cluster(initialize_head=True, head_node_args=head)
        added = [cluster.add_node(**n) for n in nodes]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster, added
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if home_before is not None:
            os.environ["HOME"] = home_before
