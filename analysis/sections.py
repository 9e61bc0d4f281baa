"""Sections: how much each block's attention and MLP outputs change on the induction stripes.

Per block l (< L): mean r_attn / eps and r_mlp / eps on the stripes of repeat vs control
prompts, their scores, and the first blocks whose attention / MLP carry the stripe.
"""

from __future__ import annotations

import polars as pl

from analysis.emergence import SCORE_KEYS, STRIPES, _check_threshold, emergence_layer_sql
from analysis.source import SweepData

_K = ", ".join(SCORE_KEYS)


def sections(data: SweepData, threshold: float = 2.0) -> pl.DataFrame:
    """Per (model, dtype, T, lp, eps, l): attention and MLP chi on the stripes (repeat) and
    at the same offsets on control prompts, their ratios (`attn_score`, `mlp_score`), the
    attention share of the stripe change, and per group `first_attn_block` /
    `first_mlp_block`: the first block whose score exceeds `threshold` and stays above it.
    Block l's output enters the residual stream at level l + 1."""
    _check_threshold(threshold)
    sec = "CASE WHEN eps IS NULL THEN {c} ELSE {c} / eps END"
    attn, mlp = sec.format(c="r_attn"), sec.format(c="r_mlp")
    per_block = f"""(SELECT {_K}, l, any_value(n_layers) AS n_layers,
            avg({attn}) FILTER (WHERE prompt_kind = 'repeat') AS attn_stripe,
            avg({attn}) FILTER (WHERE prompt_kind = 'control') AS attn_control,
            avg({mlp}) FILTER (WHERE prompt_kind = 'repeat') AS mlp_stripe,
            avg({mlp}) FILTER (WHERE prompt_kind = 'control') AS mlp_control,
            attn_stripe / NULLIF(attn_control, 0) AS attn_score,
            mlp_stripe / NULLIF(mlp_control, 0) AS mlp_score,
            attn_stripe / NULLIF(attn_stripe + mlp_stripe, 0) AS attn_share
        FROM responses WHERE {STRIPES} AND r_attn IS NOT NULL GROUP BY {_K}, l)"""
    a = emergence_layer_sql(per_block, "attn_score", _K, threshold)
    a = f"(SELECT * EXCLUDE (suffix_min) RENAME (emergence_layer AS first_attn_block) FROM ({a}))"
    m = emergence_layer_sql(a, "mlp_score", _K, threshold)
    sql = f"""SELECT * EXCLUDE (suffix_min) RENAME (emergence_layer AS first_mlp_block),
                     l::DOUBLE / n_layers AS depth FROM ({m})"""
    return data.con.sql(sql).pl().sort([*SCORE_KEYS, "l"], nulls_last=True)
