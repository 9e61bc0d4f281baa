"""A worker process for the db concurrency tests: lease and complete, or lease and hang.

Run as `python -m tests.db_worker URL SWEEP WORKER MODE [N] [TTL]`; prints JSON lines.
"""

from __future__ import annotations

import json
import sys
import time

from db.shards import ShardInfo
from db.store import connect


def main(argv: list[str]) -> None:
    url, sweep, worker, mode = argv[:4]
    n = int(argv[4]) if len(argv) > 4 else 8
    ttl = float(argv[5]) if len(argv) > 5 else 30.0
    store = connect(url)
    if mode == "drain":
        # Every process starts leasing at the same moment, so the leases really overlap:
        # say we are connected, then wait for the parent's "go" on stdin.
        print(json.dumps({"ready": worker}), flush=True)
        sys.stdin.readline()
        leased, outcomes = [], []
        while units := store.lease(worker, n, ttl, sweep_id=sweep):
            for u in units:
                leased.append(u.key)
                outcomes.append(store.complete(u.key, worker, ShardInfo(f"/nowhere/{u.key}", 1, 1, "0" * 64)))
        print(json.dumps({"leased": leased, "outcomes": outcomes}), flush=True)
    elif mode == "hold":
        units = store.lease(worker, n, ttl, sweep_id=sweep)
        print(json.dumps({"leased": [u.key for u in units]}), flush=True)
        time.sleep(3600)  # the test kills us with SIGKILL while we hold the leases
    else:
        raise SystemExit(f"unknown mode {mode}")
    store.close()


if __name__ == "__main__":
    main(sys.argv[1:])
