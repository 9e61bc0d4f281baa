"""Heads: which attention heads carry the induction stripes, by response and by attention pattern.

Per (model, dtype, T, lp, eps, l, head), from the `heads` view: the response-based scores
(a head's chi on the stripes of repeat prompts over the same offsets of control prompts,
at T-1 and T; previous-token: its chi at i - j = 1 over its chi on the diagonal) and the
classic pattern scores of the same prompts' clean attention (induction: mean weight from i
to i - T + 1; previous token: to i - 1); their agreement, heatmaps and the report section.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from analysis.emergence import SCORE_KEYS, emergence
from analysis.source import SweepData
from tasks.errors import InvalidInput

HEAD_KEYS = [*SCORE_KEYS, "l", "head"]
_K = ", ".join(SCORE_KEYS)


def _stripe(kind: str, offset: str) -> str:
    return f"prompt_kind = '{kind}' AND offset_class = '{offset}'"


def heads(data: SweepData) -> pl.DataFrame:
    """One row per (model, dtype, T, lp, eps, l, head); eps NULL is the linear response.

    Response-based: `score_T-1`, `score_T` (stripe chi on repeat / control prompts at that
    offset), `induction_score` (both stripes together, like the block-level score),
    `prev_score` (chi at i - j = 1 over chi at i = j, all prompts). Pattern-based, from the
    clean attention of the repeat prompts: `attn_induction` (mean weight at i - j = T-1,
    the classic induction detector), `attn_prev` (at i - j = 1), `attn_duplicate` (at T:
    the earlier occurrence of the same token). `depth` is (l + 1) / L: where the head's
    output enters the stream.
    """
    chi = {}
    for kind in ("repeat", "control"):
        for off, name in (("induction_T-1", "T1"), ("induction_T", "T")):
            chi[f"{name}_{kind}"] = f"avg(chi_head) FILTER (WHERE {_stripe(kind, off)})"
        chi[f"stripes_{kind}"] = (f"avg(chi_head) FILTER (WHERE prompt_kind = '{kind}' AND "
                                  "offset_class IN ('induction_T-1', 'induction_T'))")
    sql = f"""SELECT {_K}, l, head, any_value(n_layers) AS n_layers,
            (l + 1)::DOUBLE / any_value(n_layers) AS depth,
            {chi['stripes_repeat']} / NULLIF({chi['stripes_control']}, 0) AS induction_score,
            {chi['T1_repeat']} / NULLIF({chi['T1_control']}, 0) AS "score_T-1",
            {chi['T_repeat']} / NULLIF({chi['T_control']}, 0) AS score_T,
            avg(chi_head) FILTER (WHERE delta = 1)
                / NULLIF(avg(chi_head) FILTER (WHERE delta = 0), 0) AS prev_score,
            {chi['stripes_repeat']} AS stripe_chi, {chi['stripes_control']} AS control_chi,
            avg(attn) FILTER (WHERE {_stripe('repeat', 'induction_T-1')}) AS attn_induction,
            avg(attn) FILTER (WHERE prompt_kind = 'repeat' AND delta = 1) AS attn_prev,
            avg(attn) FILTER (WHERE {_stripe('repeat', 'induction_T')}) AS attn_duplicate,
            count(*) AS rows
        FROM heads GROUP BY {_K}, l, head"""
    return data.con.sql(sql).pl().sort(HEAD_KEYS, nulls_last=True)


def _top(df: pl.DataFrame, col: str, k: int) -> list[str]:
    top = df.drop_nulls(col).sort(col, descending=True).head(k)
    return [f"L{r['l']}H{r['head']}" for r in top.iter_rows(named=True)]


def head_agreement(scores: pl.DataFrame, data: SweepData | None = None, k: int = 5,
                   threshold: float = 2.0, min_layers: int | None = None) -> pl.DataFrame:
    """Per (model, dtype, T, lp, eps): Spearman rank correlation over all heads of the
    response-based and pattern-based induction scores (and previous-token scores), the top
    `k` heads by each (as "L<l>H<h>") and how many they share. With `data`, also the
    block-level emergence layer of the same group and the median layer of the top heads."""
    if k < 1:
        raise InvalidInput("k", "a number of top heads >= 1", k)
    rows = []
    for key, g in scores.partition_by(SCORE_KEYS, as_dict=True, maintain_order=True).items():
        top_r, top_a = _top(g, "induction_score", k), _top(g, "attn_induction", k)
        top_layers = sorted(int(t[1:t.index("H")]) for t in top_r)
        both = g.drop_nulls(["induction_score", "attn_induction"])
        prev = g.drop_nulls(["prev_score", "attn_prev"])
        rows.append(dict(
            zip(SCORE_KEYS, key, strict=True), heads=len(g),
            induction_spearman=both.select(pl.corr("induction_score", "attn_induction",
                                                   method="spearman")).item() if len(both) > 2 else None,
            prev_spearman=prev.select(pl.corr("prev_score", "attn_prev",
                                              method="spearman")).item() if len(prev) > 2 else None,
            top_by_response=", ".join(top_r), top_by_pattern=", ".join(top_a),
            top_overlap=len(set(top_r) & set(top_a)),
            top_response_median_layer=top_layers[len(top_layers) // 2] if top_layers else None,
        ))
    out = pl.DataFrame(rows, schema_overrides={"eps": pl.Float64})
    if data is not None and len(out):
        rule = {} if min_layers is None else {"min_layers": min_layers}
        em = emergence(data, threshold, **rule).select(*SCORE_KEYS, "emergence_layer")
        out = out.join(em, on=SCORE_KEYS, how="left", nulls_equal=True)
    return out


def plot_head_heatmaps(scores: pl.DataFrame, path: str | Path, title: str) -> Path:
    """Layers x heads heatmaps of one group: response-based induction and previous-token
    scores (log colour) beside the attention-pattern ones (linear, 0..max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    L = int(scores["n_layers"][0])
    H = int(scores["head"].max()) + 1
    panels = [("induction_score", "response: induction score\n(stripe chi repeat / control)", True),
              ("attn_induction", "pattern: attention i -> i-T+1\n(classic induction)", False),
              ("prev_score", "response: previous-token score\n(chi at i-j=1 / chi at i=j)", True),
              ("attn_prev", "pattern: attention i -> i-1\n(classic previous token)", False)]
    fig, axes = plt.subplots(1, 4, figsize=(4 + 1.1 * 4 * max(H, 4) / 2.5, 0.25 * L + 2.5))
    for ax, (col, label, log) in zip(axes, panels, strict=True):
        grid = np.full((L, H), np.nan)
        for r in scores.drop_nulls(col).iter_rows(named=True):
            grid[r["l"], r["head"]] = r[col]
        finite = grid[np.isfinite(grid) & (grid > 0)]
        norm = (LogNorm(vmin=max(finite.min(), 1e-3), vmax=finite.max())
                if log and finite.size else None)
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", norm=norm,
                       interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("head")
        ax.set_xticks(range(H))
        fig.colorbar(im, ax=ax, fraction=0.08)
    axes[0].set_ylabel("block l")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def has_heads(data: SweepData) -> bool:
    return bool(data.sql("SELECT count(*) FROM heads").fetchall()[0][0])


def report_parts(data: SweepData, out: Path, eps: float | None, threshold: float = 2.0,
                 min_layers: int | None = None):
    """What the report shows on heads, or None when no unit recorded them:
    (scores at `eps` (None: linear response), their agreement, [(figure file, caption)])."""
    if not has_heads(data):
        return None
    scores = heads(data)
    scores = scores.filter(pl.col("eps").is_null() if eps is None else pl.col("eps") == eps)
    agree = head_agreement(scores, data, threshold=threshold, min_layers=min_layers)
    figures = []
    for (model, dtype, lp), g in sorted(scores.partition_by(["model", "dtype", "lp"],
                                                            as_dict=True).items()):
        name = "heads_" + "_".join(str(p) for p in (model, dtype, lp)).replace("/", "-") + ".png"
        plot_head_heatmaps(g, out / name, f"{model} {dtype}, lp = {lp}: heads")
        figures.append((name, f"Per head of {model} {dtype} (lp = {lp}): induction and "
                              "previous-token scores from the response (log colour) beside "
                              "the classic attention-pattern scores of the same prompts."))
    return scores, agree, figures
