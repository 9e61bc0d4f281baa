"""The engine before and after cross-position batching and the new KL, beside the naive loop,
interleaved in one process; and the fraction of torch.mm it reaches on a paper-scale shape.

Methods (same grid, same outputs: R, sections, KL):
  before      one position per pass, the KL as it was (bench/kl.py's kl_before)
  per-pos     one position per pass, the centred KL
  batched     the planner's passes (positions share a pass), the centred KL
  batched+fk  the same with the fused (compiled) KL, if it passes its accuracy gate
  naive       one hooked full forward per cell (a subset of cells)

    python bench/batching.py [--grids narrow,lp3] [--repeat 3] [--mm-shape llama-3.2-3b/4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import time_naive
from bench.kl import kl_before
from bench.paper_scale import ShapeCost, engine_flops, matmul_rate, paper_grid
from tasks import engine
from tasks import kl as klmod
from tasks.directions import random_directions
from tasks.models import load_model
from tasks.prompts import make_prompts

GRIDS = {
    # issue 19's narrow grid: T = 32, 8 positions of copy 1, 4 eps, 1 direction, lp = 0
    "narrow": dict(T=32, positions=list(range(1, 9)), eps=4, dirs=1, lps="0"),
    # bench/engine.py's grid: T = 16, every position of copy 1, 9 eps, 1 direction, lp 0/10/20
    "lp3": dict(T=16, positions=list(range(1, 17)), eps=9, dirs=1, lps="0,L/3,2L/3"),
}


def _lps(spec: str, L: int) -> list[int]:
    return sorted({eval(x, {"L": L}) for x in spec.split(",")})  # noqa: S307 (our own table)


def run_method(name: str, lm, prompts, lps, positions, eps, dirs, fused) -> float:
    """Seconds for the whole grid by one method."""
    real_kl = engine.kl_from_logit_change
    if name == "before":
        engine.kl_from_logit_change = kl_before
    klmod._fused = fused if name.endswith("+fk") else None
    try:
        t0 = time.perf_counter()
        engine.compute_responses(lm, prompts, lps, positions, eps, dirs,
                                 batch_positions=name.startswith("batched"))
        return time.perf_counter() - t0
    finally:
        engine.kl_from_logit_change = real_kl
        klmod._fused = None


def bench_grid(lm, name: str, args, fused) -> None:
    g = GRIDS[name]
    L = lm.n_layers
    lps = _lps(g["lps"], L)
    prompts = make_prompts(lm.token_space, T=g["T"], count=1, seed=0, kinds=("repeat",))
    eps = [float(x) for x in torch.logspace(-4, 0, g["eps"])]
    dirs = random_directions(lm.d_model, g["dirs"])
    cells = len(lps) * len(g["positions"]) * len(eps) * len(dirs)
    methods = ["before", "per-pos", "batched"] + (["batched+fk"] if fused else [])
    times: dict[str, list[float]] = {m: [] for m in methods + ["naive"]}
    run_method("batched", lm, prompts, lps, g["positions"], eps, dirs, fused)  # warm-up
    for _rep in range(args.repeat):
        for m in methods:
            times[m].append(run_method(m, lm, prompts, lps, g["positions"], eps, dirs, fused))
        secs, n_cells = time_naive(lm, prompts, lps, g["positions"], eps, dirs, args.naive_cells)
        times["naive"].append(secs * cells / n_cells)  # scaled to the whole grid
    print(f"\ngrid {name}: T={g['T']}, lp {lps}, positions {g['positions'][0]}.."
          f"{g['positions'][-1]} ({len(g['positions'])}), {len(eps)} eps x {len(dirs)} "
          f"direction(s), {cells} cells; {args.repeat} interleaved repetitions; "
          f"load {os.getloadavg()}")
    print("| method | cells/s (median) | vs before (median of paired ratios) | vs naive |")
    print("|---|---|---|---|")
    for m in methods + ["naive"]:
        med = statistics.median(times[m])
        vs_before = statistics.median(b / t for b, t in zip(times["before"], times[m]))
        vs_naive = statistics.median(n / t for n, t in zip(times["naive"], times[m]))
        print(f"| {m} | {cells / med:.2f} | {vs_before:.2f}x | {vs_naive:.2f}x |", flush=True)


def bench_mm(short: str, args, fused) -> None:
    """paper_scale.py's CPU grid on one shape: FLOP/s of the engine's passes / torch.mm's."""
    lm = load_model(f"shape:{short}", dtype="float32", check=False)
    g = paper_grid(lm, args.mm_T, 2, (0, 0.25, 0.5, 0.75)[: args.mm_lps], 11, 4)
    n = g.prompts[0].n
    cost = ShapeCost.of(lm)
    flops, _ = engine_flops(cost, lm, n, g.lps, g.positions, len(g.eps) * len(g.dirs),
                            len(g.prompts), 90)
    print(f"\nshape:{short} float32, T={args.mm_T}, lp {g.lps}, positions {g.positions}, 11 eps x 4 "
          f"directions, repeat + control ({g.cells} cells); load {os.getloadavg()}")
    print("| method | s | TFLOP/s | torch.mm TFLOP/s (before, after) | % of torch.mm |")
    print("|---|---|---|---|---|")
    for m in ["before", "batched"] + (["batched+fk"] if fused else []):
        mm0 = matmul_rate(torch.float32, lm.device)
        secs = run_method(m, lm, g.prompts, g.lps, g.positions, g.eps, g.dirs, fused)
        mm1 = matmul_rate(torch.float32, lm.device)
        mm = max(mm0, mm1)
        print(f"| {m} | {secs:.1f} | {flops / secs / 1e12:.3f} | {mm0 / 1e12:.3f}, "
              f"{mm1 / 1e12:.3f} | {100 * flops / secs / mm:.0f}% |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--grids", default="narrow,lp3")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--naive-cells", type=int, default=12)
    ap.add_argument("--no-fused", action="store_true")
    ap.add_argument("--mm-shape", default="", help="e.g. llama-3.2-3b/4 ('' = skip)")
    ap.add_argument("--mm-T", type=int, default=32)
    ap.add_argument("--mm-lps", type=int, default=4, help="how many of lp in {0, L/4, L/2, 3L/4}")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load {os.getloadavg()}")
    fused = None
    if not args.no_fused:
        t0 = time.perf_counter()
        if klmod.use_fused_kl(True, dtypes=(torch.float32,)):
            fused = klmod._fused
        klmod._fused = None
        print(f"fused KL gate: {'passed' if fused else 'failed'} in "
              f"{time.perf_counter() - t0:.0f} s")
    lm = load_model(args.model, dtype="float32")
    for name in (x for x in args.grids.split(",") if x):
        bench_grid(lm, name, args, fused)
    if args.mm_shape:
        bench_mm(args.mm_shape, args, fused)
    print(f"\nload at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
