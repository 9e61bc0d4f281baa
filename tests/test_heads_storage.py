"""Head responses from spec to SQL: `record: {heads: true}` -> head_responses files -> `heads`.

A linear-only sweep of tiny:llama run in this process (no Ray): exact row sets at the
default offsets, the clean attention column, checksums that cover the second file, gc
keeping it, and the `heads` view.
"""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from analysis.source import load_sweep
from db.shards import head_shard, heads_path, verify_shard
from orchestrator.actor import UnitRunner
from orchestrator.driver import submit
from orchestrator.planner import plan
from orchestrator.spec import spec_from_dict
from tasks.directions import random_directions
from tasks.engine import clean_pass, linear_group
from tasks.heads import attention_patterns
from tasks.models import load_model
from tasks.prompts import make_prompts
from tests.orch_helpers import spec_dict

T = 4  # n = 9; default offsets 0, 1, 2, 3 (near), 3 (T-1), 4 (T)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("heads")
    db_url = f"sqlite:///{out / 'unisweep.db'}"
    spec = spec_from_dict(spec_dict("hs", out, eps=[], layers=[1], positions=[1, 2, 5],
                                    record={"heads": True}, cells_per_unit=4,
                                    prompts={"T": T, "count": 1, "seed": 0}))
    store, the_plan, added = submit(spec, db_url)
    info = store.get_sweep("hs")
    runner = UnitRunner(db_url, info.id, "hs", the_plan.units[0].group, str(out))
    counts = runner.run()
    runner.stop()
    assert counts.get("done") == added == 3
    return store, out, db_url, spec


def test_unit_keys_without_heads_are_unchanged(tmp_path):
    d = spec_dict("k", tmp_path)
    meta = lambda name: __import__("orchestrator.model_meta", fromlist=["x"]).ModelMeta(  # noqa: E731
        name, name, n_layers=4, d_model=16, max_positions=64, identity={"name": name})
    off = plan(spec_from_dict(d), meta_fn=meta).units
    assert all(u.params["record"] == {"layers": None, "positions": None} for u in off)
    on = plan(spec_from_dict({**d, "record": {"heads": True, "head_offsets": [5]}}), meta_fn=meta).units
    assert on[0].params["record"]["heads"] == {"offsets": [0, 1, 2, 3, 4, 5]}
    assert {u.key for u in on}.isdisjoint({u.key for u in off})


def test_head_rows_are_the_default_offsets_with_the_clean_pattern(sweep):
    store, out, _, _ = sweep
    lm = load_model("tiny:llama", dtype="float32")
    L, H, n = lm.n_layers, 4, 2 * T + 1
    prompts = make_prompts(lm.token_space, T=T, count=1, seed=0)
    ids = torch.stack([p.input_ids for p in prompts])
    pattern = attention_patterns(lm, ids)
    clean = clean_pass(lm, ids, [1])
    dirs = random_directions(lm.d_model, 2, seed=0)
    for shard in store.done_shards("hs"):
        info = head_shard(shard.path)
        assert info is not None and verify_shard(shard) is None
        tab = pl.from_arrow(pq.read_table(info.path))
        j = int(tab["j"][0])
        kept = sorted({j + o for o in (0, 1, 2, 3, T - 1, T) if j + o < n})
        # 2 prompts x 2 directions x blocks 1..L-1 x H heads x kept positions, linear only.
        assert len(tab) == 2 * 2 * (L - 1) * H * len(kept) == info.rows
        assert sorted(set(tab["i"])) == kept and set(tab["l"]) == set(range(1, L))
        assert tab["eps"].is_null().all()
        lin = linear_group(lm, clean, 1, j, dirs, heads=True, head_offsets=[0, 1, 2, 3, T - 1, T])
        for row in tab.sample(20, seed=0).iter_rows(named=True):
            g = 0 if row["prompt_kind"] == "repeat" else 1
            lvl, h, i = row["l"], row["head"], row["i"]
            assert row["attn"] == pytest.approx(float(pattern[lvl, g, h, i, j]), rel=1e-6)
            k = lin.head_i.tolist().index(i)
            want = float(lin.r_head[g, row["direction"], lvl - 1, h, k])
            assert row["r_head"] == pytest.approx(want, rel=1e-5)


def test_tampered_head_file_fails_verify_and_gc_keeps_it(sweep):
    store, _, _, _ = sweep
    shard = store.done_shards("hs")[0]
    hp = heads_path(shard.path)
    assert store.orphans("hs") == []  # head_responses files of done units are data
    data = bytearray(hp.read_bytes())
    try:
        data[-40] ^= 0xFF
        hp.write_bytes(bytes(data))
        problems = store.verify("hs").problems
        assert len(problems) == 1 and "head_responses" in problems[0].reason
    finally:
        data[-40] ^= 0xFF
        hp.write_bytes(bytes(data))
    assert store.verify("hs").problems == []


def test_head_file_changed_in_place_with_its_old_mtime_is_caught(sweep, tmp_path, monkeypatch):
    """One bit of a head_responses file's data flipped, size and mtime kept: `verify` hashes
    it and names it; a read with a cold cache refuses the sweep. (A warm read-time cache does
    not hash it again: it keys on sizes and mtimes, the limit shared with shards, README.)"""
    import db.shards as shards_mod

    store, _, db_url, _ = sweep
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(shards_mod, "_VERIFIED", set())
    hp = heads_path(store.done_shards("hs")[0].path)
    st = os.stat(hp)
    data = bytearray(hp.read_bytes())
    try:
        data[len(data) // 3] ^= 0x01  # inside a column chunk, not the footer
        hp.write_bytes(bytes(data))
        os.utime(hp, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (os.stat(hp).st_size, os.stat(hp).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
        problems = store.verify("hs").problems
        assert len(problems) == 1
        assert f"head_responses file {hp.name}: sha256" in problems[0].reason
        with pytest.raises(shards_mod.ShardMismatch, match=f"head_responses file {hp.name}"):
            load_sweep("hs", db=db_url)
    finally:
        data[len(data) // 3] ^= 0x01
        hp.write_bytes(bytes(data))
        os.utime(hp, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.verify("hs").problems == []


def test_heads_view(sweep):
    _, out, db_url, _ = sweep
    data = load_sweep("hs", db=db_url)
    rows = data.sql("""SELECT offset_class, count(*) AS n, min(chi_head) AS lo
                       FROM heads GROUP BY offset_class ORDER BY offset_class""").fetchall()
    classes = {r[0]: r[1] for r in rows}
    assert set(classes) == {"diagonal", "near", "induction_T-1", "induction_T"}
    assert all(r[2] >= 0 for r in rows)
    total = data.sql("SELECT count(*) FROM heads").fetchall()[0][0]
    assert total == sum(head_shard(s).rows for s in data.shard_paths)
    # Per head and block, the heads view joins the responses view on the unit's keys.
    both = data.sql("""SELECT count(*) FROM heads h JOIN responses r USING
                       (unit_key, prompt_id, prompt_kind, direction, j, l, i)
                       WHERE r.eps IS NULL AND h.eps IS NULL""").fetchall()[0][0]
    assert both == total
    assert np.isfinite(data.sql("SELECT sum(attn) FROM heads").fetchall()[0][0])


def test_report_of_a_linear_only_heads_sweep(sweep, tmp_path):
    from analysis.api import build_report, head_agreement, heads

    _, _, db_url, _ = sweep
    data = load_sweep("hs", db=db_url)
    scores = heads(data)
    assert len(scores) == (4 - 1) * 4  # blocks 1..3 x 4 heads (lp = 1)
    agree = head_agreement(scores, data)
    assert agree["heads"].to_list() == [12]
    index = build_report(data, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert index.is_file() and "Which heads carry it?" in md
    assert any(p.name.startswith("heads_") for p in (tmp_path / "report").glob("*.png"))
