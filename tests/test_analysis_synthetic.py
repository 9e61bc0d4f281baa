"""Analysis layer on synthetic shards with a known answer: views, read-only SQL, universality,
emergence, sections, report and the benchmark script at a tiny size."""

from __future__ import annotations

import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.api import (
    chi_map,
    emergence,
    from_shards,
    induction_scores,
    sections,
    universality,
)
from analysis.report import build_report
from analysis.synthetic import SyntheticSpec, write_synthetic_sweep
from analysis.views import check_read_only, run_query
from tasks.errors import InvalidInput

SPEC = SyntheticSpec(sweep="syn", models=(("synth-a", 12), ("synth-b", 20)),
                     dtypes=("float32", "bfloat16"), T=8, n_prompts=1, lps=(0, 2), directions=2)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic")
    paths = write_synthetic_sweep(SPEC, d / "shards")
    # An orphan in the same folder (as a crashed writer would leave): must never be read.
    pq.write_table(pq.read_table(paths[0]), d / "shards" / "orphan.parquet")
    return d, paths


@pytest.fixture(scope="module")
def data(sweep_dir):
    _, paths = sweep_dir
    units = pa.table({"unit_key": [p.stem for p in paths], "status": ["done"] * len(paths),
                      "compute_s": [1.5] * len(paths)})
    sweeps = pa.table({"sweep": ["syn"], "spec_hash": ["abc"]})
    return from_shards(paths, units, sweeps, sweep="syn")


@pytest.fixture(scope="module")
def uni(data):
    return universality(data)


def test_responses_reads_exactly_the_listed_shards(data, sweep_dir):
    _, paths = sweep_dir
    listed = sum(pq.read_metadata(p).num_rows for p in paths)
    assert data.sql("SELECT count(*) FROM responses").fetchall()[0][0] == listed
    # chi is r / eps on finite rows and r itself on linear rows.
    lin = data.sql("SELECT r, chi FROM responses WHERE eps IS NULL AND l = 5 LIMIT 1").fetchall()
    assert lin[0][1] == pytest.approx(lin[0][0])
    fin = data.sql("SELECT r, eps, chi FROM responses WHERE eps = 1e-3 AND l = 5 "
                   "AND i = j + 1 LIMIT 1").fetchall()
    assert fin[0][2] == pytest.approx(fin[0][0] / fin[0][1], rel=1e-6)


def test_query_joins_responses_with_units(data):
    t = run_query(data.con, "SELECT u.unit_key, count(*) AS n, any_value(u.compute_s) AS s "
                            "FROM responses r JOIN units u USING (unit_key) "
                            "GROUP BY u.unit_key ORDER BY u.unit_key")
    assert t.num_rows == len(data.shard_paths)
    assert set(t.column("s").to_pylist()) == {1.5}


@pytest.mark.parametrize("sql", [
    "COPY (SELECT 1) TO '/tmp/x.csv'",
    "CREATE TABLE t AS SELECT 1",
    "INSERT INTO units VALUES ('k', 'x', 1.0)",
    "SET enable_external_access = true",
    "ATTACH '/tmp/other.db'",
    "SELECT 1; DROP VIEW responses",
])
def test_query_refuses_writes(data, sql):
    with pytest.raises(InvalidInput, match="read-only"):
        run_query(data.con, sql)


def test_query_cannot_read_other_files(data, sweep_dir):
    d, _ = sweep_dir
    with pytest.raises(InvalidInput, match="Permission"):
        run_query(data.con, f"SELECT count(*) FROM read_parquet('{d}/shards/orphan.parquet')")


def test_bad_sql_gives_duckdb_message(data):
    with pytest.raises(InvalidInput, match="no_such_column"):
        run_query(data.con, "SELECT no_such_column FROM responses")
    with pytest.raises(InvalidInput, match="(?i)syntax|parser"):
        check_read_only("SELEC 1")
    with pytest.raises(InvalidInput, match="SELECT"):
        check_read_only("   ")


def test_describe_and_show_are_allowed(data):
    cols = run_query(data.con, "DESCRIBE responses").column("column_name").to_pylist()
    assert {"chi", "offset_class", "depth", "delta", "r_attn"} <= set(cols)
    assert "units" in run_query(data.con, "SHOW TABLES").column("name").to_pylist()


def test_missing_shard_is_reported(tmp_path):
    with pytest.raises(InvalidInput, match="shard_paths"):
        from_shards([tmp_path / "gone.parquet"])


def _row(uni, **kw):
    import polars as pl
    out = uni.filter(pl.all_horizontal(*(pl.col(k) == v for k, v in kw.items())))
    assert len(out) == 1, kw
    return out.row(0, named=True)


def test_plateau_edges_and_linear_agreement_float32(uni):
    # The synthetic floor term 0.3e-5/eps passes 5% between 3.2e-5 and 1e-4, the nonlinear
    # term -eps passes 5% between 3.2e-2 and 1e-1: the plateau is [1e-4, 10^-1.5].
    for cls in ("diagonal", "near", "induction_T", "background"):
        r = _row(uni, model="synth-a", dtype="float32", prompt_kind="repeat", lp=0, l=9,
                 offset_class=cls)
        assert r["eps_lo"] == pytest.approx(1e-4)
        assert r["eps_hi"] == pytest.approx(10 ** -1.5)
        assert r["decades"] == pytest.approx(2.5)
        assert r["floor_seen"] and r["onset_seen"]
        assert abs(r["linear_rel_err"]) < 5e-3  # the synthetic curve bends by ~1% per point
        assert r["collapse"] == 1.0


def test_precision_floor_differs_by_dtype(uni):
    import polars as pl
    floors = (uni.filter(pl.col("chi_plateau") > 0).group_by("dtype")
              .agg(pl.col("eps_lo").median()).sort("dtype"))
    got = dict(zip(floors["dtype"], floors["eps_lo"], strict=True))
    assert got["float32"] == pytest.approx(1e-4)
    assert got["bfloat16"] == pytest.approx(1e-2)  # the flattest of the two-point runs


def test_no_response_where_causality_forbids(uni):
    # At l = lp only the perturbed position moves: chi 0 off the diagonal, over all eps.
    r = _row(uni, model="synth-b", dtype="float32", prompt_kind="control", lp=2, l=2,
             offset_class="near")
    assert r["chi_plateau"] == 0 and r["chi_linear"] == 0 and r["linear_rel_err"] is None


def test_tolerance_is_validated(data):
    with pytest.raises(InvalidInput, match="tol"):
        universality(data, tol=1.5)


def test_emergence_layer_is_the_placed_one(data):
    import polars as pl
    em = emergence(data).filter(pl.col("eps").is_null())
    for model, n_layers in SPEC.models:
        part = em.filter(pl.col("model") == model)
        assert set(part["emergence_layer"]) == {SPEC.emergence_layer(n_layers)}
        assert part["emergence_depth"][0] == pytest.approx(0.5)
        assert set(part["emergence_status"]) == {"sustained"}
        assert part["peak_score"].max() == pytest.approx(10.0, rel=1e-4)
        # The score jumps from 1 to 10 at the emergence layer: half the rise is there too.
        assert set(part["half_rise_layer"]) == {SPEC.emergence_layer(n_layers)}
    # The early spike (score 3) does not count: it does not stay above the threshold.
    sc = induction_scores(data).filter((pl.col("model") == "synth-b") & pl.col("eps").is_null()
                                       & (pl.col("lp") == 0) & (pl.col("dtype") == "float32"))
    spike = sc.filter(pl.col("l") == SPEC.spike_layer(20))
    assert spike["score"][0] == pytest.approx(3.0, rel=1e-4)
    late = sc.filter(pl.col("l") >= SPEC.emergence_layer(20))
    assert (late["score"] > 2).all()
    # A threshold above every score finds no emergence.
    none = emergence(data, threshold=50.0)
    assert none["emergence_layer"].null_count() == len(none)
    assert set(none["emergence_status"]) == {"none"}


def test_sections_first_blocks(data):
    import polars as pl
    sec = sections(data).filter(pl.col("eps").is_null() & (pl.col("lp") == 0))
    for model, n_layers in SPEC.models:
        part = sec.filter(pl.col("model") == model)
        le = SPEC.emergence_layer(n_layers)
        assert set(part["first_attn_block"]) == {le - 1}
        assert set(part["first_mlp_block"]) == {le - 1 + SPEC.mlp_delay}
        assert part["l"].max() == n_layers - 1  # no block at l = L


def test_chi_map_shows_stripes(data):
    import polars as pl
    le = SPEC.emergence_layer(12)
    rep = chi_map(data, le + 1, model="synth-a", dtype="float32", lp=0)
    ctl = chi_map(data, le + 1, model="synth-a", dtype="float32", lp=0, prompt_kind="control")
    stripe = pl.col("i") - pl.col("j") == SPEC.T
    ratio = rep.filter(stripe)["chi"].mean() / ctl.filter(stripe)["chi"].mean()
    assert ratio == pytest.approx(10.0, rel=1e-4)


def test_report_holds_html_and_every_png(data, tmp_path):
    index = build_report(data, tmp_path / "rep")
    html = index.read_text()
    pngs = re.findall(r'<img src="([^"]+)"', html)
    assert len(pngs) >= 2 * 2 * 2 + 2 + 2  # per (model, dtype): curves + map; per model; 2
    for name in pngs:
        png = tmp_path / "rep" / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "rep" / "report.md").read_text()
    assert all(f"]({name})" in md for name in pngs)
    assert (tmp_path / "rep" / "universality.csv").stat().st_size > 0


def test_report_rejects_bad_layers(data, tmp_path):
    with pytest.raises(InvalidInput, match="layers"):
        build_report(data, tmp_path / "rep", layers=[99])


def test_bench_script_small(tmp_path, capsys):
    from bench.query import main

    assert main(["--rows", "2e5", "--repeat", "1", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| [\d,]+ \| \d+ \| [\d.]+ \| 2 \| [\d.]+ \|", out)
    assert not list(tmp_path.iterdir())  # the data is deleted afterwards
    assert math.isfinite(1.0)
