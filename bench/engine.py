"""Cells per second of the fast engine vs the naive hook-per-cell reference, same process.

Also prints the grid's FLOP limit: naive FLOPs / the FLOPs the engine cannot avoid (blocks
lp..L-1 on positions j..n-1, plus the head there for the KL). Ratios, not absolute times,
are the result: these machines are noisy.

    python bench/engine.py [--model smollm2-135m] [--T 16] [--eps-count 9] [--naive-cells 48]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the naive reference lives in tests/

from tasks.directions import random_directions
from tasks.engine import clean_pass, compute_responses, perturb_group
from tasks.models import load_model
from tasks.prompts import make_prompts
from tests.reference import _run as naive_forward


def block_flops_per_token(lm, n_ctx: int) -> float:
    """2 x weights of one block + attention scores/values over n_ctx keys."""
    blk = lm.adapter.block_list(lm.model)[0]
    weights = sum(p.numel() for p in blk.parameters() if p.ndim == 2)
    return 2.0 * weights + 4.0 * n_ctx * lm.d_model


def head_flops_per_token(lm) -> float:
    return 2.0 * lm.d_model * lm.model.config.vocab_size


def grid_limit(lm, n: int, lps, positions) -> float:
    """Naive FLOPs / unavoidable FLOPs over the grid (same cells, one eps x direction each)."""
    L = lm.n_layers
    naive = unavoidable = 0.0
    for lp in lps:
        for j in positions:
            naive += L * n * block_flops_per_token(lm, n) + n * head_flops_per_token(lm)
            s = n - j
            unavoidable += (L - lp) * s * block_flops_per_token(lm, n) + s * head_flops_per_token(lm)
    return naive / unavoidable


def time_engine(lm, prompts, lps, positions, eps, dirs, reuse_prefix=True, repeat=2) -> float:
    """Best-of-`repeat` seconds for the whole grid through the engine."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        if reuse_prefix:
            compute_responses(lm, prompts, lps, positions, eps, dirs)
        else:
            ids = torch.stack([p.input_ids for p in prompts])
            clean = clean_pass(lm, ids, lps)
            e = torch.tensor(eps, dtype=torch.float64)
            for lp in lps:
                for j in positions:
                    perturb_group(lm, clean, lp, j, e, dirs, reuse_prefix=False)
        best = min(best, time.perf_counter() - t0)
    return best


def time_naive(lm, prompts, lps, positions, eps, dirs, max_cells: int) -> tuple[float, int]:
    """Seconds and cells of the naive loop: a clean forward per prompt, then per cell one
    full hooked forward (perturbation added by a pre-hook) and the same outputs as the
    engine: R at every level and position, the attention and MLP sections, and the KL."""
    cells = [(p, lp, j, e, d) for p in prompts for lp in lps for j in positions
             for e in eps for d in range(len(dirs))]
    step = max(1, len(cells) // max_cells)
    cells = cells[::step][:max_cells]
    t0 = time.perf_counter()
    clean = {}
    for p, lp, j, e, d in cells:
        key = (p.id, p.kind)
        if key not in clean:
            x0, a0, m0, z0 = naive_forward(lm, p.input_ids)
            clean[key] = (x0, a0, m0, torch.log_softmax(z0, -1), x0.norm(dim=-1))
        x0, a0, m0, logp, den = clean[key]
        delta = e * x0[lp, j].norm() * dirs[d].to(x0.dtype)
        x1, a1, m1, z1 = naive_forward(lm, p.input_ids, lp, j, delta)
        _r = (x1 - x0).norm(dim=-1) / den
        _ra = (a1 - a0).norm(dim=-1) / den[:-1]
        _rm = (m1 - m0).norm(dim=-1) / den[:-1]
        logq = torch.log_softmax(z1, -1)
        _kl = (logq.exp() * (logq - logp)).sum(-1)
    return time.perf_counter() - t0, len(cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--T", type=int, default=16)
    ap.add_argument("--eps-count", type=int, default=9, help="eps values, log-spaced 1e-4..1")
    ap.add_argument("--directions", type=int, default=1)
    ap.add_argument("--naive-cells", type=int, default=48)
    args = ap.parse_args()

    torch.set_num_threads(torch.get_num_threads())
    lm = load_model(args.model, dtype=args.dtype)
    L = lm.n_layers
    prompts = make_prompts(lm.token_space, T=args.T, count=1, seed=0, kinds=("repeat",))
    n = prompts[0].n
    eps = [float(x) for x in torch.logspace(-4, 0, args.eps_count)]
    dirs = random_directions(lm.d_model, args.directions)
    positions = list(range(1, args.T + 1))  # copy 1
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch threads "
          f"{torch.get_num_threads()}; model {args.model} ({args.dtype}), L={L}, n={n}")
    print(f"grid: positions 1..{args.T} (copy 1), {len(eps)} eps x {len(dirs)} directions per "
          "position, 1 prompt")
    print("| lp set | engine cells/s | batched, no prefix reuse | naive cells/s | engine/naive "
          "| FLOP limit | engine/naive as % of limit |")
    print("|---|---|---|---|---|---|---|")
    for lps in ([0], [0, L // 3, 2 * L // 3]):
        cells = len(prompts) * len(lps) * len(positions) * len(eps) * len(dirs)
        t_engine = time_engine(lm, prompts, lps, positions, eps, dirs)
        t_batched = time_engine(lm, prompts, lps, positions, eps, dirs, reuse_prefix=False,
                                repeat=1)
        t_naive, naive_cells = time_naive(lm, prompts, lps, positions, eps, dirs,
                                          args.naive_cells)
        engine_cps, batched_cps = cells / t_engine, cells / t_batched
        naive_cps = naive_cells / t_naive
        limit = grid_limit(lm, n, lps, positions)
        speedup = engine_cps / naive_cps
        print(f"| {lps} | {engine_cps:.1f} | {batched_cps:.1f} | {naive_cps:.2f} | "
              f"{speedup:.2f}x | {limit:.2f}x | {100 * speedup / limit:.0f}% |")


if __name__ == "__main__":
    main()
