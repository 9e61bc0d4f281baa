"""Cost of recording per-head responses: time per cell with and without, same process.

The SmolLM2 grid of bench/engine.py (T = 16, 9 eps x 1 direction, 1 repeat prompt; lp sets
[0] and [0, L/3, 2L/3]; positions 1..16, or a subset with --positions when the machine is
busy), finite eps and linear response each, runs alternated so that load changes hit both
sides alike. Heads at the default offsets (0, 1..3, T-1, T), and with --all-offsets at every
offset too. Wall time and this process's CPU time are both reported; on a shared machine
the CPU-time ratio is the steadier one. Each (lp set, kind) first runs every mode once
untimed (first-call costs: allocator, autograd's forward-mode setup), then alternates the
modes in ABBA order (off, heads, heads, off, ...) so that neither side always runs first;
with --raw every timed run is printed with the load average beside it.

    python bench/heads.py [--model smollm2-135m] [--T 16] [--repeats 3] [--positions 1,9]
                          [--lp-sets '0;L/3'] [--all-offsets] [--raw]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from tasks.directions import random_directions
from tasks.engine import compute_tables
from tasks.heads import default_offsets
from tasks.models import load_model
from tasks.prompts import make_prompts


def _once(lm, prompts, lps, positions, eps, dirs, linear, offsets, mode) -> tuple[float, float]:
    """One compute_tables call of the grid: (wall s, this process's CPU s)."""
    t0, c0 = time.perf_counter(), time.process_time()
    compute_tables(lm, prompts, lps, positions, eps, dirs, linear=linear, heads=mode != "off",
                   head_offsets=offsets if mode == "default" else None)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--T", type=int, default=16)
    ap.add_argument("--eps-count", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--positions", default=None, help="comma-separated j (default: 1..T)")
    ap.add_argument("--all-offsets", action="store_true", help="also time heads at every offset")
    ap.add_argument("--lp-sets", default="0;L/3", help="'0' and/or 'L/3' (lp in 0, L/3, 2L/3), "
                    "separated by ';'")
    ap.add_argument("--raw", action="store_true", help="print every timed run")
    args = ap.parse_args()
    lm = load_model(args.model, dtype="float32")
    L = lm.n_layers
    prompts = make_prompts(lm.token_space, T=args.T, count=1, seed=0, kinds=("repeat",))
    eps = [float(x) for x in torch.logspace(-4, 0, args.eps_count)]
    dirs = random_directions(lm.d_model, 1)
    positions = (list(range(1, args.T + 1)) if args.positions is None
                 else [int(x) for x in args.positions.split(",")])
    offsets = default_offsets(args.T)
    print(f"model {args.model} float32, L={L}, T={args.T}, torch threads "
          f"{torch.get_num_threads()}, load average at start {os.getloadavg()}")
    modes = ["off", "default"] + (["all"] if args.all_offsets else [])
    print(f"positions {positions}")
    print("| lp set | kind | cells | s/cell no heads (wall) | s/cell heads (wall) | wall ratio | "
          "wall ratio of sums | CPU-time ratio | all offsets: CPU-time ratio | load average (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    lp_sets = {"0": [0], "L/3": [0, L // 3, 2 * L // 3]}
    for lps in (lp_sets[k] for k in args.lp_sets.split(";")):
        for kind in ("finite", "linear"):
            e = eps if kind == "finite" else []
            cells = len(lps) * len(positions) * (len(e) or 1) * len(dirs)
            wall: dict[str, list[float]] = {m: [] for m in modes}
            cpu: dict[str, list[float]] = {m: [] for m in modes}
            grid = (lm, prompts, lps, positions, e, dirs, kind == "linear", offsets)

            for mode in modes:  # untimed: first-call costs must not land on one side
                _once(*grid, mode)
            for r in range(args.repeats):
                # ABBA: the pair's first run alternates, so a drift in load or a slow first
                # run of a pair does not always hit the same side.
                for mode in (modes if r % 2 == 0 else modes[::-1]):
                    w, c = _once(*grid, mode)
                    wall[mode].append(w)
                    cpu[mode].append(c)
                    if args.raw:
                        print(f"  raw: {lps} {kind} repeat {r} {mode}: wall {w:.2f} s, "
                              f"CPU {c:.2f} s, load {os.getloadavg()[0]:.1f}", flush=True)

            def ratio(t: dict[str, list[float]], mode: str) -> str:
                # Ratios of runs made back to back, then their median.
                if mode not in t:
                    return "-"
                return f"{statistics.median(a / b for a, b in zip(t[mode], t['off'])):.3f}"

            print(f"| {lps} | {kind} | {cells} | {min(wall['off']) / cells:.4f} | "
                  f"{min(wall['default']) / cells:.4f} | {ratio(wall, 'default')} | "
                  f"{sum(wall['default']) / sum(wall['off']):.3f} | "
                  f"{ratio(cpu, 'default')} | {ratio(cpu, 'all')} | {os.getloadavg()[0]:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
