"""Time and accuracy of the KL of a logit change: the formula before this change, the eager
centred formula, the fused (compiled) kernel as used (vocabulary static) and as it was (every
size dynamic); with and without flushing denormals.

Shapes of one SmolLM2 pass (vocab 49152, 33 positions, 8 cell rows), float32; ratios in one
process, load average printed beside them.

    python bench/kl.py [--rows 8] [--positions 33] [--repeat 5] [--no-fused]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import best_time  # noqa: E402
from tasks import kl as klmod
from tasks.kl import kl_accuracy_errors, kl_from_logit_change


def kl_before(p: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """The engine's KL before the centred formula (kept here only to time it): a shift pass,
    then the non-negative terms, ~14 vocabulary-wide elementwise passes."""
    big = dz.abs().amax(-1) >= 1.0
    shift = torch.log1p((p * torch.expm1(dz.clamp(max=1.0))).sum(-1, keepdim=True))
    d = dz - shift
    dc = d.clamp(max=30.0)
    kl = (p * (torch.exp(dc) * dc - torch.expm1(dc))).sum(-1)
    if bool(big.any()):
        logp = torch.log(p)
        rows_dz = dz[big]
        d_big = rows_dz - torch.logsumexp(logp.expand_as(dz)[big] + rows_dz, dim=-1, keepdim=True)
        q = torch.exp(logp.expand_as(dz)[big] + d_big)
        kl[big] = (torch.where(q > 0, q * d_big, torch.zeros_like(q)) - q
                   + p.expand_as(dz)[big]).sum(-1)
    return kl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--positions", type=int, default=33)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-fused", action="store_true")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(args.positions, args.vocab, generator=gen) * 3, -1)
    dz = torch.randn(args.rows, args.positions, args.vocab, generator=gen) * 1e-3
    print(f"torch threads {torch.get_num_threads()}; float32 [{args.rows}, {args.positions}, "
          f"{args.vocab}]; load before {os.getloadavg()}")
    methods = {"before": lambda: kl_before(p, dz), "centred eager": lambda: kl_from_logit_change(p, dz)}
    kernels: dict = {}  # method name -> the fused kernel it sets
    if not args.no_fused:
        t0 = time.perf_counter()
        on = klmod.use_fused_kl(True, dtypes=(torch.float32,))
        print(f"fused KL gate: {'passed' if on else 'failed'} in {time.perf_counter() - t0:.0f} s "
              "(compile + accuracy check)")
        if on:
            # The kernel as used (vocabulary static, rows dynamic), and the one it replaced
            # (every size dynamic: inductor then leaves the vocabulary loop unvectorised).
            kernels["fused (compiled)"] = klmod._fused
            kernels["fused, every size dynamic (the kernel before)"] = torch.compile(
                klmod._kl_small_fusable, dynamic=True)
            for name in kernels:
                methods[name] = lambda: kl_from_logit_change(p, dz)
            klmod._fused = None
    print("| method | flush denormals | ms per call | vs before | max rel err eps 1e-5..1 |")
    print("|---|---|---|---|---|")
    results = {}
    for _round in range(3):  # interleaved: every method and setting once per round
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            for name, fn in methods.items():
                klmod._fused = kernels.get(name)
                t = best_time(fn, args.repeat)
                klmod._fused = None
                results[(name, flush)] = min(t, results.get((name, flush), float("inf")))
    torch.set_flush_denormal(False)
    for (name, flush), t in results.items():
        if name in kernels:
            klmod._fused = kernels[name]
            err = max(kl_accuracy_errors(kl_from_logit_change, torch.float32).values())
            klmod._fused = None
        elif name == "before":
            err = max(kl_accuracy_errors(kl_before, torch.float32).values())
        else:
            err = max(kl_accuracy_errors(kl_from_logit_change, torch.float32).values())
        ratio = results[("before", flush)] / t
        print(f"| {name} | {flush} | {1e3 * t:.0f} | {ratio:.2f}x | {err:.1e} |")
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
