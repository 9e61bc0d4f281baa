"""How the engine's cost grows with the prompt length T (and so n = 2T + 1).

Same grid at each T: lp in {0, L/2}, 4 positions spread over copy 1, 9 eps x 1 direction,
one repeat prompt; seconds per cell, and per cell-token (cells x computed positions), as
ratios to T = 16 from the same run.

    python bench/cost_vs_T.py [--model smollm2-135m] [--Ts 16,32,64,128]
"""

from __future__ import annotations

import argparse
import time

import torch

from tasks.directions import random_directions
from tasks.engine import compute_responses
from tasks.models import load_model
from tasks.prompts import make_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--Ts", default="16,32,64,128")
    args = ap.parse_args()
    lm = load_model(args.model)
    L = lm.n_layers
    lps = [0, L // 2]
    eps = [float(x) for x in torch.logspace(-4, 0, 9)]
    dirs = random_directions(lm.d_model, 1)
    print(f"model {args.model} float32, L={L}, lp={lps}, 9 eps x 1 direction, 4 positions in copy 1")
    print("| T | n | cells | seconds | cells/s | s/cell vs T=16 | s/(cell x position) vs T=16 |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for T in [int(t) for t in args.Ts.split(",")]:
        prompts = make_prompts(lm.token_space, T=T, count=1, seed=0, kinds=("repeat",))
        n = prompts[0].n
        positions = sorted({1, T // 4, T // 2, T})
        compute_responses(lm, prompts, lps, positions[:1], eps[:1], dirs)  # warm-up
        t0 = time.perf_counter()
        compute_responses(lm, prompts, lps, positions, eps, dirs)
        dt = time.perf_counter() - t0
        cells = len(lps) * len(positions) * len(eps)
        token_work = sum(n - j for j in positions)  # positions each pass computes
        per_cell, per_token = dt / cells, dt / (len(lps) * len(eps) * token_work)
        if base is None:
            base = (per_cell, per_token)
        print(f"| {T} | {n} | {cells} | {dt:.1f} | {cells / dt:.1f} | {per_cell / base[0]:.2f}x "
              f"| {per_token / base[1]:.2f}x |")


if __name__ == "__main__":
    main()
