"""Paper-scale benchmark: the engine on the paper's grid for each model shape, beside the naive
per-cell loop, in one process (the peers, nnsight and TransformerBridge: bench/peers.py).

Per model and dtype: cells/s, tokens/s, achieved FLOP/s counted from the shape and its fraction
of the device's peak (dense datasheet peak on CUDA; measured torch.mm on the CPU), peak memory,
rows per pass, and the projected time of the whole grid for 8 prompt pairs. shape:* models have
random weights (timings are real, responses are not the real model's).

    python bench/paper_scale.py --device cpu [--quick] [--shapes gpt2-small,smollm2-135m]
    python bench/paper_scale.py --device cuda --shapes gemma-2-2b,llama-3.2-3b,gpt2-xl
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from dataclasses import dataclass

import torch

from tasks.directions import random_directions
from tasks.engine import compute_responses
from tasks.models import load_model
from tasks.prompts import make_prompts

CPU_SHAPES = ["gpt2-small", "gpt2-xl/4", "gemma-2-2b/4", "llama-3.2-3b/4", "smollm2-135m"]
GPU_SHAPES = ["gemma-2-2b", "llama-3.2-3b", "gpt2-xl", "smollm2-135m"]
# Dense (no sparsity) datasheet peaks, FLOP/s, by a substring of the CUDA device name, most
# specific first; float32 is the non-tensor-core rate (torch leaves TF32 off for matmuls by
# default). A device not listed has no peak (None), never a guess.
DENSE_PEAK = {"H100 PCIe": {torch.bfloat16: 756e12, torch.float32: 51e12},
              "H100": {torch.bfloat16: 989e12, torch.float32: 67e12},
              "H200": {torch.bfloat16: 989e12, torch.float32: 67e12},
              "A100": {torch.bfloat16: 312e12, torch.float32: 19.5e12}}
PAIRS_PROJECTED = 8


def model_name(short: str) -> str:
    """A shape's short name -> shape:<name>; aliases and full names (tiny:llama) unchanged."""
    return short if short in ("smollm2-135m", "gemma3-270m") or ":" in short else f"shape:{short}"


# ---------------------------------------------------------------------------------------------
# FLOPs counted from the shape.


@dataclass
class ShapeCost:
    block_weights: int  # weight-matrix parameters of one block
    d_attn: int  # heads x head_dim (what the score and value products run over)
    head: int  # d_model x vocab
    n_layers: int

    @classmethod
    def of(cls, lm) -> ShapeCost:
        blk = lm.adapter.block_list(lm.model)[0]
        w = sum(p.numel() for p in blk.parameters() if p.ndim == 2)
        cfg = lm.model.config
        heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
        head_dim = getattr(cfg, "head_dim", None) or lm.d_model // heads
        return cls(w, heads * head_dim, lm.d_model * cfg.vocab_size, lm.n_layers)

    def blocks(self, first_pos: int, n: int, n_blocks: int) -> float:
        """Blocks on positions first_pos..n-1 of one row: 2 x weights per token, plus QK^T and
        AV over the i + 1 causal keys of position i."""
        s = n - first_pos
        keys = sum(i + 1 for i in range(first_pos, n))
        return n_blocks * (2.0 * self.block_weights * s + 4.0 * self.d_attn * keys)

    def suffix_pass(self, lp: int, start: int, n: int, rows: int, kl: bool = True) -> float:
        """One engine pass: blocks lp..L-1 and the head on positions start..n-1, `rows` rows."""
        head = 2.0 * self.head * (n - start) if kl else 0.0
        return rows * (self.blocks(start, n, self.n_layers - lp) + head)

    def clean(self, n: int, prompts: int) -> float:
        return prompts * self.blocks(0, n, self.n_layers)


def grid_flops(cost: ShapeCost, n: int, lps, positions, cells: int, linear_dirs: int,
               prompts: int) -> tuple[float, float]:
    """(FLOPs the grid's cells need, token-rows they need), counted from the shape alone.

    Per cell: blocks lp..L-1 and the head (the KL) on positions j..n-1; a linear cell counts
    twice (value and tangent go through every matmul); plus one clean pass per prompt. Not
    counted: the engine's same-path baseline rows and the clean positions a batched pass
    recomputes before j. So the rate is a lower bound on what the device executes, and it
    does not depend on how the engine lays out its passes.
    """
    flops = cost.clean(n, prompts)
    tokens = float(prompts * n)
    rows = prompts * (cells + 2 * linear_dirs)
    for lp in lps:
        for j in positions:
            flops += cost.suffix_pass(lp, j, n, rows)
            tokens += rows * (n - j)
    return flops, tokens


# ---------------------------------------------------------------------------------------------
# Device: peaks and memory.


def matmul_rate(dtype: torch.dtype, device: torch.device, size: int | None = None,
                repeat: int = 5) -> float:
    """Best-of-`repeat` FLOP/s of torch.mm (size x size; 2048 on a CPU, 8192 on a GPU, where
    smaller products do not fill the device) on this device's threads."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeat + 1):  # the first call warms up
        sync_device(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync_device(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / best


def dense_peak(dtype: torch.dtype, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in DENSE_PEAK.items():
        if key in name:
            return peaks.get(dtype)
    return None


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


# ---------------------------------------------------------------------------------------------
# The engine and the naive loop.


@dataclass
class Grid:
    T: int
    lps: list[int]
    positions: list[int]
    eps: list[float]
    dirs: torch.Tensor
    prompts: list
    linear: bool = False  # also the exact eps -> 0 response, one cell per direction

    @property
    def cells(self) -> int:
        per_pj = (len(self.eps) + int(self.linear)) * len(self.dirs)
        return len(self.prompts) * len(self.lps) * len(self.positions) * per_pj


def paper_grid(lm, T: int, n_positions: int | None, lp_fracs, n_eps: int, n_dirs: int,
               kinds=("repeat", "control"), linear: bool = False) -> Grid:
    L = lm.n_layers
    lps = sorted({int(f * L) for f in lp_fracs})
    copy1 = list(range(1, T + 1))
    if n_positions is None or n_positions >= T:
        positions = copy1
    else:  # evenly spaced over copy 1, both ends included
        positions = sorted({copy1[round(k * (T - 1) / max(1, n_positions - 1))]
                            for k in range(n_positions)})
    eps = [float(x) for x in torch.logspace(-5, 0, n_eps, dtype=torch.float64)]
    prompts = make_prompts(lm.token_space, T=T, count=1, seed=0, kinds=kinds)
    return Grid(T, lps, positions, eps, random_directions(lm.d_model, n_dirs), prompts, linear)


def time_engine(lm, g: Grid, max_rows: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        sync_device(lm.device)
        t0 = time.perf_counter()
        compute_responses(lm, g.prompts, g.lps, g.positions, g.eps, g.dirs, linear=g.linear,
                          max_rows=max_rows)
        sync_device(lm.device)
        best = min(best, time.perf_counter() - t0)
    return best


def naive_cells_per_s(lm, g: Grid, max_cells: int) -> float:
    from bench.engine import time_naive

    secs, cells = time_naive(lm, g.prompts, g.lps, g.positions, g.eps, g.dirs, max_cells)
    return cells / secs


# ---------------------------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _rows_per_pass(lm, n: int, linear: bool, max_rows: int | None) -> int:
    """The engine's rows per pass for this model and length (its memory planner's choice,
    capped by max_rows), as compute_responses takes it."""
    from tasks.batching import rows_per_pass

    return rows_per_pass(lm, n, None, linear, max_rows).rows


def bench_model(short: str, dtype: str, device: torch.device, args) -> dict:
    """The engine on the paper grid of one model (args: T, positions, eps_count, directions,
    max_rows, repeat, naive_cells, linear), with the FLOP rate and the whole grid projected."""
    tdtype = getattr(torch, dtype)
    lm = load_model(model_name(short), dtype=dtype, device=str(device), check=False)
    reset_peak_memory(device)
    g = paper_grid(lm, args.T, args.positions, (0, 0.25, 0.5, 0.75), args.eps_count,
                   args.directions, linear=getattr(args, "linear", False))
    n = g.prompts[0].n
    cells_per_pj, linear_dirs = len(g.eps) * len(g.dirs), len(g.dirs) if g.linear else 0
    cost = ShapeCost.of(lm)
    peak_before = matmul_rate(tdtype, device)
    secs = time_engine(lm, g, args.max_rows, args.repeat)
    peak_after = matmul_rate(tdtype, device)
    mm = max(peak_before, peak_after)
    flops, tokens = grid_flops(cost, n, g.lps, g.positions, cells_per_pj, linear_dirs,
                               len(g.prompts))
    achieved = flops / secs
    datasheet = dense_peak(tdtype, device)
    # The whole paper grid: every position of copy 1, 8 prompt pairs, at the measured rate.
    full, _ = grid_flops(cost, n, g.lps, list(range(1, args.T + 1)), cells_per_pj, linear_dirs,
                         2 * PAIRS_PROJECTED)
    row = dict(model=short, random=short.startswith(("gemma", "llama", "gpt2")), dtype=dtype,
               L=lm.n_layers, n=n, lps=g.lps, positions=len(g.positions), cells=g.cells,
               linear=g.linear, secs=secs, cells_s=g.cells / secs, tokens_s=tokens / secs,
               tflops=achieved / 1e12, mm_tflops=mm / 1e12, frac_mm=achieved / mm,
               peak_tflops=datasheet / 1e12 if datasheet else None,
               frac_peak=(achieved / datasheet) if datasheet else None,
               mem_gib=peak_memory_gib(device), rows=_rows_per_pass(lm, n, g.linear, args.max_rows),
               projected=full / achieved)
    if args.naive_cells:
        row["naive_cells_s"] = naive_cells_per_s(lm, g, args.naive_cells)
    del lm
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", default=None,
                    help="comma-separated: shape names (tasks/shapes.py) or smollm2-135m")
    ap.add_argument("--dtypes", default=None, help="comma-separated; CPU default float32 "
                    "(and bfloat16 for gpt2-small only: bfloat16 matmuls are slow on CPUs)")
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--positions", type=int, default=None,
                    help="positions of copy 1 timed (evenly spaced); default all on CUDA, 2 on CPU")
    ap.add_argument("--eps-count", type=int, default=11)
    ap.add_argument("--directions", type=int, default=4)
    ap.add_argument("--linear", action="store_true",
                    help="also the exact eps -> 0 response (one more cell per direction)")
    ap.add_argument("--max-rows", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=2, help="best-of for the engine timing")
    ap.add_argument("--naive-cells", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="CI size: T=16, 2 positions, best-of-1")
    args = ap.parse_args()
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if args.quick:
        args.T, args.repeat, args.positions = 16, 1, args.positions or 2
    if args.positions is None and cpu:
        args.positions = 2
    if args.max_rows is None:
        # CPU: both prompts of a pair share a pass (2 x (1 + 44) rows); CUDA: 8 pairs' worth.
        args.max_rows = 2 * (1 + args.eps_count * args.directions) if cpu else 16 * (
            1 + args.eps_count * args.directions)
    shapes = ([s for s in args.shapes.split(",") if s] if args.shapes is not None
              else (CPU_SHAPES if cpu else GPU_SHAPES))
    dtypes = args.dtypes.split(",") if args.dtypes else (["float32"] if cpu else ["bfloat16", "float32"])

    threads = torch.get_num_threads()
    print(f"device: {torch.cuda.get_device_name(device) if not cpu else platform.processor() or platform.machine()}"
          f"; torch {torch.__version__}, {threads} threads; load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"grid: T={args.T} (n={2 * args.T + 1}), lp in {{0, L/4, L/2, 3L/4}}, "
          f"{args.eps_count} eps in [1e-5, 1]{' + linear' if args.linear else ''} x "
          f"{args.directions} directions, repeat + control; "
          f"{'all' if not args.positions else args.positions} positions of copy 1 timed; "
          f"max_rows {args.max_rows} (engine default: from the memory budget)")
    if shapes:
        print("`*` = shape-only model, random weights (not real weights)\n")
        print("| model | dtype | cells/s | tokens/s | TFLOP/s | % of torch.mm | % of dense peak "
              "| peak mem GiB | rows/pass | naive cells/s | engine/naive | 8-pair grid (projected) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    runs = [(s, d) for s in shapes for d in dtypes]
    if cpu and not args.dtypes and shapes:
        runs.append(("gpt2-small", "bfloat16"))
    for short, dtype in runs:
        r = bench_model(short, dtype, device, args)
        naive = r.get("naive_cells_s")
        peak = f"{100 * r['frac_peak']:.0f}%" if r["frac_peak"] else "-"
        print(f"| {short}{'*' if r['random'] else ''} (L={r['L']}) | {dtype} | {r['cells_s']:.0f} "
              f"| {r['tokens_s']:.0f} | {r['tflops']:.3f} | {100 * r['frac_mm']:.0f}% "
              f"(mm {r['mm_tflops']:.3f}) | {peak} | {r['mem_gib']:.1f} | {r['rows']} "
              f"| {naive:.2f} | {r['cells_s'] / naive:.0f}x | {fmt_time(r['projected'])} |",
              flush=True)
    print(f"\nload average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
