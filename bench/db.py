"""Benchmark of the result database: 10,000 units leased and completed by 4 worker processes,
and (--poll) the queue questions an idle worker and the driver ask on 100,000 units.

Measures units/s and milliseconds of database time per unit, per-unit vs batched leasing,
on SQLite and PostgreSQL. Usage: python bench/db.py [--backend sqlite postgres] [--batch 1 32];
python bench/db.py --poll [--units 100000].
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

from db.shards import ShardInfo  # noqa: E402
from db.store import UnitSpec, connect  # noqa: E402

PG_URL = os.environ.get("UNISWEEP_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


PG_OPTIONS = ""  # extra libpq options, e.g. "-csynchronous_commit=off" (--pg-async-commit)


@contextmanager
def fresh_db(backend: str):
    """A new SQLite file or a new PostgreSQL schema, removed afterwards."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as d:
            yield f"sqlite:///{d}/unisweep.db"
        return
    schema = f"bench_{secrets.token_hex(5)}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_URL}?options={quote(f'-csearch_path={schema} {PG_OPTIONS}'.strip())}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def worker(url: str, worker_id: str, batch: int, start_at: float, out: mp.Queue) -> None:
    store = connect(url)
    shard = ShardInfo("/bench/none.parquet", 1000, 4096, "0" * 64)
    lease_s = complete_s = 0.0
    n = 0
    while time.time() < start_at:
        time.sleep(0.001)
    t_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        units = store.lease(worker_id, batch, 60, sweep_id="bench")
        t1 = time.perf_counter()
        lease_s += t1 - t0
        if not units:
            break
        for u in units:
            t2 = time.perf_counter()
            outcome = store.complete(u.key, worker_id, shard, 0.0)
            complete_s += time.perf_counter() - t2
            assert outcome == "done", outcome
            n += 1
    out.put({"n": n, "lease_s": lease_s, "complete_s": complete_s,
             "wall_s": time.perf_counter() - t_start, "end": time.time()})
    store.close()


def run_one(backend: str, batch: int, n_units: int, n_workers: int) -> dict:
    with fresh_db(backend) as url:
        store = connect(url)
        sid = store.create_sweep("bench", {"bench": True}, "h", tempfile.gettempdir())
        t0 = time.perf_counter()
        added = store.add_units(sid, [UnitSpec(f"u{i:06d}", "m|float32", {"i": i}, 32) for i in range(n_units)])
        add_s = time.perf_counter() - t0
        assert added == n_units
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        start_at = time.time() + 3.0  # all workers imported and connected before the clock starts
        procs = [ctx.Process(target=worker, args=(url, f"w{i}", batch, start_at, q)) for i in range(n_workers)]
        for p in procs:
            p.start()
        res = [q.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
        st = store.status("bench")
        assert st.counts["done"] == n_units, st.counts
        store.close()
    total = sum(r["n"] for r in res)
    wall = max(r["end"] for r in res) - start_at
    db_s = sum(r["lease_s"] + r["complete_s"] for r in res)
    return {
        "backend": backend, "batch": batch, "units": total, "workers": n_workers,
        "wall_s": wall, "units_per_s": total / wall,
        "ms_per_unit": 1000 * db_s / total,  # database time a worker spends per unit
        "lease_ms_per_unit": 1000 * sum(r["lease_s"] for r in res) / total,
        "complete_ms_per_unit": 1000 * sum(r["complete_s"] for r in res) / total,
        "spread": statistics.pstdev([r["n"] for r in res]) / (total / n_workers),
        "add_units_s": add_s,
    }


def floor_ms(backend: str, n: int = 2000) -> float:
    """The database's own floor: one bare single-row UPDATE commit, no SQLAlchemy, one process."""
    with fresh_db(backend) as url:
        store = connect(url)
        sid = store.create_sweep("bench", {}, "h", tempfile.gettempdir())
        store.add_units(sid, [UnitSpec(f"u{i:06d}", None, {}, 1) for i in range(n)])
        raw = store.engine.raw_connection()
        dbapi = raw.driver_connection
        if backend == "postgres":
            dbapi.autocommit = True
        cur = dbapi.cursor()
        ph = "%s" if backend == "postgres" else "?"
        t0 = time.perf_counter()
        for i in range(n):
            cur.execute(f"UPDATE units SET status = 'done' WHERE key = {ph}", (f"u{i:06d}",))
            if backend == "sqlite":
                dbapi.commit()
        ms = 1000 * (time.perf_counter() - t0) / n
        raw.close()
        store.close()
    return ms


def whole_table_open_by_group(store, sweep: str) -> dict:
    """The questions as they were asked before (orchestrator/store_adapter.py, removed): the
    whole units table as Arrow, then counted in Python. Kept here as the baseline."""
    t = store.table_arrow("units", sweep).select(["group", "status", "n_cells"])
    out: dict = {}
    for g, st, n in zip(t.column("group").to_pylist(), t.column("status").to_pylist(),
                        t.column("n_cells").to_pylist(), strict=True):
        if st in ("pending", "leased"):
            d = out.setdefault(g, {"units": 0, "cells": 0})
            d["units"] += 1
            d["cells"] += int(n)
    return out


def whole_table_existing_params(store, sweep: str) -> list:
    t = store.table_arrow("units", sweep).select(["params"])
    return [json.loads(p) for p in t.column("params").to_pylist()]


def _ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def poll_bench(backend: str, n_units: int, n_groups: int = 10, rounds: int = 5) -> list[tuple[str, float, float | None]]:
    """(question, ms now, ms before) on a sweep of n_units in n_groups groups.

    The state an idle worker sees: its group "g0" has nothing pending (half done, half leased
    by another worker), the other groups are pending. Methods are interleaved round by round.
    """
    with fresh_db(backend) as url:
        store = connect(url)
        sid = store.create_sweep("bench", {"bench": True}, "h", tempfile.gettempdir())
        params = {"method_version": "1", "model": {"name": "m"}, "dtype": "float32", "lp": 0,
                  "positions": [1, 2, 3], "eps": [1e-3, 1e-2], "linear": True}
        store.add_units(sid, [UnitSpec(f"u{i:07d}", f"g{i % n_groups}", {**params, "i": i}, 32)
                              for i in range(n_units)])
        n0 = n_units // n_groups
        leased = store.lease("other", n0, 3600, sweep_id=sid, group="g0")
        shard = ShardInfo("/bench/none.parquet", 1, 1, "0" * 64)
        for u in leased[: n0 // 2]:
            store.complete(u.key, "other", shard)
        questions = {
            "idle worker poll: lease (nothing) + group_finished": (
                lambda: (store.lease("idle", 1, 60, sweep_id=sid, group="g0"),
                         store.group_finished(sid, "g0")),
                lambda: (store.lease("idle", 1, 60, sweep_id=sid, group="g0"),
                         "g0" not in whole_table_open_by_group(store, "bench"))),
            "group_finished": (lambda: store.group_finished(sid, "g0"),
                               lambda: "g0" not in whole_table_open_by_group(store, "bench")),
            "open_by_group (driver)": (lambda: store.open_by_group(sid),
                                       lambda: whole_table_open_by_group(store, "bench")),
            "leased_by (a dead worker's units)": (lambda: store.leased_by("other", sid), None),
            "unit_params (planner, all units)": (lambda: store.unit_params(sid),
                                                 lambda: whole_table_existing_params(store, "bench")),
        }
        assert store.group_finished(sid, "g0") is False and store.group_finished(sid, "none") is True
        assert store.open_by_group(sid) == whole_table_open_by_group(store, "bench")
        assert len(store.leased_by("other", sid)) == n0 - n0 // 2
        now: dict[str, list[float]] = {q: [] for q in questions}
        before: dict[str, list[float]] = {q: [] for q in questions}
        for _ in range(rounds):
            for q, (new, old) in questions.items():
                reps = 1 if q.startswith("unit_params") else 20
                now[q].append(_ms(new, reps))
                if old is not None:
                    before[q].append(_ms(old, 1))
        store.close()
    return [(q, statistics.median(now[q]), statistics.median(before[q]) if before[q] else None)
            for q in questions]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backend", nargs="+", default=["postgres", "sqlite"], choices=["postgres", "sqlite"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--units", type=int, default=None, help="default 10000 (100000 with --poll)")
    ap.add_argument("--workers", nargs="+", type=int, default=[4])
    ap.add_argument("--repeat", type=int, default=1, help="runs per row; the row shows the median run (by units/s)")
    ap.add_argument("--floor", action="store_true", help="also time a bare UPDATE commit per backend")
    ap.add_argument("--poll", action="store_true",
                    help="time the queue questions (idle worker poll, driver) instead; --units default 100000")
    ap.add_argument("--pg-async-commit", action="store_true",
                    help="PostgreSQL with synchronous_commit=off (set in the URL, no code change)")
    args = ap.parse_args()
    if args.pg_async_commit:
        global PG_OPTIONS
        PG_OPTIONS = "-csynchronous_commit=off"
    if args.poll:
        n = args.units or 100_000
        print(f"queue questions on {n} units in 10 groups, {os.cpu_count()} CPU cores; median ms "
              "(20 calls per round, 5 interleaved rounds; before = whole units table read, 1 call)")
        print("| backend | question | ms now | ms before | load average |")
        print("|---|---|---:|---:|---:|")
        for backend in args.backend:
            for q, ms, old in poll_bench(backend, n):
                print(f"| {backend} | {q} | {ms:.2f} | {'-' if old is None else f'{old:.0f}'} | "
                      f"{os.getloadavg()[0]:.1f} |", flush=True)
        return
    args.units = args.units or 10_000
    print(f"{args.units} units, {os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f} at start), "
          f"median of {args.repeat} run(s); no compute: pure database overhead, every worker "
          "calling the database back to back")
    if args.floor:
        for backend in args.backend:
            print(f"floor {backend}: bare single-row UPDATE + commit, 1 process: {floor_ms(backend):.2f} ms")
    print("| backend | workers | units per lease call | units/s | wall ms per unit | "
          "DB ms per unit in a worker (lease + complete) | add_units s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for backend in args.backend:
        for workers in args.workers:
            for batch in args.batch:
                runs = sorted((run_one(backend, batch, args.units, workers) for _ in range(args.repeat)),
                              key=lambda r: r["units_per_s"])
                r = runs[len(runs) // 2]
                print(f"| {r['backend']} | {workers} | {r['batch']} | {r['units_per_s']:.0f} | "
                      f"{1000 / r['units_per_s']:.2f} | {r['ms_per_unit']:.2f} "
                      f"({r['lease_ms_per_unit']:.2f} + {r['complete_ms_per_unit']:.2f}) | "
                      f"{r['add_units_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
