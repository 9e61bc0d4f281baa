"""Leasing under real concurrency: 4 processes on 1,000 units; a SIGKILLed lease holder.

Each test runs on SQLite and on the real PostgreSQL (fresh schema), with real subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from db.shards import ShardInfo
from db.store import UnitSpec, connect

ROOT = Path(__file__).resolve().parents[1]


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.db_worker", *args],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_four_processes_lease_each_unit_exactly_once(db_url: str, tmp_path: Path) -> None:
    store = connect(db_url)
    sid = store.create_sweep("conc", {"k": 1}, "h", tmp_path)
    keys = [f"u{i:04d}" for i in range(1000)]
    assert store.add_units(sid, [UnitSpec(k, None, {"i": i}, 3) for i, k in enumerate(keys)]) == 1000
    procs = [_spawn(db_url, "conc", f"w{i}", "drain", "7", "60") for i in range(4)]
    for p in procs:  # all four interpreters imported and connected ...
        assert "ready" in p.stdout.readline()
    for p in procs:  # ... then they start together
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    leased = Counter(k for r in results for k in r["leased"])
    assert sorted(leased) == keys  # every unit leased ...
    assert max(leased.values()) == 1  # ... by exactly one process, once
    assert all(o == "done" for r in results for o in r["outcomes"])
    # The leases really interleaved: several processes got a share. (Not necessarily all
    # four: SQLite's busy handler sleeps while others take the lock, so with no compute
    # between calls one process can be starved; fairness is not part of the contract.)
    shares = [len(r["leased"]) for r in results]
    assert sum(1 for n in shares if n > 0) >= 2, shares
    st = store.status("conc")
    assert st.counts == {"pending": 0, "leased": 0, "done": 1000, "failed": 0}
    assert st.cells_done == 3000
    units = store.table_arrow("units", "conc").to_pydict()
    assert set(units["attempts"]) == {1}
    owners = Counter(units["lease_owner"])
    assert owners == Counter({f"w{i}": len(r["leased"]) for i, r in enumerate(results)})
    store.close()


def test_sigkilled_holder_units_reclaimed_and_completed_once(db_url: str, tmp_path: Path) -> None:
    store = connect(db_url)
    sid = store.create_sweep("kill", {"k": 2}, "h", tmp_path)
    keys = [f"k{i:02d}" for i in range(20)]
    store.add_units(sid, [UnitSpec(k, "m|f32", {}, 1) for k in keys])
    ttl = 2.0
    p = _spawn(db_url, "kill", "victim", "hold", "20", str(ttl))
    line = p.stdout.readline()  # blocks until the victim holds its leases
    assert sorted(json.loads(line)["leased"]) == keys
    t_leased = time.time()
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    assert p.returncode == -signal.SIGKILL
    # Before the TTL: the dead worker's leases still stand, nobody else gets its units.
    assert store.lease("rescuer", 50, 30, sweep_id="kill") == []
    assert store.status("kill").counts["leased"] == 20
    time.sleep(max(0.0, t_leased + ttl + 0.3 - time.time()))
    assert store.status("kill").expired_leases == 20
    assert store.reclaim_expired("kill", max_attempts=5) == (20, 0)
    got = store.lease("rescuer", 50, 30, sweep_id="kill")
    assert sorted(u.key for u in got) == keys
    assert {u.attempts for u in got} == {2}
    shard = ShardInfo("/nowhere", 1, 1, "0" * 64)
    assert [store.complete(u.key, "rescuer", shard) for u in got] == ["done"] * 20
    # The victim cannot come back and complete (its lease is gone), nor can a second completion.
    assert store.complete(keys[0], "victim", shard) == "already_done"
    assert store.complete(keys[0], "rescuer", shard) == "already_done"
    st = store.status("kill")
    assert st.counts == {"pending": 0, "leased": 0, "done": 20, "failed": 0}
    store.close()
