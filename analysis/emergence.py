"""Emergence of induction: chi(i, j) maps, the induction score per layer and the emergence layer.

Score at layer l = mean chi on the stripes (i - j in {T-1, T}, j in copy 1) of repeat prompts
over the same on control prompts, per (model, dtype, T, lp, eps or linear). The emergence
rule (`find_emergence`) is the one place that turns a score curve into an emergence layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import polars as pl

from analysis.source import SweepData
from tasks.errors import InvalidInput

SCORE_KEYS = ["model", "dtype", "T", "lp", "eps"]
_K = ", ".join(SCORE_KEYS)
STRIPES = "offset_class IN ('induction_T-1', 'induction_T')"

DEFAULT_THRESHOLD = 2.0
DEFAULT_MIN_LAYERS = 3  # a run this long is sustained: one or two noisy layers are not


@dataclass(frozen=True)
class Emergence:
    """What a score curve says about emergence (layers are residual levels l).

    `layer`: the first layer of the first run of at least `min_layers` consecutive layers
    whose score exceeds the threshold (`status` "sustained"); when the score crosses but never
    for that long, the first crossing (`status` "transient"); None only when it never
    crosses (`status` "none"). `peak_layer` / `peak_score`: the highest score (first one on
    ties). `half_rise_layer`: the first layer at or before the peak where the score has made
    half its rise from 1 (repeat = control) to the peak; None when the peak is not above 1.
    """

    layer: int | None
    status: str
    run_length: int  # layers in the run that starts at `layer` (0 when none)
    peak_layer: int | None
    peak_score: float | None
    half_rise_layer: int | None


def find_emergence(layers: Sequence[int], scores: Sequence[float | None], *,
                   threshold: float = DEFAULT_THRESHOLD,
                   min_layers: int = DEFAULT_MIN_LAYERS) -> Emergence:
    """Apply the emergence rule to one score curve (`layers` ascending; a missing or
    non-finite score counts as below the threshold and is never a peak)."""
    _check_rule(threshold, min_layers)
    vals = [s if s is not None and math.isfinite(s) else None for s in scores]
    runs: list[tuple[int, int]] = []  # (index of first layer, length) of each run above
    start = None
    for k, s in enumerate([*vals, None]):
        above = s is not None and s > threshold
        if above and start is None:
            start = k
        elif not above and start is not None:
            runs.append((start, k - start))
            start = None
    sustained = [r for r in runs if r[1] >= min_layers]
    if sustained:
        (first, length), status = sustained[0], "sustained"
    elif runs:
        (first, length), status = runs[0], "transient"
    else:
        first, length, status = None, 0, "none"
    finite = [(s, k) for k, s in enumerate(vals) if s is not None]
    peak_layer = peak = half = None
    if finite:
        peak, k_peak = max(finite, key=lambda t: (t[0], -t[1]))
        peak_layer = layers[k_peak]
        if peak > 1:
            target = 1 + (peak - 1) / 2
            half = next(layers[k] for k in range(k_peak + 1)
                        if vals[k] is not None and vals[k] >= target)
    return Emergence(layer=None if first is None else layers[first], status=status,
                     run_length=length, peak_layer=peak_layer, peak_score=peak,
                     half_rise_layer=half)


def emergence_columns(frame: pl.DataFrame, keys: Sequence[str], score: str, prefix: str, *,
                      threshold: float, min_layers: int) -> pl.DataFrame:
    """One row per group of `keys` in `frame` (rows per layer `l`): `find_emergence` on the
    column `score`, its fields named `<prefix>_<field>` (`<prefix>_layer`, ...)."""
    rows = []
    for part in frame.sort([*keys, "l"], nulls_last=True).partition_by(keys, maintain_order=True):
        found = find_emergence(part["l"].to_list(), part[score].to_list(),
                               threshold=threshold, min_layers=min_layers)
        rows.append({**{k: part[k][0] for k in keys},
                     **{f"{prefix}_{name}": v for name, v in asdict(found).items()}})
    schema = {**{k: frame.schema[k] for k in keys}, f"{prefix}_layer": pl.Int64,
              f"{prefix}_status": pl.String, f"{prefix}_run_length": pl.Int64,
              f"{prefix}_peak_layer": pl.Int64, f"{prefix}_peak_score": pl.Float64,
              f"{prefix}_half_rise_layer": pl.Int64}
    return pl.DataFrame(rows, schema=schema)


def induction_scores(data: SweepData, threshold: float = DEFAULT_THRESHOLD,
                     min_layers: int = DEFAULT_MIN_LAYERS) -> pl.DataFrame:
    """Per (model, dtype, T, lp, eps, l): stripe and control chi, the score, the depth l / L
    and the group's emergence layer and depth (NULL only when the score never exceeds
    `threshold`; see `find_emergence`). eps NULL marks the linear response."""
    _check_rule(threshold, min_layers)
    per_layer = data.con.sql(f"""SELECT {_K}, l, any_value(n_layers) AS n_layers,
            l::DOUBLE / any_value(n_layers) AS depth,
            avg(chi) FILTER (WHERE prompt_kind = 'repeat') AS stripe_chi,
            avg(chi) FILTER (WHERE prompt_kind = 'control') AS control_chi,
            stripe_chi / NULLIF(control_chi, 0) AS score
        FROM responses WHERE {STRIPES} GROUP BY {_K}, l""").pl()
    em = emergence_columns(per_layer, SCORE_KEYS, "score", "emergence",
                           threshold=threshold, min_layers=min_layers)
    out = per_layer.join(em.select(*SCORE_KEYS, "emergence_layer"), on=SCORE_KEYS,
                         how="left", nulls_equal=True)
    return (out.with_columns(emergence_depth=pl.col("emergence_layer") / pl.col("n_layers"))
            .sort([*SCORE_KEYS, "l"], nulls_last=True))


def emergence(data: SweepData, threshold: float = DEFAULT_THRESHOLD,
              min_layers: int = DEFAULT_MIN_LAYERS) -> pl.DataFrame:
    """One row per (model, dtype, T, lp, eps): `emergence_layer` / `emergence_depth` and
    `emergence_status` (sustained, transient, none), `run_length`, the peak (`peak_layer`,
    `peak_depth`, `peak_score`) and the half-maximum rise (`half_rise_layer`,
    `half_rise_depth`); eps NULL is the linear response. See `find_emergence`."""
    scores = induction_scores(data, threshold, min_layers)
    em = emergence_columns(scores, SCORE_KEYS, "score", "e", threshold=threshold,
                           min_layers=min_layers)
    n = scores.group_by(SCORE_KEYS).agg(pl.col("n_layers").first())
    L = pl.col("n_layers")
    return (em.join(n, on=SCORE_KEYS, nulls_equal=True)
            .select(*SCORE_KEYS, "n_layers",
                    pl.col("e_layer").alias("emergence_layer"),
                    (pl.col("e_layer") / L).alias("emergence_depth"),
                    pl.col("e_status").alias("emergence_status"),
                    pl.col("e_run_length").alias("run_length"),
                    pl.col("e_peak_layer").alias("peak_layer"),
                    (pl.col("e_peak_layer") / L).alias("peak_depth"),
                    pl.col("e_peak_score").alias("peak_score"),
                    pl.col("e_half_rise_layer").alias("half_rise_layer"),
                    (pl.col("e_half_rise_layer") / L).alias("half_rise_depth"))
            .sort(SCORE_KEYS, nulls_last=True))


def chi_map(data: SweepData, layer: int, *, model: str | None = None, dtype: str | None = None,
            lp: int | None = None, prompt_kind: str = "repeat",
            eps: float | None = None) -> pl.DataFrame:
    """Mean chi(i, j) at residual level `layer` over prompts and directions (default: the linear
    response, else eps; model / dtype / lp default to the first in the sweep)."""
    model, dtype, lp = _defaults(data, model, dtype, lp)
    eps_cond = "eps IS NULL" if eps is None else f"eps = {float(eps)!r}"
    where = (f"model = $model AND dtype = $dtype AND lp = $lp AND l = $l "
             f"AND prompt_kind = $kind AND {eps_cond}")
    return data.con.sql(
        f"SELECT i, j, avg(chi) AS chi, count(*) AS n FROM responses WHERE {where} "
        f"GROUP BY i, j ORDER BY j, i",
        params={"model": model, "dtype": dtype, "lp": lp, "l": layer, "kind": prompt_kind},
    ).pl()


def chi_by_offset(data: SweepData, *, eps: float | None = None) -> pl.DataFrame:
    """Mean chi per (model, dtype, T, lp, prompt kind, l, delta = i - j) over prompts,
    directions and perturbed positions j in copy 1 (linear response by default, else eps):
    the induction stripes show as peaks at delta = T - 1 and T however few positions j
    were perturbed."""
    eps_cond = "eps IS NULL" if eps is None else f"eps = {float(eps)!r}"
    return data.con.sql(
        f"""SELECT model, dtype, T, lp, prompt_kind, l, any_value(n_layers) AS n_layers,
                   delta, avg(chi) AS chi, count(*) AS n
            FROM responses WHERE {eps_cond} AND j BETWEEN 1 AND T
            GROUP BY model, dtype, T, lp, prompt_kind, l, delta""").pl().sort(
        ["model", "dtype", "T", "lp", "prompt_kind", "l", "delta"])


def _defaults(data: SweepData, model: str | None, dtype: str | None,
              lp: int | None) -> tuple[str, str, int]:
    rows = data.con.sql("SELECT model, dtype, lp FROM responses GROUP BY ALL ORDER BY ALL "
                        "LIMIT 1").fetchall()
    if not rows:
        raise InvalidInput("sweep", "a sweep with at least one done shard", data.sweep)
    row = rows[0]
    return (model or row[0], dtype or row[1], row[2] if lp is None else lp)


def _check_rule(threshold: float, min_layers: int) -> None:
    if not threshold > 0:
        raise InvalidInput("threshold", "a positive score ratio (default 2)", threshold)
    if not (isinstance(min_layers, int) and min_layers >= 1):
        raise InvalidInput("min_layers", "a whole number of layers >= 1 (default 3)", min_layers)
