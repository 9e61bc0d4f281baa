"""analysis.heads on a hand-built sweep with a known answer: one induction head, one
previous-token head, matching attention patterns; plus the heads part of the report."""

from __future__ import annotations

import itertools

import polars as pl
import pyarrow as pa
import pytest

from analysis.heads import head_agreement, heads, report_parts
from analysis.source import from_shards
from db.shards import write_shard
from tasks.layout import HEAD_SHARD_SCHEMA, SHARD_SCHEMA

T, L, H = 4, 2, 2
INDUCTION, PREV = (1, 1), (0, 0)  # (block, head)


def _head_rows():
    rows = []
    for kind, j, lvl, h, delta in itertools.product(("repeat", "control"), (1, 2), range(L),
                                                    range(H), range(T + 1)):
        r, a = 1.0, 0.05
        if (lvl, h) == INDUCTION and kind == "repeat" and delta in (T - 1, T):
            r = 8.0 if delta == T - 1 else 4.0
        if (lvl, h) == INDUCTION and kind == "repeat" and delta == T - 1:
            a = 0.9
        if (lvl, h) == PREV and delta == 1:
            r, a = 5.0, 0.8
        rows.append(dict(sweep="s", unit_key="u1", model="m", dtype="float32", T=T, n_layers=L,
                         prompt_id=0, prompt_kind=kind, lp=0, j=j, eps=None, direction=0, l=lvl,
                         head=h, i=j + delta, r_head=r, attn=a))
    return pa.Table.from_pylist(rows, schema=HEAD_SHARD_SCHEMA)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("ah")
    main = pa.Table.from_pylist([dict(sweep="s", unit_key="u1", model="m", dtype="float32", T=T,
                                      n_layers=L, prompt_id=0, prompt_kind="repeat", lp=0, j=1,
                                      eps=None, direction=0, l=L, i=1, r=1.0, r_attn=None,
                                      r_mlp=None, kl=0.0)], schema=SHARD_SCHEMA)
    info = write_shard(main, out, "s", "u1", heads=_head_rows())
    return from_shards([info.path], sweep="s")


def test_scores_find_the_planted_heads(data):
    s = heads(data)
    assert len(s) == L * H and s["rows"].to_list() == [2 * 2 * (T + 1)] * (L * H)
    ind = s.filter((pl.col("l") == 1) & (pl.col("head") == 1)).row(0, named=True)
    assert ind["score_T-1"] == pytest.approx(8.0) and ind["score_T"] == pytest.approx(4.0)
    assert ind["induction_score"] == pytest.approx(6.0)
    assert ind["attn_induction"] == pytest.approx(0.9)
    prev = s.filter((pl.col("l") == 0) & (pl.col("head") == 0)).row(0, named=True)
    assert prev["prev_score"] == pytest.approx(5.0) and prev["attn_prev"] == pytest.approx(0.8)
    others = s.filter(~((pl.col("l") == 1) & (pl.col("head") == 1)))
    assert others["induction_score"].to_list() == pytest.approx([1.0] * 3)
    assert s["depth"].to_list() == [0.5, 0.5, 1.0, 1.0]


def test_agreement_ranks_and_top_heads(data):
    agree = head_agreement(heads(data), k=1)
    row = agree.row(0, named=True)
    assert row["heads"] == 4 and row["top_overlap"] == 1
    assert row["top_by_response"] == "L1H1" == row["top_by_pattern"]
    # One planted head against three ties on each side: the ranks agree exactly.
    assert row["induction_spearman"] == pytest.approx(1.0)
    assert row["prev_spearman"] == pytest.approx(1.0)


def test_report_parts_write_heatmaps(data, tmp_path):
    scores, agree, figures = report_parts(data, tmp_path, None)
    assert len(scores) == L * H and agree["top_overlap"].to_list() == [L * H]  # k = 5 > 4 heads
    assert len(figures) == 1 and (tmp_path / figures[0][0]).stat().st_size > 5000
