"""Measures behind the batch planner's constants (tasks.batching): peak memory of a suffix
pass against the per-row activation model, and the time of a pass against its row-positions
(the per-pass overhead, and where a larger pass stops paying on the CPU).

Peak memory is the process's peak resident set since a reset (/proc/self/clear_refs, Linux),
or torch.cuda.max_memory_allocated on a GPU. Timings are best-of-`repeat`, load printed.

    python bench/memory.py [--model smollm2-135m] [--T 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import best_time  # noqa: E402
from tasks.batching import KL_TEMPORARIES, SAFETY, RowModel
from tasks.directions import random_directions
from tasks.engine import clean_pass, perturb_sites, suffix_start
from tasks.models import load_model
from tasks.prompts import make_prompts


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_bytes(fn, device: torch.device) -> int:
    """Peak memory fn() adds to what is resident when it starts."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current resident set
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--T", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sites", default="1,2,4,8,16,32", help="positions per pass (4 cells each)")
    args = ap.parse_args()
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    prompts = make_prompts(lm.token_space, T=args.T, count=1, seed=0, kinds=("repeat",))
    ids = torch.stack([p.input_ids for p in prompts]).to(lm.device)
    n = ids.shape[1]
    clean = clean_pass(lm, ids, [0])
    eps = torch.tensor([1e-4, 1e-3, 1e-2, 1e-1], dtype=torch.float64)
    dirs = random_directions(lm.d_model, 1)
    model = RowModel.of(lm)
    rd = 8 if lm.dtype == torch.float64 else 4
    vocab = lm.model.config.vocab_size
    print(f"{args.model} {args.dtype} on {args.device}, n = {n}, torch threads "
          f"{torch.get_num_threads()}; load {os.getloadavg()}")
    print("| positions per pass | rows | row-positions | peak MiB | model MiB (no safety) | "
          "peak / model | s per pass | us per row-position |")
    print("|---|---|---|---|---|---|---|---|")
    points = []
    for J in (int(x) for x in args.sites.split(",")):
        js = list(range(1, 1 + J))
        start = suffix_start(js[0], n, lm.dtype)
        s = n - start
        rows = 1 + J * len(eps)

        def run(js=js):
            perturb_sites(lm, clean, 0, js, eps, dirs)

        run()  # warm-up
        peak = peak_bytes(run, lm.device)
        kl_chunk = max(1, (128 << 20) // (s * vocab * rd * KL_TEMPORARIES))
        predicted = (rows * model.row_bytes(s, n, lm.n_layers, False) / SAFETY
                     + min(rows, kl_chunk) * s * vocab * rd * KL_TEMPORARIES)
        secs = best_time(run, args.repeat, warm_up=False)
        points.append((rows * s, secs))
        print(f"| {J} | {rows} | {rows * s} | {peak / 2**20:.1f} | {predicted / 2**20:.1f} | "
              f"{peak / predicted:.2f} | {secs:.3f} | {1e6 * secs / (rows * s):.1f} |")
    # t = a + b x over the points: a / b is the per-pass overhead in row-positions.
    xs = torch.tensor([p[0] for p in points], dtype=torch.float64)
    ts = torch.tensor([p[1] for p in points], dtype=torch.float64)
    A = torch.stack([torch.ones_like(xs), xs], 1)
    a, b = torch.linalg.lstsq(A, ts[:, None]).solution[:, 0].tolist()
    print(f"fit: {a * 1e3:.1f} ms per pass + {b * 1e6:.2f} us per row-position: overhead = "
          f"{a / b:.0f} row-positions; load {os.getloadavg()}")


if __name__ == "__main__":
    main()
