"""Benchmark: the universality aggregate over a synthetic sweep in the real shard layout.

Writes N rows (default 100M) of SHARD_SCHEMA shards under a temporary folder, times
`universality()` on 2 DuckDB threads, prints a Markdown table row, deletes the data.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402

from analysis.source import from_shards  # noqa: E402
from analysis.synthetic import SyntheticSpec, write_synthetic_sweep  # noqa: E402
from analysis.universality import universality  # noqa: E402

# A SmolLM2-sized grid: 30 blocks, T = 16, j = 1..16, eps 1e-6..1 at 2 per decade plus the
# linear response, 4 directions, lp in {0, 10, 20}: about 2.77M rows per prompt pair.
L, T, LPS, DIRS = 30, 16, (0, 10, 20), 4
EPS = tuple(10 ** (k / 2) for k in range(-12, 1))


def rows_per_pair(n_positions: int = T) -> int:
    pairs = sum(2 * T + 1 - j for j in range(1, n_positions + 1))
    return 2 * sum(pairs * (L + 1 - lp) * (len(EPS) + 1) * DIRS for lp in LPS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=float, default=100e6, help="target row count (default 1e8)")
    ap.add_argument("--threads", type=int, default=2, help="DuckDB threads (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs (default 3)")
    ap.add_argument("--dir", default=None, help="parent folder for the data (default: /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the data afterwards")
    ap.add_argument("--reuse", default=None, help="time the shards in this folder (kept by "
                    "--keep) instead of writing new ones")
    ap.add_argument("--check", action="store_true", help="also time the sha256 check on read "
                    "(db.shards.check_shards), cold and cached, interleaved with universality()")
    args = ap.parse_args(argv)

    n_prompts = max(1, round(args.rows / rows_per_pair()))
    # Below one prompt pair (tests), perturb fewer positions instead.
    n_pos = T if args.rows >= rows_per_pair() else max(
        1, next(k for k in range(T, 0, -1) if rows_per_pair(k) <= args.rows or k == 1))
    spec = SyntheticSpec(sweep="bench", models=(("synth-30", L),), T=T, n_prompts=n_prompts,
                         lps=LPS, eps=EPS, directions=DIRS, positions=tuple(range(1, n_pos + 1)))
    tmp = Path(args.reuse) if args.reuse else Path(tempfile.mkdtemp(prefix="unisweep-bench-",
                                                                      dir=args.dir))
    try:
        t0 = time.perf_counter()
        if args.reuse:
            paths = sorted(tmp.glob("*.parquet"))
        else:
            paths = write_synthetic_sweep(spec, tmp, threads=os.cpu_count())
        write_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in paths)
        data = from_shards(paths, threads=args.threads)
        rows = data.sql("SELECT count(*) FROM responses").fetchall()[0][0]
        print(f"wrote {rows:,} rows in {len(paths)} shards, {size / 2**30:.2f} GiB, "
              f"{write_s:.0f} s", flush=True)
        runs = []  # (wall s, CPU s of all DuckDB threads, load average before)
        for _ in range(args.repeat):
            load = os.getloadavg()[0]
            t0, c0 = time.perf_counter(), time.process_time()
            out = universality(data)
            runs.append((time.perf_counter() - t0, time.process_time() - c0, load))
        best = min(runs)
        print(f"{len(out)} groups; runs (wall s, cpu s, load): "
              + ", ".join(f"({w:.2f}, {c:.2f}, {ld:.1f})" for w, c, ld in runs))
        print("| rows | shards | GiB | DuckDB threads | universality wall (s), best | "
              "CPU (s) of that run | load average before |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {rows:,} | {len(paths)} | {size / 2**30:.2f} | {args.threads} | "
              f"{best[0]:.2f} | {best[1]:.2f} | {best[2]:.1f} |")
        if args.check:
            _time_shard_check(paths, data, args.repeat)
    finally:
        if not (args.keep or args.reuse):
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _time_shard_check(paths: list[Path], data, repeat: int) -> None:
    """What `query`/`report` pay before reading: sha256 of every shard (cold), or one stat
    and a cache lookup per shard (cached by path, size, mtime)."""
    import db.shards as shards

    infos = [shards.ShardInfo(str(p), pq.ParquetFile(p).metadata.num_rows, p.stat().st_size,
                              shards.sha256_file(p)) for p in paths]
    cache_dir = Path(tempfile.mkdtemp(prefix="unisweep-bench-cache-"))
    os.environ["XDG_CACHE_HOME"] = str(cache_dir)
    runs = []  # (cold s, cached s, universality s, load)
    try:
        for _ in range(repeat):
            load = os.getloadavg()[0]
            shutil.rmtree(cache_dir / "unisweep", ignore_errors=True)
            shards._VERIFIED.clear()
            t0 = time.perf_counter()
            shards.check_shards(infos)
            cold = time.perf_counter() - t0
            shards._VERIFIED.clear()  # a new process: only the cache file remains
            t0 = time.perf_counter()
            shards.check_shards(infos)
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            universality(data)
            runs.append((cold, warm, time.perf_counter() - t0, load))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    print("| shards | sha256 check, cold (s) | check, cached (s) | universality (s) | "
          "cold / universality | load average before |")
    print("|---|---|---|---|---|---|")
    for cold, warm, uni, load in runs:
        print(f"| {len(paths)} | {cold:.2f} | {warm:.4f} | {uni:.2f} | {cold / uni:.2f} | {load:.1f} |")


if __name__ == "__main__":
    raise SystemExit(main())
