"""Emergence of induction: chi(i, j) maps, the induction score per layer and the emergence layer.

Score at layer l = mean chi on the stripes (i - j in {T-1, T}, j in copy 1) of repeat prompts
over the same on control prompts, per (model, dtype, T, lp, eps or linear).
"""

from __future__ import annotations

import polars as pl

from analysis.source import SweepData
from tasks.errors import InvalidInput

SCORE_KEYS = ["model", "dtype", "T", "lp", "eps"]
_K = ", ".join(SCORE_KEYS)
STRIPES = "offset_class IN ('induction_T-1', 'induction_T')"


def emergence_layer_sql(table: str, score: str, keys: str, threshold: float) -> str:
    """SQL adding `emergence_layer`: the first l whose score and every later score exceed
    the threshold (a missing score counts as below), computed as a suffix minimum."""
    return f"""
    SELECT *, min(CASE WHEN suffix_min > {threshold} THEN l END)
                  OVER (PARTITION BY {keys}) AS emergence_layer
    FROM (SELECT *, min(coalesce({score}, 0)) OVER (PARTITION BY {keys} ORDER BY l DESC
                         ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS suffix_min
          FROM {table})"""


def induction_scores(data: SweepData, threshold: float = 2.0) -> pl.DataFrame:
    """Per (model, dtype, T, lp, eps, l): stripe and control chi, the score, the depth l / L
    and the group's emergence layer (NULL when the score never stays above `threshold`).
    eps NULL marks the linear response."""
    _check_threshold(threshold)
    per_layer = f"""(SELECT {_K}, l, any_value(n_layers) AS n_layers,
            avg(chi) FILTER (WHERE prompt_kind = 'repeat') AS stripe_chi,
            avg(chi) FILTER (WHERE prompt_kind = 'control') AS control_chi,
            stripe_chi / NULLIF(control_chi, 0) AS score
        FROM responses WHERE {STRIPES} GROUP BY {_K}, l)"""
    sql = f"""SELECT {_K}, l, n_layers, l::DOUBLE / n_layers AS depth, stripe_chi,
                     control_chi, score, emergence_layer,
                     emergence_layer::DOUBLE / n_layers AS emergence_depth
              FROM ({emergence_layer_sql(per_layer, 'score', _K, threshold)})"""
    return data.con.sql(sql).pl().sort([*SCORE_KEYS, "l"], nulls_last=True)


def emergence(data: SweepData, threshold: float = 2.0) -> pl.DataFrame:
    """One row per (model, dtype, T, lp, eps): the emergence layer and depth, the number of
    layers and the peak score; eps NULL is the linear response."""
    scores = induction_scores(data, threshold)  # sorted by l: arg_max takes the first peak
    return (
        scores.group_by(SCORE_KEYS)
        .agg(pl.col("n_layers").first(), pl.col("emergence_layer").first(),
             pl.col("emergence_depth").first(), pl.col("score").max().alias("max_score"),
             pl.col("l").get(pl.col("score").fill_null(0).arg_max()).alias("max_score_layer"))
        .sort(SCORE_KEYS, nulls_last=True)
    )


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


def _defaults(data: SweepData, model: str | None, dtype: str | None,
              lp: int | None) -> tuple[str, str, int]:
    rows = data.con.sql("SELECT model, dtype, lp FROM responses GROUP BY ALL ORDER BY ALL "
                        "LIMIT 1").fetchall()
    if not rows:
        raise InvalidInput("sweep", "a sweep with at least one done shard", data.sweep)
    row = rows[0]
    return (model or row[0], dtype or row[1], row[2] if lp is None else lp)


def _check_threshold(threshold: float) -> None:
    if not threshold > 0:
        raise InvalidInput("threshold", "a positive score ratio (default 2)", threshold)
