"""Timing shared by the benchmarks: the best of a few runs of a callable."""

from __future__ import annotations

import time


def best_time(fn, repeat: int, warm_up: bool = True) -> float:
    """Shortest wall time of `repeat` calls of fn, in seconds; warm_up: one untimed call first
    (first-call costs: allocation, a compile, caches)."""
    if warm_up:
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
