"""End-to-end throughput: Ray + database + Parquet shards vs the engine alone, on the same grid.

    python bench/e2e.py                      # SmolLM2-135M float32 (about 3 minutes on 2 cores)
    python bench/e2e.py --model tiny:llama   # a quick smoke run
    python bench/e2e.py --output s3://BUCKET/PREFIX   # shards to an object store (AWS_* env)

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


def grid(args: argparse.Namespace, out: Path) -> dict:
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
        "lease": {"ttl_s": 120, "heartbeat_s": 10, "max_attempts": 2},
        "output": str(out),
    }


def engine_only(spec, n_threads: int, device: str = "cpu") -> dict:
    """The whole grid in one compute_responses call per prompt id (the engine's best case)."""
    from tasks.directions import random_directions
    from tasks.engine import compute_responses
    from tasks.models import load_model
    from tasks.prompts import make_prompts

    torch.set_num_threads(n_threads)
    name, dtype = spec.model_dtypes()[0]
    t0 = time.perf_counter()
    lm = load_model(name, dtype=dtype, device=device)
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
    return {"cells": cells, "rows": rows, "seconds": secs, "load_s": load_s}


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
    u.sort(key=lambda r: r["finished_at"])
    steady_s = (u[-1]["finished_at"] - u[0]["finished_at"]).total_seconds()
    steady_cells = sum(r["n_cells"] for r in u[1:])
    return {"cells": summary.cells_done, "rows": sum(r["result_rows"] for r in u), "units": len(u),
            "wall_s": wall_s, "steady_s": steady_s, "steady_cells": steady_cells,
            "unit_compute_s": [round(r["compute_s"], 2) for r in u]}


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
    # The machine may be shared: bracket the end-to-end run by two engine-only runs.
    eng1 = engine_only(spec, args.threads)
    e2e = end_to_end(spec, f"sqlite:///{tmp / 'bench.db'}")
    eng2 = engine_only(spec, args.threads)
    assert e2e["cells"] == eng1["cells"] and e2e["rows"] == eng1["rows"], (eng1, e2e)
    eng = {"cells": eng1["cells"], "seconds": (eng1["seconds"] + eng2["seconds"]) / 2,
           "runs_s": [eng1["seconds"], eng2["seconds"]], "rows": eng1["rows"]}
    eng_rate = eng["cells"] / eng["seconds"]
    rows = [
        ("engine alone, one call per prompt pair (mean of a run before and after)",
         eng["cells"], eng["seconds"], eng_rate),
        (f"end-to-end steady state (units 2..{e2e['units']}: lease, compute, Parquet, complete)",
         e2e["steady_cells"], e2e["steady_s"], e2e["steady_cells"] / e2e["steady_s"]),
        ("end-to-end wall (plan, Ray start, actor start, model load, all units)",
         e2e["cells"], e2e["wall_s"], e2e["cells"] / e2e["wall_s"]),
    ]
    print(f"\nmodel {args.model} {args.dtype}, T={args.T}, {args.prompts} prompt pair(s), "
          f"lp={args.layers}, {len(spec.position_list())} positions, {len(spec.eps_list())} eps + linear, "
          f"{args.directions} directions; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}\n")
    print("| run | cells | seconds | cells/s | vs engine |")
    print("|---|---:|---:|---:|---:|")
    for label, cells, secs, rate in rows:
        print(f"| {label} | {cells} | {secs:.1f} | {rate:.1f} | {rate / eng_rate:.0%} |")
    print(f"\nengine-only runs: {eng['runs_s'][0]:.1f} s, {eng['runs_s'][1]:.1f} s; "
          f"unit compute_s: {e2e['unit_compute_s']}; shards in {output}")
    result = {"engine": eng, "e2e": e2e}
    if args.output:
        st = storage_overhead(f"sqlite:///{tmp / 'bench.db'}", spec.name, output, tmp / "local",
                              args.storage_repeats)
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
