"""Every GPU check in one command: exactness, paper-scale throughput, the naive ratio, a sweep.

Writes OUT/gpu_check.json (every number) and OUT/gpu_check.txt (the same as tables), rewritten
after each part so that a run cut short still leaves what it measured. Parts:

  exact  (a) the start-up check and the fast engine against the naive reference
             (tests/reference.py) on the tiny GPT-2/Llama/Gemma-2/Gemma-3 configs, float64 and
             float32, on the chosen device;
  scale  (b) the paper-scale grid of bench/paper_scale.py on shape:gemma-2-2b,
             shape:llama-3.2-3b, shape:gpt2-xl in bfloat16: cells/s, tokens/s, TFLOP/s and its
             fraction of the dense peak, peak memory, batch size, projected paper-grid time;
  naive  (c) the naive per-cell loop on a subset of the same grid, same process (a ratio);
  sweep  (d) one sweep end to end through orchestrator.actor.UnitRunner (no Ray) with SQLite
             and a local output folder, beside the engine alone on the same grid.

Each part imports only what it needs, never Ray, DuckDB or Polars: (a)-(c) torch,
transformers and gguf, (d) also SQLAlchemy, Alembic, pydantic and PyYAML. bench/gpu_prepare.sh
fetches the wheels the GPU machine lacks (gguf, SQLAlchemy, Alembic, pydantic, ...).

    python bench/gpu_check.py OUT --device cuda              # the GPU run (BENCHMARKS.md)
    python bench/gpu_check.py OUT --device cpu --quick       # the same checks, CPU-sized
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).absolute().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ and tests/reference.py (the naive reference) by path

import torch  # noqa: E402

PARTS = ("exact", "scale", "naive", "sweep")
TINY_FAMILIES = ("gpt2", "llama", "gemma2", "gemma3")
GPU_SHAPES = ("gemma-2-2b", "llama-3.2-3b", "gpt2-xl")
# Normwise relative error allowed between the engine's table and the naive reference:
# (R and sections, KL, smallest eps compared). float64: the table stores float32
# (tasks.layout), so "equal" is equal to float32 rounding (measured 5e-8 on the CPU); the
# reference's textbook KL loses digits to cancellation (up to 5e-6 measured, gemma2). float32:
# the two sides round differently (batched vs one-row kernels), and a response eps is a
# difference of activations, so its error grows as 1/eps (on the CPU at eps = 1e-3: up to
# 1.1e-3 for the sections, 2e-3 for the KL): compared from eps = 1e-2 on.
EXACT_TOL = {"float64": (1e-6, 1e-5, 0.0), "float32": (1e-3, 1e-3, 1e-2)}
KL_MIN_EPS = 1e-3  # the reference's textbook KL cancels below this (tests/test_engine_exact.py)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------
# (a) start-up check and engine == naive on the tiny configs.


def _rel(a, b) -> float:
    """Normwise relative error: max |a - b| / max |b| (as tests/test_engine_exact.py)."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)) if b.size else 0.0


def exact_one(family: str, dtype: str, device: str, quick: bool = False) -> dict:
    """Start-up check, then every cell of a small grid through compute_responses against
    tests.reference.naive_cell (one full HF forward per cell): R at every level and position,
    the attention and MLP sections, and the KL."""
    import numpy as np

    from tasks.check import TOLERANCE, startup_check
    from tasks.directions import random_directions
    from tasks.engine import compute_responses
    from tasks.models import load_model
    from tasks.prompts import make_prompts
    from tests.reference import naive_cell

    t0 = time.perf_counter()
    lm = load_model(f"tiny:{family}", dtype=dtype, device=device, check=False)
    worst = startup_check(lm)  # raises StartupCheckFailed with the layer that differs
    out = {"family": family, "dtype": dtype, "startup_worst": max(worst.values()),
           "startup_tol": TOLERANCE[lm.dtype], "startup_ok": True}
    L = lm.n_layers
    prompts = make_prompts(lm.token_space, T=8, count=1, seed=3)  # repeat + control, n = 17
    n = prompts[0].n
    dirs = random_directions(lm.d_model, 2, seed=1)
    lps = [0, L // 2]
    positions = [5, n - 1] if quick else [0, 5, 9, n - 1]
    eps = [1e-2, 0.7] if quick else [1e-5, 1e-3, 1e-2, 1e-1, 0.7]
    dirs = dirs[:1] if quick else dirs
    tol, tol_kl, min_eps = EXACT_TOL[dtype]
    table = compute_responses(lm, prompts, lps, positions, eps, dirs)
    col = {k: table.column(k).to_numpy(zero_copy_only=False) for k in
           ("prompt_kind", "lp", "j", "eps", "direction", "l", "i", "r", "r_attn", "r_mlp", "kl")}
    errs = {"r": 0.0, "r_attn": 0.0, "r_mlp": 0.0, "kl": 0.0}
    missing = 0
    expected_rows = 0
    for p in prompts:
        for lp in lps:
            for j in positions:
                for e in eps:
                    for d in range(len(dirs)):
                        sel = ((col["prompt_kind"] == p.kind) & (col["lp"] == lp) & (col["j"] == j)
                               & (col["eps"] == e) & (col["direction"] == d))
                        expected_rows += (L + 1 - lp) * (n - j)
                        if int(sel.sum()) != (L + 1 - lp) * (n - j):
                            missing += 1
                            continue
                        if e < min_eps:
                            continue
                        r, ra, rm, kl = (t.cpu().numpy() for t in
                                         naive_cell(lm, p.input_ids.to(lm.device), lp, j, e, dirs[d]))
                        l_ix, i_ix = col["l"][sel].astype(int), col["i"][sel].astype(int)
                        errs["r"] = max(errs["r"], _rel(col["r"][sel], r[l_ix, i_ix]))
                        blk = l_ix < L  # sections are NULL at l = L
                        errs["r_attn"] = max(errs["r_attn"], _rel(
                            col["r_attn"][sel][blk], ra[l_ix[blk], i_ix[blk]]))
                        errs["r_mlp"] = max(errs["r_mlp"], _rel(
                            col["r_mlp"][sel][blk], rm[l_ix[blk], i_ix[blk]]))
                        if e >= KL_MIN_EPS:
                            fin = ~blk
                            errs["kl"] = max(errs["kl"], _rel(col["kl"][sel][fin], kl[i_ix[fin]]))
    within = all(np.isfinite(v) and v < (tol_kl if k == "kl" else tol) for k, v in errs.items())
    out.update(rows=table.num_rows, expected_rows=expected_rows, cells_missing=missing,
               errors=errs, tol=tol, tol_kl=tol_kl, min_eps=min_eps,
               ok=bool(missing == 0 and table.num_rows == expected_rows and within),
               seconds=round(time.perf_counter() - t0, 2))
    return out


def part_exact(args) -> dict:
    rows = []
    for fam in TINY_FAMILIES:
        for dt in ("float64", "float32"):
            try:
                rows.append(exact_one(fam, dt, args.device, args.quick))
            except Exception as exc:  # noqa: BLE001 (a failed family is a result; the rest runs)
                rows.append({"family": fam, "dtype": dt, "ok": False, "startup_ok": False,
                             "error": f"{type(exc).__name__}: {exc}"})
            print(f"  exact {fam} {dt}: {_exact_line(rows[-1])}", flush=True)
    return {"rows": rows, "ok": all(r["ok"] for r in rows)}


def _exact_line(r: dict) -> str:
    if "error" in r:
        return "FAILED " + r["error"].splitlines()[0]
    e = r["errors"]
    return (f"{'ok' if r['ok'] else 'FAILED'}; start-up worst {r['startup_worst']:.2e}; "
            f"rows {r['rows']}/{r['expected_rows']}; max rel err r {e['r']:.1e}, attn "
            f"{e['r_attn']:.1e}, mlp {e['r_mlp']:.1e}, kl {e['kl']:.1e} (tol {r['tol']:g}, kl {r['tol_kl']:g}; "
            f"eps >= {r['min_eps']:g})")


# ---------------------------------------------------------------------------------------------
# (b) + (c) the paper-scale grid, and the naive loop on a subset of it.


def scale_settings(args) -> argparse.Namespace:
    """bench/paper_scale.py's settings for this run: the paper grid (lp in {0, L/4, L/2,
    3L/4}, 11 eps + linear, 4 directions, repeat + control) on `positions` positions of copy 1."""
    cuda = args.device == "cuda"
    if args.quick:
        return argparse.Namespace(T=8, positions=2, eps_count=3, directions=2, linear=True,
                                  max_rows=2 * (1 + 3 * 2), repeat=1,
                                  naive_cells=4 if "naive" in args.parts else 0)
    return argparse.Namespace(
        T=args.T, positions=args.positions, eps_count=11, directions=4, linear=True,
        # None: the engine sizes its passes from free device memory (tasks.batching).
        max_rows=args.max_rows, repeat=2 if cuda else 1,
        naive_cells=(24 if cuda else 4) if "naive" in args.parts else 0)


def part_scale(args, report) -> dict:
    from bench.paper_scale import bench_model

    device = torch.device(args.device)
    ns = scale_settings(args)
    shapes = args.shapes.split(",") if args.shapes else (
        ["tiny:llama"] if args.quick else list(GPU_SHAPES))
    rows = []
    out = {"settings": vars(ns), "dtype": args.dtype, "rows": rows}
    for short in shapes:
        try:
            r = bench_model(short, args.dtype, device, ns)
        except Exception as exc:  # noqa: BLE001 (one shape's failure, e.g. out of memory, is a result)
            r = {"model": short, "error": f"{type(exc).__name__}: {exc}",
                 "traceback": traceback.format_exc(limit=-4)}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if "naive_cells_s" in r:
            r["engine_over_naive"] = r["cells_s"] / r["naive_cells_s"]
        rows.append(r)
        print(f"  scale {short}: {_scale_line(r)}", flush=True)
        report(partial=True)
    done = [r for r in rows if "error" not in r]
    out["projected_total_s"] = sum(r["projected"] for r in done) if done else None
    out["ok"] = len(done) == len(rows)
    return out


def _scale_line(r: dict) -> str:
    if "error" in r:
        return "FAILED " + r["error"].splitlines()[0]
    peak = f"{100 * r['frac_peak']:.0f}% of dense peak" if r["frac_peak"] else "peak unknown"
    naive = (f"; naive {r['naive_cells_s']:.2f} cells/s ({r['engine_over_naive']:.1f}x)"
             if "naive_cells_s" in r else "")
    return (f"{r['cells_s']:.1f} cells/s, {r['tokens_s']:.0f} tokens/s, {r['tflops']:.3f} TFLOP/s "
            f"({peak}; {100 * r['frac_mm']:.0f}% of torch.mm), {r['mem_gib']:.1f} GiB, "
            f"rows per pass {r['rows']}, paper grid {r['projected']:.0f} s{naive}")


# ---------------------------------------------------------------------------------------------
# (d) one sweep end to end through UnitRunner (no Ray), SQLite, a local output folder.


def sweep_spec(args, out: Path) -> dict:
    quick = args.quick
    return {
        "name": "gpu-check",
        "models": [args.sweep_model or ("tiny:llama" if quick else "shape:gpt2-small")],
        "dtype": "float32" if quick else args.dtype,
        "prompts": {"kinds": ["repeat", "control"], "T": 8 if quick else 64, "count": 1,
                    "seed": 0},
        "layers": [0, 1] if quick else [0, 3, 6, 9],
        "positions": {"start": 1, "stop": 9 if quick else 65, "step": 4 if quick else 8},
        "eps": {"start": 1e-3 if quick else 1e-5, "stop": 1e-1, "per_decade": 1 if quick else 2},
        "directions": {"family": "random", "count": 2 if quick else 4, "seed": 0},
        "linear": True,
        "cells_per_unit": 100 if quick else 400,
        "lease": {"ttl_s": 300, "heartbeat_s": 10, "max_attempts": 1},
        "output": str(out / "shards"),
    }


def part_sweep(args, report) -> dict:
    import pyarrow.parquet as pq

    from bench.e2e import engine_only
    from orchestrator.actor import UnitRunner
    from orchestrator.spec import spec_from_dict
    from orchestrator.submit import submit

    tmp = Path(tempfile.mkdtemp(prefix="unisweep-gpu-check-"))
    spec = spec_from_dict(sweep_spec(args, tmp))
    db_url = f"sqlite:///{tmp / 'sweep.db'}"
    t0 = time.perf_counter()
    store, plan, added = submit(spec, db_url)
    info = store.get_sweep(spec.name)
    counts = []
    for group in sorted({u.group for u in plan.units}):
        runner = UnitRunner(db_url, info.id, spec.name, group, info.output_dir,
                            ttl_s=spec.lease.ttl_s, heartbeat_s=spec.lease.heartbeat_s,
                            max_attempts=spec.lease.max_attempts, device=args.device,
                            batch=spec.lease.batch, fused_kl=spec.engine.fused_kl)
        try:
            counts.append(runner.run())
        finally:
            runner.stop()
    wall_s = time.perf_counter() - t0
    units = store.table_arrow("units", spec.name).to_pylist()
    errors = [u["error"] for u in units if u["status"] != "done"]
    shard_rows = sum(pq.ParquetFile(f).metadata.num_rows
                     for f in Path(info.output_dir).rglob("*.parquet"))
    compute_s = sum(u["compute_s"] or 0.0 for u in units)
    cells = sum(u["n_cells"] for u in units if u["status"] == "done")
    # The engine alone on the same grid, same device, after the sweep (the model is warm).
    eng = engine_only(spec, torch.get_num_threads(), device=args.device)
    out = {"model": spec.models[0], "dtype": spec.model_dtypes()[0][1], "device": args.device,
           "units": len(units), "units_added": added,
           "units_done": sum(u["status"] == "done" for u in units), "errors": errors[:3],
           "cells": cells, "result_rows": sum(u["result_rows"] or 0 for u in units),
           "shard_rows": shard_rows, "engine_rows": eng["rows"], "engine_cells": eng["cells"],
           "wall_s": wall_s, "unit_compute_s": compute_s, "engine_s": eng["seconds"],
           "cells_s_wall": cells / wall_s, "cells_s_units": cells / compute_s if compute_s else None,
           "cells_s_engine": eng["cells"] / eng["seconds"], "counts": counts, "tmp": str(tmp)}
    out["ok"] = bool(not errors and out["units_done"] == len(units) > 0
                     and out["shard_rows"] == out["result_rows"] == out["engine_rows"]
                     and cells == eng["cells"])
    print(f"  sweep {out['model']} on {args.device}: {out['units_done']}/{len(units)} units, "
          f"{cells} cells, {shard_rows} shard rows (engine alone {eng['rows']}); "
          f"{out['cells_s_wall']:.1f} cells/s wall, units' compute {out['cells_s_units'] or 0:.1f}"
          f" cells/s, engine alone {out['cells_s_engine']:.1f} cells/s", flush=True)
    if out["ok"]:  # keep the database and shards only when they show a problem
        shutil.rmtree(tmp, ignore_errors=True)
        del out["tmp"]
    return out


# ---------------------------------------------------------------------------------------------


def device_info(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device == "cuda":
        info["name"] = torch.cuda.get_device_name(0)
        info["memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        info["cuda"] = torch.version.cuda
    return info


def text_report(res: dict) -> str:
    """The JSON as tables (what BENCHMARKS.md quotes)."""
    d = res["device_info"]
    lines = [f"gpu_check on {d.get('name', d['processor'] or d['machine'])} ({d['device']}); "
             f"torch {d['torch']}, transformers {d.get('transformers')}, Python {d['python']}, "
             f"{d['threads']} threads; quick={res['quick']}; load average {res['load_start']} "
             f"at the start, {res.get('load_end')} at the end; {res.get('seconds', 0):.0f} s", ""]
    if "exact" in res:
        lines += ["(a) start-up check and engine vs naive reference (normwise relative error)", "",
                  "| family | dtype | start-up worst | rows | r | r_attn | r_mlp | kl | eps from | tol (kl) | ok |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["exact"].get("rows", []):
            if "error" in r:
                lines.append(f"| {r['family']} | {r['dtype']} | {r['error'].splitlines()[0]} |"
                             " | | | | | | | no |")
                continue
            e = r["errors"]
            lines.append(f"| {r['family']} | {r['dtype']} | {r['startup_worst']:.1e} | "
                         f"{r['rows']}/{r['expected_rows']} | {e['r']:.1e} | {e['r_attn']:.1e} | "
                         f"{e['r_mlp']:.1e} | {e['kl']:.1e} | {r['min_eps']:g} | {r['tol']:g} "
                         f"({r['tol_kl']:g}) | {'yes' if r['ok'] else 'NO'} |")
        lines.append("")
    if "scale" in res:
        s = res["scale"]
        st = s.get("settings", {})
        lines += [f"(b, c) paper grid, {s.get('dtype')}: T={st.get('T')}, "
                  f"{st.get('positions') or 'all'} positions of copy 1 timed, lp in {{0, L/4, "
                  f"L/2, 3L/4}}, {st.get('eps_count')} eps + linear x {st.get('directions')} "
                  f"directions, repeat + control; max_rows {st.get('max_rows') or 'from free memory'}; FLOPs are "
                  "those the cells need (bench/paper_scale.py grid_flops)", "",
                  "| model | cells/s | tokens/s | TFLOP/s | % dense peak | % torch.mm | peak GiB "
                  "| rows per pass | naive cells/s | engine/naive | 8-pair paper grid |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in s.get("rows", []):
            if "error" in r:
                lines.append(f"| {r['model']} | FAILED: {r['error'].splitlines()[0]} |||||||||")
                continue
            peak = f"{100 * r['frac_peak']:.1f}%" if r["frac_peak"] else "-"
            naive = (f"{r['naive_cells_s']:.2f} | {r['engine_over_naive']:.1f}x"
                     if "naive_cells_s" in r else "- | -")
            lines.append(f"| {r['model']} (L={r['L']}) | {r['cells_s']:.1f} | {r['tokens_s']:.0f} "
                         f"| {r['tflops']:.3g} | {peak} | {100 * r['frac_mm']:.0f}% "
                         f"(mm {r['mm_tflops']:.3f}) | {r['mem_gib']:.2f} | {r['rows']} | {naive} "
                         f"| {r['projected']:.0f} s |")
        if s.get("projected_total_s") is not None:
            lines.append(f"\nwhole paper grid, all shapes above: {s['projected_total_s']:.0f} s "
                         f"projected")
        lines.append("")
    if "sweep" in res:
        w = res["sweep"]
        if "error" in w:
            lines.append(f"(d) sweep: FAILED {w['error'].splitlines()[0]}")
        else:
            lines += [f"(d) one sweep through UnitRunner (no Ray), SQLite, local shards: "
                      f"{w['model']} {w['dtype']} on {w['device']}", "",
                      "| units done | cells | shard rows | engine-alone rows | wall s | cells/s wall "
                      "| cells/s in units | cells/s engine alone | ok |",
                      "|---|---|---|---|---|---|---|---|---|",
                      f"| {w['units_done']}/{w['units']} | {w['cells']} | {w['shard_rows']} | "
                      f"{w['engine_rows']} | {w['wall_s']:.1f} | {w['cells_s_wall']:.1f} | "
                      f"{w['cells_s_units'] or 0:.1f} | {w['cells_s_engine']:.1f} | "
                      f"{'yes' if w['ok'] else 'NO'} |"]
            if w["errors"]:
                lines.append("first error: " + w["errors"][0].splitlines()[0])
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.txt")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true",
                    help="CPU-sized: tiny models everywhere, a few cells (a test runs this)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated subset of {', '.join(PARTS)}")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="dtype of the paper-scale grid and the sweep")
    ap.add_argument("--shapes", default=None, help="comma-separated, default "
                    + ",".join(GPU_SHAPES) + " (tiny:llama with --quick)")
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--positions", type=int, default=16,
                    help="positions of copy 1 timed (evenly spaced; the full grid is projected)")
    ap.add_argument("--max-rows", type=int, default=None,
                    help="cap on rows per pass (default: the engine's choice from free memory)")
    ap.add_argument("--sweep-model", default=None)
    args = ap.parse_args(argv)
    bad = [p for p in args.parts.split(",") if p not in PARTS]
    if bad:
        ap.error(f"--parts: {bad[0]!r} is not one of {', '.join(PARTS)}")
    args.parts = [p for p in PARTS if p in args.parts.split(",")]
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here (use --device cpu)")
    if args.T < 2 or not 1 <= args.positions <= args.T:
        ap.error(f"--T >= 2 and --positions in 1..T, got T={args.T}, positions={args.positions}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res: dict = {"quick": args.quick, "parts": args.parts, "argv": sys.argv[1:] if argv is None
                 else list(argv), "device_info": device_info(args.device), "load_start": load_avg()}

    def report(partial: bool = False) -> None:
        res["seconds"] = time.perf_counter() - t0
        res["load_end"] = load_avg()
        res["complete"] = not partial
        (args.out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "gpu_check.txt").write_text(text_report(res))

    print(f"gpu_check: {res['device_info'].get('name', args.device)}, parts {args.parts}, "
          f"writing {args.out}/gpu_check.json and .txt", flush=True)
    runs = [("exact", part_exact, "exact" in args.parts),
            ("scale", part_scale, "scale" in args.parts or "naive" in args.parts),
            ("sweep", part_sweep, "sweep" in args.parts)]
    for name, fn, wanted in runs:
        if not wanted:
            continue
        try:
            res[name] = fn(args) if fn is part_exact else fn(args, report)
        except Exception as exc:  # noqa: BLE001 (a part that breaks is reported; the others run)
            res[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc(limit=-6)}
            print(f"  {name} FAILED: {res[name]['error']}\n{res[name]['traceback']}", flush=True)
        report(partial=True)
    res["ok"] = all(res[n].get("ok", False) for n, _, w in runs if w)
    report()
    print("\n" + text_report(res), flush=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
