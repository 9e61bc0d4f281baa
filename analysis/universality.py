"""Universality: the plateau of chi over eps per (model, dtype, T, prompt kind, lp, l, offset class).

Plateau value, its eps range and edges, agreement with the exact linear response and a
collapse score; all in DuckDB SQL over the `responses` view.
"""

from __future__ import annotations

import polars as pl

from analysis.source import SweepData
from analysis.views import OFFSET_CLASS_SQL
from tasks.errors import InvalidInput

GROUP = ["model", "dtype", "T", "prompt_kind", "lp", "l", "offset_class"]
_G = ", ".join(GROUP)


def chi_curves(data: SweepData) -> pl.DataFrame:
    """Mean chi per group and eps (eps NULL: the linear response), with the row count."""
    _build_map(data)
    try:
        return data.con.sql(_PER_EPS_SQL).pl().sort([*GROUP, "eps"], nulls_last=True)
    finally:
        data.con.execute("DROP TABLE IF EXISTS _u_map")


# The only full pass over the rows: the chi(i, j) map per (model, dtype, T, kind, lp, l, eps),
# summed over prompts and directions.  Grouping by (j, i) rather than by offset class is
# cheaper (no per-row CASE) and keeps what the collapse score needs; eps is a key, so the
# division r / eps happens once per group, not once per row.
_MAP_SQL = """CREATE OR REPLACE TEMP TABLE _u_map AS
    SELECT *, r_sum / coalesce(eps, 1.0) AS chi_sum FROM (
        SELECT model, dtype, T, prompt_kind, lp, l, n_layers, j, i, eps,
               sum(r::DOUBLE) AS r_sum, count(*) AS n
        FROM responses GROUP BY ALL)"""

_PER_EPS_SQL = f"""SELECT {_G}, any_value(n_layers) AS n_layers, eps,
           sum(chi_sum) / sum(n) AS chi, sum(n) AS n_rows
    FROM (SELECT *, {OFFSET_CLASS_SQL} AS offset_class FROM _u_map)
    GROUP BY {_G}, eps"""


def _build_map(data: SweepData) -> None:
    data.con.execute(_MAP_SQL)


def universality(data: SweepData, tol: float = 0.05, *, collapse: bool = True) -> pl.DataFrame:
    """One row per group: the universal regime of chi.

    The plateau is the longest run of consecutive swept eps (ties: the flattest) where the
    mean chi stays within `tol` of the run's median (`chi_plateau_median`). The plateau value
    `chi_plateau` is the median of its flattest 3 consecutive eps (its edges are, by
    construction, its least flat points), or the run's median below 3 points.
    `eps_lo` is its lower edge (precision floor), `eps_hi` its upper edge (nonlinear onset);
    `floor_seen` / `onset_seen` say whether the sweep reached past that edge. `linear_rel_err`
    is (chi_plateau - chi_linear) / chi_linear. `collapse` is the share of the points (i, j)
    of the group's chi map (mean over prompts and directions, nonzero) whose chi stays within
    `tol` of its own mid-range across the whole plateau: 1.0 means the maps at every
    plateau eps collapse onto one.
    """
    if not (0 < tol < 1):
        raise InvalidInput("tol", "a relative tolerance in (0, 1)", tol)
    con = data.con
    _build_map(data)
    con.execute(f"CREATE OR REPLACE TEMP TABLE _u_eps AS {_PER_EPS_SQL}")
    sql = f"""
    WITH groups AS (
        SELECT {_G}, any_value(n_layers) AS n_layers, row_number() OVER () AS gid,
               count(eps) AS n_eps, min(eps) AS eps_min, max(eps) AS eps_max,
               max(CASE WHEN eps IS NULL THEN chi END) AS chi_linear
        FROM _u_eps GROUP BY {_G}
    ), fin0 AS (
        SELECT g.gid, e.eps, e.chi, row_number() OVER (PARTITION BY g.gid ORDER BY e.eps) AS k
        FROM _u_eps e JOIN groups g USING ({_G}) WHERE e.eps IS NOT NULL
    ), fin AS (
        -- Each point with the spread and median of the 3-point run starting at it.
        SELECT *, (max(chi) OVER w3 - min(chi) OVER w3) / NULLIF(abs(median(chi) OVER w3), 0)
                      AS spread3,
               median(chi) OVER w3 AS med3, count(chi) OVER w3 AS n3
        FROM fin0
        WINDOW w3 AS (PARTITION BY gid ORDER BY k ROWS BETWEEN CURRENT ROW AND 2 FOLLOWING)
    ), windows AS (
        SELECT a.gid, a.k AS k0, b.k AS k1 FROM fin a JOIN fin b ON a.gid = b.gid AND b.k >= a.k
    ), pts AS (
        SELECT w.gid, w.k0, w.k1, f.chi FROM windows w
        JOIN fin f ON f.gid = w.gid AND f.k BETWEEN w.k0 AND w.k1
    ), med AS (
        SELECT gid, k0, k1, median(chi) AS med FROM pts GROUP BY gid, k0, k1
    ), ok AS (
        SELECT m.gid, m.k0, m.k1, m.med, max(abs(p.chi - m.med)) AS spread
        FROM med m JOIN pts p USING (gid, k0, k1)
        GROUP BY m.gid, m.k0, m.k1, m.med
        HAVING max(abs(p.chi - m.med)) <= {tol} * abs(m.med)
    ), best AS (
        -- Longest run first; among equally long runs the flattest, then the lowest.
        SELECT * FROM ok
        QUALIFY row_number() OVER (PARTITION BY gid
                                   ORDER BY k1 - k0 DESC, spread / NULLIF(abs(med), 0), k0) = 1
    ), core AS (
        -- The plateau value: the median of the flattest 3 consecutive eps inside the
        -- plateau (its edges are by construction its least flat points); the plateau's
        -- median when it has fewer than 3 points.
        SELECT b.gid, coalesce(c.med3, b.med) AS chi_core FROM best b
        LEFT JOIN (SELECT f.gid, f.med3 FROM fin f JOIN best b2 ON f.gid = b2.gid
                   AND f.k BETWEEN b2.k0 AND b2.k1 - 2 AND f.n3 = 3
                   QUALIFY row_number() OVER (PARTITION BY f.gid
                                              ORDER BY f.spread3 NULLS LAST, f.k) = 1) c
        USING (gid)
    )
    SELECT g.gid, {', '.join('g.' + c for c in GROUP)}, g.n_layers,
           c.chi_core AS chi_plateau, b.med AS chi_plateau_median,
           lo.eps AS eps_lo, hi.eps AS eps_hi,
           log10(hi.eps / lo.eps) AS decades, b.k1 - b.k0 + 1 AS n_plateau,
           g.n_eps, lo.eps > g.eps_min AS floor_seen, hi.eps < g.eps_max AS onset_seen,
           g.chi_linear,
           (c.chi_core - g.chi_linear) / NULLIF(g.chi_linear, 0) AS linear_rel_err
    FROM groups g
    LEFT JOIN best b USING (gid)
    LEFT JOIN core c USING (gid)
    LEFT JOIN fin lo ON lo.gid = b.gid AND lo.k = b.k0
    LEFT JOIN fin hi ON hi.gid = b.gid AND hi.k = b.k1
    """
    con.execute(f"CREATE OR REPLACE TEMP TABLE _u_plateau AS {sql}")
    if collapse:
        # Each point (i, j) of the group's chi map, restricted to the group's plateau: it
        # collapses when max and min over eps are within tol of their mid-range.
        con.execute(f"""CREATE OR REPLACE TEMP TABLE _u_collapse AS
        SELECT gid, avg(CASE WHEN hi - lo <= {tol} * (hi + lo) THEN 1.0 ELSE 0.0 END)
                    FILTER (WHERE hi > 0) AS collapse
        FROM (
            SELECT p.gid, max(m.chi_sum / m.n) AS hi, min(m.chi_sum / m.n) AS lo
            FROM (SELECT *, {OFFSET_CLASS_SQL} AS offset_class FROM _u_map) m
            JOIN _u_plateau p USING ({_G})
            WHERE m.eps BETWEEN p.eps_lo AND p.eps_hi
            GROUP BY p.gid, m.j, m.i
        ) GROUP BY gid""")
        out = con.sql("""SELECT p.*, c.collapse FROM _u_plateau p
                         LEFT JOIN _u_collapse c USING (gid)""").pl()
    else:
        out = con.sql("SELECT * FROM _u_plateau").pl()
    for t in ("_u_map", "_u_eps", "_u_plateau", "_u_collapse"):
        con.execute(f"DROP TABLE IF EXISTS {t}")
    return out.drop("gid").sort(GROUP)
