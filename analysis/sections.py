"""Sections: how much each block's attention and MLP outputs change on the induction stripes.

Per block l (< L): mean r_attn / eps and r_mlp / eps on the stripes of repeat vs control
prompts, their scores, and the first blocks whose attention / MLP carry the stripe.
"""

from __future__ import annotations

import polars as pl

from analysis.emergence import (
    DEFAULT_MIN_LAYERS,
    DEFAULT_THRESHOLD,
    SCORE_KEYS,
    STRIPES,
    _check_rule,
    emergence_columns,
)
from analysis.source import SweepData

_K = ", ".join(SCORE_KEYS)


def sections(data: SweepData, threshold: float = DEFAULT_THRESHOLD,
             min_layers: int = DEFAULT_MIN_LAYERS) -> pl.DataFrame:
    """Per (model, dtype, T, lp, eps, l): attention and MLP chi on the stripes (repeat) and
    at the same offsets on control prompts, their ratios (`attn_score`, `mlp_score`), the
    attention share of the stripe change, and per group `first_attn_block` /
    `first_mlp_block`: where the block scores emerge by the rule of `find_emergence`
    (first run of `min_layers` blocks above `threshold`; NULL only when never above).
    Block l's output enters the residual stream at level l + 1."""
    _check_rule(threshold, min_layers)
    sec = "CASE WHEN eps IS NULL THEN {c} ELSE {c} / eps END"
    attn, mlp = sec.format(c="r_attn"), sec.format(c="r_mlp")
    per_block = data.con.sql(f"""SELECT {_K}, l, any_value(n_layers) AS n_layers,
            avg({attn}) FILTER (WHERE prompt_kind = 'repeat') AS attn_stripe,
            avg({attn}) FILTER (WHERE prompt_kind = 'control') AS attn_control,
            avg({mlp}) FILTER (WHERE prompt_kind = 'repeat') AS mlp_stripe,
            avg({mlp}) FILTER (WHERE prompt_kind = 'control') AS mlp_control,
            attn_stripe / NULLIF(attn_control, 0) AS attn_score,
            mlp_stripe / NULLIF(mlp_control, 0) AS mlp_score,
            attn_stripe / NULLIF(attn_stripe + mlp_stripe, 0) AS attn_share,
            l::DOUBLE / any_value(n_layers) AS depth
        FROM responses WHERE {STRIPES} AND r_attn IS NOT NULL GROUP BY {_K}, l""").pl()
    rule = {"threshold": threshold, "min_layers": min_layers}
    a = emergence_columns(per_block, SCORE_KEYS, "attn_score", "a", **rule)
    m = emergence_columns(per_block, SCORE_KEYS, "mlp_score", "m", **rule)
    firsts = a.select(*SCORE_KEYS, pl.col("a_layer").alias("first_attn_block")).join(
        m.select(*SCORE_KEYS, pl.col("m_layer").alias("first_mlp_block")), on=SCORE_KEYS,
        nulls_equal=True)
    return (per_block.join(firsts, on=SCORE_KEYS, how="left", nulls_equal=True)
            .sort([*SCORE_KEYS, "l"], nulls_last=True))
