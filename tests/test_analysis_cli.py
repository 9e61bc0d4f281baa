"""`unisweep query` and `unisweep report` end to end: synthetic shards written and marked done
through the real Store (SQLite and PostgreSQL), an orphan beside them, the CLI on top."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import db.shards as shards_mod
import db.store as store_mod
import tests.fixtures_db as fixtures_db
from analysis.synthetic import SyntheticSpec, write_synthetic_sweep
from tests.orch_helpers import run_main

SPEC = SyntheticSpec(sweep="syn", models=(("synth-a", 8),), T=6, n_prompts=2, lps=(0,),
                     eps=(1e-4, 1e-3, 1e-2, 1e-1), directions=1)


def _keyed(path, key: str) -> pa.Table:
    """The shard as a worker writes it: its unit_key column holds the unit's key."""
    table = pq.read_table(path)
    col = table.schema.get_field_index("unit_key")
    return table.set_column(col, "unit_key", pa.array([key] * table.num_rows, pa.string()))


@pytest.fixture(scope="module", params=fixtures_db.BACKENDS)
def sweep_db(request, tmp_path_factory):
    """A database with sweep `syn`: every unit but the last done, plus an orphan file."""
    folder = tmp_path_factory.mktemp("cli")
    with fixtures_db.make_db_url(request.param, folder) as url:
        raw = write_synthetic_sweep(SPEC, folder / "raw")
        store = store_mod.connect(url)
        store.create_sweep("syn", {"demo": True}, "hash-syn", str(folder / "runs"))
        keys = [f"unit{k}" for k in range(len(raw))]
        store.add_units("syn", [store_mod.UnitSpec(k, "synth-a|float32", {"k": k}, 1)
                                for k in keys])
        leased = store.lease("w1", len(keys), 60.0, sweep_id="syn")
        assert len(leased) == len(keys)
        done_rows = 0
        for key, path in list(zip(keys, raw, strict=True))[:-1]:
            info = shards_mod.write_shard(_keyed(path, key), folder / "runs", "syn", key)
            assert store.complete(key, "w1", info, compute_s=2.5) == "done"
            done_rows += info.rows
        # The last unit's shard is on disk under a valid name but never marked done.
        shards_mod.write_shard(_keyed(raw[-1], keys[-1]), folder / "runs", "syn", keys[-1])
        store.close()
        yield url, done_rows, folder



def test_query_counts_only_done_shards(sweep_db, capsys):
    url, done_rows, _ = sweep_db
    code, out, err = run_main(capsys, "query", "SELECT count(*) AS n FROM responses",
                          "--sweep", "syn", "--db", url, "--format", "json")
    assert code == 0, err
    assert json.loads(out) == [{"n": done_rows}]


def test_query_joins_responses_with_units(sweep_db, capsys):
    url, _, _ = sweep_db
    code, out, err = run_main(capsys, "query",
                          "SELECT u.status, count(DISTINCT r.unit_key) AS k, "
                          "sum(u.compute_s) / count(*) AS s FROM responses r "
                          "JOIN units u USING (unit_key) GROUP BY u.status",
                          "--sweep", "syn", "--db", url, "--format", "csv")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].replace('"', "") == "status,k,s"
    assert lines[1].replace('"', "").startswith("done,3,2.5")


def test_query_table_and_parquet_outputs(sweep_db, capsys, tmp_path):
    url, _, _ = sweep_db
    code, out, _ = run_main(capsys, "query", "SELECT offset_class, count(*) AS n FROM responses "
                        "GROUP BY ALL ORDER BY ALL", "--db", url)
    assert code == 0 and "induction_T-1" in out and "5 row(s)" in out
    target = tmp_path / "q.parquet"
    code, _, err = run_main(capsys, "query", "SELECT * FROM sweeps", "--db", url,
                        "--format", "parquet", "-o", str(target))
    assert code == 0, err
    assert pq.read_table(target).column("sweep").to_pylist() == ["syn"]


@pytest.mark.parametrize("sql,needle", [
    ("SELECT nope FROM responses", "nope"),
    ("SELEC 1", "syntax"),
    ("COPY (SELECT 1) TO '/tmp/analysis-cli-x.csv'", "read-only"),
    ("DROP VIEW responses", "read-only"),
])
def test_query_errors_are_one_line(sweep_db, capsys, sql, needle):
    url, _, _ = sweep_db
    code, _, err = run_main(capsys, "query", sql, "--sweep", "syn", "--db", url)
    assert code == 2
    assert needle.lower() in err.lower() and "Traceback" not in err


def test_unknown_sweep_names_the_known_ones(sweep_db, capsys):
    url, _, _ = sweep_db
    code, _, err = run_main(capsys, "query", "SELECT 1", "--sweep", "nope", "--db", url)
    assert code == 2 and "sweep" in err and "syn" in err


def test_report_end_to_end(sweep_db, capsys):
    url, _, folder = sweep_db
    target = folder / f"report-{abs(hash(url)) % 10**6}"
    code, out, err = run_main(capsys, "report", "syn", "-o", str(target), "--db", url)
    assert code == 0, err
    html = (target / "index.html").read_text()
    names = re.findall(r'<img src="([^"]+)"', html)
    assert len(names) >= 5
    for name in names:
        assert (target / name).read_bytes()[:4] == b"\x89PNG"
    assert (target / "report.md").is_file()
