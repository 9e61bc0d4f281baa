"""Synthetic sweeps in the real shard layout with a known answer, for tests and the benchmark.

chi has a plateau with a precision floor and a nonlinear edge placed on the eps grid, and
induction stripes that switch on at a chosen layer; DuckDB generates the rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from tasks.errors import InvalidInput
from tasks.layout import SHARD_SCHEMA

# Floor scale per dtype: the floor term 0.3 * floor / eps reaches 5% at 6 * floor.
DTYPE_FLOOR = {"float32": 1e-5, "bfloat16": 1e-3, "float16": 3e-4, "float64": 1e-9}


@dataclass(frozen=True)
class SyntheticSpec:
    """The grid and the answer of a synthetic sweep."""

    sweep: str = "synthetic"
    models: Sequence[tuple[str, int]] = (("synth-a", 12),)  # (model id, n_layers)
    dtypes: Sequence[str] = ("float32",)
    T: int = 8
    n_prompts: int = 2  # per kind (repeat and control)
    lps: Sequence[int] = (0,)
    positions: Sequence[int] | None = None  # default: 1..T
    eps: Sequence[float] = tuple(10 ** (k / 2) for k in range(-12, 1))  # 1e-6 .. 1
    directions: int = 2
    linear: bool = True
    emerge_frac: float = 0.5  # stripes switch on at layer round(frac * L) (the answer)
    spike_frac: float = 0.25  # one early layer where the score is 3 but drops back
    mlp_delay: int = 2  # MLP outputs carry the stripe this many blocks after attention
    stripe_gain: float = 10.0  # induction score above the emergence layer
    noise: float = 0.002  # relative noise per (cell, eps)

    def emergence_layer(self, n_layers: int) -> int:
        return round(self.emerge_frac * n_layers)

    def spike_layer(self, n_layers: int) -> int:
        return round(self.spike_frac * n_layers)


def write_synthetic_sweep(spec: SyntheticSpec, out_dir: str | Path, *, threads: int | None = None
                          ) -> list[Path]:
    """Write one zstd shard per (model, dtype, prompt kind, prompt, lp); return their paths."""
    for d in spec.dtypes:
        if d not in DTYPE_FLOOR:
            raise InvalidInput("dtypes", f"one of {sorted(DTYPE_FLOOR)}", d)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(":memory:")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    positions = list(spec.positions or range(1, spec.T + 1))
    eps_list = [float(e) for e in spec.eps] + ([None] if spec.linear else [])
    paths = []
    for model, n_layers in spec.models:
        for dtype in spec.dtypes:
            for kind in ("repeat", "control"):
                for pid in range(spec.n_prompts):
                    for lp in spec.lps:
                        key = hashlib.sha256(f"{spec.sweep}|{model}|{dtype}|{kind}|{pid}|{lp}"
                                             .encode()).hexdigest()[:24]
                        sql = _unit_sql(spec, model, n_layers, dtype, kind, pid, lp, key,
                                        positions, eps_list)
                        table = con.sql(sql).to_arrow_table().cast(SHARD_SCHEMA)
                        path = out / f"{key}.parquet"
                        pq.write_table(table, path, compression="zstd")
                        paths.append(path)
    return paths


def _unit_sql(spec: SyntheticSpec, model: str, n_layers: int, dtype: str, kind: str, pid: int,
              lp: int, key: str, positions: list[int], eps_list: list[float | None]) -> str:
    T, L = spec.T, n_layers
    le, ls = spec.emergence_layer(L), spec.spike_layer(L)
    bg = 0.05
    # Stripe amplitude on repeat prompts at residual level l: bg * gain above the emergence
    # layer, bg * 3 at the spike layer, else bg (the control prompt always has bg).
    def stripe(level: str) -> str:
        if kind != "repeat":
            return f"{bg}"
        return (f"(CASE WHEN {level} >= {le} THEN {bg * spec.stripe_gain} "
                f"WHEN {level} = {ls} THEN {bg * 3} ELSE {bg} END)")

    is_stripe = "(j BETWEEN 1 AND T AND (i - j = T - 1 OR i - j = T))"
    amp = f"""(CASE WHEN l = lp AND i <> j THEN 0.0
        WHEN i = j THEN 1.0
        WHEN {is_stripe} THEN {stripe('l')}
        WHEN i - j BETWEEN 1 AND 3 THEN 0.3 / (i - j)
        ELSE {bg} END)"""
    # Blocks: attention of block l builds the stripe seen at level l + 1; MLP of block l
    # carries it mlp_delay blocks later.
    amp_attn = f"(CASE WHEN {is_stripe} THEN {stripe('l + 1')} ELSE 0.5 * {amp} END)"
    amp_mlp = (f"(CASE WHEN {is_stripe} THEN 0.1 * {stripe(f'l + 1 - {spec.mlp_delay}')} "
               f"ELSE 0.5 * {amp} END)")
    # Per-cell factor, the same for repeat and control prompts, so scores are exact ratios.
    cell = "(0.8 + 0.4 * (hash(prompt_id, lp, j, direction, l, i) % 100000) / 100000.0)"
    noise = f"({spec.noise} * (2 * (hash(prompt_id, lp, j, direction, l, i, eps) % 100000) / 100000.0 - 1))"
    floor = DTYPE_FLOOR[dtype]
    shape = f"(1 + 0.3 * {floor} / eps - eps * (1 - 0.5 * eps) + {noise})"
    eps_sql = ", ".join("NULL::DOUBLE" if e is None else repr(e) for e in eps_list)
    pos_sql = ", ".join(str(p) for p in positions)
    return f"""
    WITH grid AS (
        SELECT {pid}::INTEGER AS prompt_id, {lp}::SMALLINT AS lp, {T}::INTEGER AS T,
               j::INTEGER AS j, e.eps AS eps, d.range::INTEGER AS direction,
               l.range::SMALLINT AS l, i.range::INTEGER AS i
        FROM unnest([{pos_sql}]) p(j), unnest([{eps_sql}]) e(eps), range({spec.directions}) d,
             range({lp}, {L + 1}) l, range(j, {2 * T + 1}) i
    ), amps AS (
        SELECT *, {amp} * {cell} AS a, {amp_attn} * {cell} AS a_attn, {amp_mlp} * {cell} AS a_mlp,
               CASE WHEN eps IS NULL THEN 1.0 ELSE eps * {shape} END AS s
        FROM grid
    )
    SELECT '{spec.sweep}' AS sweep, '{key}' AS unit_key, '{model}' AS model, '{dtype}' AS dtype,
           T, {L}::SMALLINT AS n_layers, prompt_id, '{kind}' AS prompt_kind, lp, j, eps,
           direction, l, i, (a * s)::FLOAT AS r,
           CASE WHEN l < {L} THEN (a_attn * s)::FLOAT END AS r_attn,
           CASE WHEN l < {L} THEN (a_mlp * s)::FLOAT END AS r_mlp,
           CASE WHEN l = {L} THEN (0.5 * a * a * s * s)::FLOAT END AS kl
    FROM amps ORDER BY j, eps NULLS FIRST, direction, l, i
    """
