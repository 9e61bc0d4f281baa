"""End-to-end throughput: Ray + database + Parquet shards vs the engine alone, on the same grid.

    python bench/e2e.py                      # SmolLM2-135M float32 (about 3 minutes on 2 cores)
    python bench/e2e.py --model tiny:llama   # a quick smoke run
    python bench/e2e.py --output s3://BUCKET/PREFIX   # shards to an object store (AWS_* env)
    python bench/e2e.py --batch 1 8 --rounds 2       # lease.batch 1 vs 8, interleaved

The end-to-end run is repeated for each --batch (units a worker leases and computes together,
spec lease.batch), alternating the order per round, with an engine-only run before, between
rounds and after, so that every ratio on this shared machine comes from one process.

With --output URI the run also times the storage step alone, interleaved in this process:
every unit's shard written (upload + sha256) to the object store and to a local folder.

Prints a Markdown table (cells/s; a cell is one (prompt, lp, j, eps or linear, direction)).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).absolute().parents[1]))

import torch  # noqa: E402


def grid(args: argparse.Namespace, out: Path, batch: int = 1) -> dict:
    return {
        "name": "bench-e2e",
        "models": [args.model],
        "dtype": args.dtype,
        "prompts": {"kinds": ["repeat", "control"], "T": args.T, "count": args.prompts, "seed": 0},
        "layers": args.layers,
        "positions": {"start": 4, "stop": args.T + 1, "step": max(1, args.T // args.positions)},
        "eps": {"start": 1e-5, "stop": 1e-1, "per_decade": 2},
        "directions": {"family": "random", "count": args.directions, "seed": 0},
        "linear": True,
        "cells_per_unit": args.cells_per_unit,
        "resources": {"cpu_actors": 1},
        "lease": {"ttl_s": 120, "heartbeat_s": 10, "max_attempts": 2, "batch": batch},
        # The engine alone below runs in the same KL mode as the workers.
        "engine": {"fused_kl": args.fused_kl},
        "output": str(out),
    }


def engine_only(spec, n_threads: int, device: str = "cpu") -> dict:
    """The whole grid in one compute_responses call per prompt id (the engine's best case)."""
    from tasks.directions import random_directions
    from tasks.engine import compute_responses
    from tasks.kl import set_fused_kl_mode
    from tasks.models import load_model
    from tasks.prompts import make_prompts

    torch.set_num_threads(n_threads)
    name, dtype = spec.model_dtypes()[0]
    t0 = time.perf_counter()
    lm = load_model(name, dtype=dtype, device=device)
    set_fused_kl_mode(spec.engine.fused_kl, lm.device)
    load_s = time.perf_counter() - t0
    prompts = make_prompts(lm.token_space, T=spec.prompts.T, count=spec.prompts.count,
                           seed=spec.prompts.seed, kinds=tuple(spec.prompts.kinds),
                           max_positions=lm.max_positions)
    dirs = random_directions(lm.d_model, spec.directions.count, spec.directions.seed)
    lps = spec.layer_list(lm.n_layers)
    t0 = time.perf_counter()
    rows = 0
    for pid in range(spec.prompts.count):
        table = compute_responses(lm, [p for p in prompts if p.id == pid], lps=lps,
                                  positions=spec.position_list(), eps=spec.eps_list(),
                                  directions=dirs, linear=spec.linear)
        rows += table.num_rows
    secs = time.perf_counter() - t0
    cells = (len(prompts) * len(lps) * len(spec.position_list())
             * (len(spec.eps_list()) + int(spec.linear)) * spec.directions.count)
    return {"cells": cells, "rows": rows, "seconds": secs, "load_s": load_s,
            "load_avg": os.getloadavg()[0]}


def _model_loaded_at(db_path: Path):
    """When the (single) worker registered, which it does right after loading its model."""
    import sqlite3
    from datetime import datetime

    with sqlite3.connect(db_path) as con:
        (ts,) = con.execute("SELECT min(started_at) FROM workers").fetchone()
    return datetime.fromisoformat(ts)


def end_to_end(spec, db_url: str) -> dict:
    from orchestrator.driver import Driver, init_ray, submit

    t_wall = time.perf_counter()
    store, plan, _ = submit(spec, db_url)
    init_ray(None, num_cpus=2)
    summary = Driver(store, spec.name, spec, db_url, progress=False).run()
    wall_s = time.perf_counter() - t_wall
    u = store.table_arrow("units", spec.name).to_pylist()
    failed = [r["error"] for r in u if r["status"] != "done"]
    if failed:
        raise SystemExit(f"{len(failed)} unit(s) not done: {failed[0][:500]}")
    # Steady state: from the first unit's completion (model loaded, actor warm) to the last
    # one's, over the cells of the units after the first: lease, compute, Parquet, complete.
    # With batched leases the first units complete together, so this window is defined for
    # batch 1 only; "after load" (from the model loaded to the last completion, all cells)
    # is defined for every batch size and is the one the batch sizes are compared on.
    u.sort(key=lambda r: r["finished_at"])
    steady_s = (u[-1]["finished_at"] - u[0]["finished_at"]).total_seconds()
    steady_cells = sum(r["n_cells"] for r in u[1:])
    after_load_s = (u[-1]["finished_at"] - _model_loaded_at(Path(db_url.split("///", 1)[1]))).total_seconds()
    return {"cells": summary.cells_done, "rows": sum(r["result_rows"] for r in u), "units": len(u),
            "wall_s": wall_s, "steady_s": steady_s, "steady_cells": steady_cells,
            "after_load_s": after_load_s, "batch": spec.lease.batch,
            "unit_compute_s": [round(r["compute_s"], 2) for r in u], "load_avg": os.getloadavg()[0]}


def storage_overhead(db_url: str, sweep: str, output: str, local: Path, repeats: int) -> dict:
    """ms per unit of write_shard (and verify) to `output` vs a local folder, interleaved."""
    import pyarrow.parquet as pq

    from db import storage
    from db.shards import verify_shard, write_shard
    from db.store import connect

    store = connect(db_url)
    tables = []
    for info in store.done_shards(sweep):
        fs, path = storage.resolve(info.path) if storage.is_object_store(info.path) else (None, info.path)
        tables.append((info.path.rsplit("/", 1)[-1].split(".")[0], pq.read_table(path, filesystem=fs)))
    store.close()
    times: dict[str, list[float]] = {"local": [], "object": [], "local_verify": [], "object_verify": []}
    for _ in range(repeats):
        for key, table in tables:
            for where, out in (("local", str(local)), ("object", output)):
                t0 = time.perf_counter()
                info = write_shard(table, out, "bench-storage", key)
                times[where].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                assert verify_shard(info) is None
                times[f"{where}_verify"].append(time.perf_counter() - t0)
    ms = {k: 1000 * sorted(v)[len(v) // 2] for k, v in times.items()}  # medians
    return {"units": len(times["local"]), "median_ms": ms,
            "mean_bytes": sum(t.nbytes for _, t in tables) / max(1, len(tables)),
            "load_avg": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--T", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 15])
    ap.add_argument("--positions", type=int, default=4)
    ap.add_argument("--directions", type=int, default=2)
    ap.add_argument("--cells-per-unit", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8],
                    help="lease.batch values to compare (units leased and computed together)")
    ap.add_argument("--fused-kl", default="off", choices=["auto", "on", "off"],
                    help="engine.fused_kl, for the workers and the engine alone alike")
    ap.add_argument("--rounds", type=int, default=1, help="end-to-end runs per batch value")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--output", help="where the shards go (default: a temporary folder); "
                    "s3://BUCKET/PREFIX etc. also times object storage against a local folder")
    ap.add_argument("--storage-repeats", type=int, default=5,
                    help="passes over the units when timing the storage step alone")
    args = ap.parse_args()

    from orchestrator.planner import validate_models
    from orchestrator.spec import spec_from_dict

    tmp = Path(tempfile.mkdtemp(prefix="unisweep-bench-"))
    output = args.output or str(tmp / "out")
    if args.output:
        from db.storage import preflight

        output = f"{output.rstrip('/')}/{tmp.name}"  # a fresh prefix per run
        preflight(output)
    spec = spec_from_dict(grid(args, output))
    validate_models(spec)
    # The machine may be shared: engine-only runs before, between rounds and after the
    # end-to-end runs, whose batch order alternates per round.
    engs = [engine_only(spec, args.threads)]
    runs = []
    for r in range(args.rounds):
        for batch in (args.batch if r % 2 == 0 else list(reversed(args.batch))):
            tag = f"r{r}b{batch}"
            out_b = f"{output}/{tag}"  # a fresh folder or prefix per run
            spec_b = spec_from_dict(grid(args, out_b, batch))
            runs.append(end_to_end(spec_b, f"sqlite:///{tmp / f'bench-{tag}.db'}"))
            e = runs[-1]
            assert e["cells"] == engs[0]["cells"] and e["rows"] == engs[0]["rows"], (engs[0], e)
            print(f"  round {r} batch {batch}: after load {e['after_load_s']:.1f} s, wall "
                  f"{e['wall_s']:.1f} s, load {e['load_avg']:.1f}", flush=True)
        engs.append(engine_only(spec, args.threads))
        print(f"  engine: {engs[-1]['seconds']:.1f} s, load {engs[-1]['load_avg']:.1f}", flush=True)
    eng_s = sum(e["seconds"] for e in engs) / len(engs)
    eng = {"cells": engs[0]["cells"], "seconds": eng_s, "runs_s": [e["seconds"] for e in engs],
           "rows": engs[0]["rows"], "loads": [e["load_avg"] for e in engs]}
    eng_rate = eng["cells"] / eng_s
    rows = [(f"engine alone, one call per prompt pair (mean of {len(engs)} runs)",
             eng["cells"], eng_s, eng_rate, max(eng["loads"]))]
    for batch in args.batch:
        mine = [e for e in runs if e["batch"] == batch]
        after = sum(e["after_load_s"] for e in mine) / len(mine)
        load = max(e["load_avg"] for e in mine)
        rows.append((f"end-to-end after model load, lease.batch {batch} (mean of {len(mine)})",
                     mine[0]["cells"], after, mine[0]["cells"] / after, load))
        if batch == 1:
            steady = sum(e["steady_s"] for e in mine) / len(mine)
            rows.append((f"end-to-end steady state, lease.batch 1 (units 2..{mine[0]['units']})",
                         mine[0]["steady_cells"], steady, mine[0]["steady_cells"] / steady, load))
        wall = sum(e["wall_s"] for e in mine) / len(mine)
        rows.append((f"end-to-end wall, lease.batch {batch} (plan, Ray, actor, model load, all units)",
                     mine[0]["cells"], wall, mine[0]["cells"] / wall, load))
    print(f"\nmodel {args.model} {args.dtype}, T={args.T}, {args.prompts} prompt pair(s), "
          f"lp={args.layers}, {len(spec.position_list())} positions, {len(spec.eps_list())} eps + linear, "
          f"{args.directions} directions; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}\n")
    print("| run | cells | seconds | cells/s | vs engine | load avg (max) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, cells, secs, rate, load in rows:
        print(f"| {label} | {cells} | {secs:.1f} | {rate:.1f} | {rate / eng_rate:.0%} | {load:.1f} |")
    print(f"\nengine-only runs: {', '.join(f'{x:.1f} s' for x in eng['runs_s'])} "
          f"(load {', '.join(f'{x:.1f}' for x in eng['loads'])})")
    for e in runs:
        print(f"lease.batch {e['batch']}: after load {e['after_load_s']:.1f} s, load {e['load_avg']:.1f}, "
              f"unit compute_s {e['unit_compute_s']}")
    if len(args.batch) == 2 and args.rounds >= 1:
        # Interleaved pairs: the ratio within a round is the least load-sensitive figure.
        a, b = args.batch
        pairs = [(x["after_load_s"], y["after_load_s"]) for x, y in
                 zip([e for e in runs if e["batch"] == a], [e for e in runs if e["batch"] == b])]
        print(f"per round, after-load time batch {b} / batch {a}: "
              f"{', '.join(f'{y / x:.2f}' for x, y in pairs)}")
    print(f"shards in {output}")
    e2e = runs[-1]
    result = {"engine": eng, "e2e": runs}
    if args.output:
        last = f"r{args.rounds - 1}b{e2e['batch']}"
        st = storage_overhead(f"sqlite:///{tmp / f'bench-{last}.db'}", spec.name,
                              f"{output}/{last}", tmp / "local", args.storage_repeats)
        m = st["median_ms"]
        print(f"\nstorage step alone, {st['units']} shard writes each, interleaved (median ms per "
              f"unit; {st['mean_bytes'] / 1e3:.0f} kB of Arrow data per unit; load average "
              f"{st['load_avg']:.1f}):\n")
        print("| where | write_shard ms/unit | verify (read back, sha256, rows) ms/unit |")
        print("|---|---:|---:|")
        print(f"| local folder (fsync + rename) | {m['local']:.1f} | {m['local_verify']:.1f} |")
        print(f"| object store ({output.split('://')[0]}://) | {m['object']:.1f} | {m['object_verify']:.1f} |")
        print(f"| object store minus local | {m['object'] - m['local']:+.1f} | "
              f"{m['object_verify'] - m['local_verify']:+.1f} |")
        result["storage"] = st
    if args.json:
        args.json.write_text(json.dumps(result, default=str, indent=1))


if __name__ == "__main__":
    main()
