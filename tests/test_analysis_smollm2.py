"""Analysis on a small real sweep of SmolLM2-135M (float32): plateau, linear agreement,
induction, emergence, query and report. The model and sweep are computed once per module."""

from __future__ import annotations

import re

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.api import emergence, from_shards, induction_scores, universality
from analysis.report import build_report
from analysis.views import run_query
from tasks.directions import random_directions
from tasks.engine import compute_responses
from tasks.layout import SHARD_SCHEMA
from tasks.prompts import make_prompts

pytestmark = pytest.mark.slow

T = 12
EPS = [10 ** (k / 2) for k in range(-10, 1)]  # 1e-5 .. 1, 2 per decade
LPS = [0, 10, 20]
POSITIONS = [1, 4, 7, 10]


@pytest.fixture(scope="module")
def sweep(smollm2_f32, tmp_path_factory):
    lm = smollm2_f32
    prompts = make_prompts(lm.token_space, T=T, count=1, seed=0, kinds=("repeat", "control"))
    dirs = random_directions(lm.d_model, count=2, seed=0)
    out = tmp_path_factory.mktemp("smollm2")
    paths, keys = [], []
    for lp in LPS:  # one shard per lp, as units of a real sweep would be
        table = compute_responses(lm, prompts, lps=[lp], positions=POSITIONS, eps=EPS,
                                  directions=dirs, linear=True, kl=False)  # KL: not used here
        key = f"smollm2-lp{lp}"
        n = table.num_rows
        consts = {"sweep": "real", "unit_key": key, "model": lm.model_id, "dtype": "float32",
                  "T": T, "n_layers": lm.n_layers}
        cols = {f.name: pa.array([consts[f.name]] * n, f.type)
                for f in SHARD_SCHEMA if f.name in consts}
        cols.update({name: table.column(name) for name in table.column_names})
        shard = pa.table(cols).select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
        path = out / f"{key}.parquet"
        pq.write_table(shard, path, compression="zstd")
        paths.append(path)
        keys.append(key)
    units = pa.table({"unit_key": keys, "status": ["done"] * len(keys), "lp": LPS})
    data = from_shards(paths, units, pa.table({"sweep": ["real"]}), sweep="real")
    return lm, data, out


@pytest.fixture(scope="module")
def uni(sweep):
    return universality(sweep[1])


def test_float32_plateau_spans_two_decades_and_matches_linear(uni):
    strong = uni.filter(pl.col("offset_class").is_in(["diagonal", "near"])
                        & (pl.col("chi_plateau") > 0) & (pl.col("l") > pl.col("lp")))
    assert len(strong) > 100
    # Measured: 1.5 decades only at lp = 0 in the last two layers, where the response turns
    # nonlinear from eps = 3e-3 on; everywhere else 2.5 to 5 decades.
    wide = strong.filter(pl.col("decades") >= 2.0)
    assert len(wide) >= 0.9 * len(strong), strong.sort("decades").head(10)
    assert strong["decades"].median() >= 3.0
    worst = strong["linear_rel_err"].abs().max()
    assert worst < 0.01, strong.sort(pl.col("linear_rel_err").abs(), descending=True).head(5)
    # Every class, weak background responses included (measured: all 606 within 0.9%).
    some = uni.filter(pl.col("chi_plateau") > 0)
    assert (some["linear_rel_err"].abs() < 0.01).mean() >= 0.95


def test_induction_score_rises_in_later_layers(sweep):
    lm, data, _ = sweep
    sc = induction_scores(data).filter(pl.col("eps").is_null())
    late = sc.filter(pl.col("depth") >= 0.7)
    # Repeat prompts carry more of the perturbation to the stripes than control prompts, for
    # every perturbed layer, once the layers are deep enough.
    assert (late["score"] > 1.0).all(), late
    assert late["score"].mean() > 1.5, late


def test_emergence_layer_is_found_inside_the_model(sweep):
    lm, data, _ = sweep
    em = emergence(data).filter(pl.col("eps").is_null())
    found = em.filter(pl.col("emergence_layer").is_not_null())
    assert len(found) >= 1, em
    assert (found["emergence_layer"] > found["lp"]).all()
    assert (found["emergence_layer"] <= lm.n_layers).all()
    assert found["emergence_depth"].is_between(0, 1).all()


def test_query_joins_responses_with_units(sweep):
    _, data, _ = sweep
    t = run_query(data.con, "SELECT u.lp, count(*) AS n FROM responses r "
                            "JOIN units u USING (unit_key) GROUP BY u.lp ORDER BY u.lp")
    assert t.column("lp").to_pylist() == LPS
    assert min(t.column("n").to_pylist()) > 0


def test_report_holds_html_and_every_png(sweep, tmp_path):
    _, data, _ = sweep
    index = build_report(data, tmp_path / "rep")
    names = re.findall(r'<img src="([^"]+)"', index.read_text())
    assert len(names) >= 5
    for name in names:
        assert (tmp_path / "rep" / name).read_bytes()[:4] == b"\x89PNG"
