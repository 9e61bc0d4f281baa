"""Cost of recording per-head responses: time per cell with and without, same process.

The SmolLM2 grid of bench/engine.py (T = 16, positions 1..16, 9 eps x 1 direction, 1 repeat
prompt; lp sets [0] and [0, L/3, 2L/3]), finite eps and linear response each, runs alternated
so that load changes hit both sides alike. Heads at the default offsets (0, 1..3, T-1, T),
and at every offset for comparison.

    python bench/heads.py [--model smollm2-135m] [--T 16] [--repeats 3]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--T", type=int, default=16)
    ap.add_argument("--eps-count", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lm = load_model(args.model, dtype="float32")
    L = lm.n_layers
    prompts = make_prompts(lm.token_space, T=args.T, count=1, seed=0, kinds=("repeat",))
    eps = [float(x) for x in torch.logspace(-4, 0, args.eps_count)]
    dirs = random_directions(lm.d_model, 1)
    positions = list(range(1, args.T + 1))
    offsets = default_offsets(args.T)
    print(f"model {args.model} float32, L={L}, T={args.T}, torch threads "
          f"{torch.get_num_threads()}, load average at start {os.getloadavg()}")
    print("| lp set | kind | cells | s/cell, no heads | s/cell, heads (default offsets) | "
          "ratio | s/cell, heads (all offsets) | ratio | load average (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for lps in ([0], [0, L // 3, 2 * L // 3]):
        for kind in ("finite", "linear"):
            e = eps if kind == "finite" else []
            cells = len(lps) * len(positions) * (len(e) or 1) * len(dirs)
            times: dict[str, list[float]] = {"off": [], "default": [], "all": []}
            for _ in range(args.repeats):
                for mode in times:
                    t0 = time.perf_counter()
                    compute_tables(lm, prompts, lps, positions, e, dirs, linear=kind == "linear",
                                   heads=mode != "off",
                                   head_offsets=offsets if mode == "default" else None)
                    times[mode].append(time.perf_counter() - t0)
            # Ratios of the per-repeat pairs (run back to back), then their median.
            r_def = statistics.median(d / o for d, o in zip(times["default"], times["off"]))
            r_all = statistics.median(a / o for a, o in zip(times["all"], times["off"]))
            per = {m: min(t) / cells for m, t in times.items()}
            print(f"| {lps} | {kind} | {cells} | {per['off']:.4f} | {per['default']:.4f} | "
                  f"{r_def:.3f} | {per['all']:.4f} | {r_all:.3f} | {os.getloadavg()[0]:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
