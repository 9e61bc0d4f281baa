"""Hostile and broken input (issue 15, items 4 and 6-9): one line, exit 2, nothing written.

Every case here printed a traceback, hung, flooded the terminal or silently did the wrong
thing before; each asserts the one-line error and that the database did not change.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

import db.shards as shards_mod
import db.store as store_mod
import tests.fixtures_db as fixtures_db
from orchestrator.model_meta import ModelMeta
from orchestrator.planner import MAX_UNITS, _n_packs, _pack, plan
from orchestrator.spec import MAX_LIST, load_spec, spec_from_dict
from tasks.errors import InvalidInput
from tasks.layout import SHARD_SCHEMA
from tests.orch_helpers import run_main, spec_dict


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert len(err) < 1200, f"{len(err)} characters"
    for n in needles:
        assert n in err, (n, err)


def _meta(name: str) -> ModelMeta:
    return ModelMeta(name, name, n_layers=4, d_model=16, max_positions=64, identity={"name": name})


# ---- the spec file (item 7: encoding, item 8: size, aliases, duplicates, booleans) ---------------


def _alias_bomb() -> str:
    """The classic 'billion laughs': 9 levels of 9 aliases, ~400 bytes, 9**9 leaves."""
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    prev = "a"
    for name in "bcdefghi":
        text += f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]\n"
        prev = name
    return text + 'name: bomb\nmodels: ["tiny:llama"]\nprompts: {T: 4, count: 1}\nlayers: [0]\neps: *i\n'


def _good_yaml(tmp: Path) -> str:
    return yaml.safe_dump(spec_dict("ok", tmp / "out"))


HOSTILE_SPECS = [
    # (id, file bytes from the good spec's text, field named, words)
    ("non-utf8", lambda t: b"name: caf\xe9\n" + t.encode(), "spec", "UTF-8"),
    ("alias-bomb", lambda t: _alias_bomb().encode(), "spec", "aliases"),
    ("too-large", lambda t: t.encode() + b"# " + b"x" * (1 << 20) + b"\n", "spec", "KiB"),
    ("long-list", lambda t: t.replace("- 0.001", "- " + "\n- ".join(
        str(1e-3 * (1 + i)) for i in range(MAX_LIST + 1)), 1).encode(), "spec", "entries"),
    ("duplicate-key", lambda t: (t + "name: other\n").encode(), "name", "each key once"),
    ("eps-true", lambda t: t.replace("- 0.001", "- true", 1).encode(), "eps", "true/false"),
    ("T-true", lambda t: t.replace("T: 4", "T: true").encode(), "prompts.T", "true/false"),
    ("layers-false", lambda t: t.replace("- 0\n", "- false\n", 1).encode(), "layers", "true/false"),
]


@pytest.mark.parametrize("why,make,field,words", HOSTILE_SPECS, ids=[h[0] for h in HOSTILE_SPECS])
def test_hostile_spec_files(tmp_path: Path, why: str, make, field: str, words: str) -> None:
    p = tmp_path / "s.yaml"
    p.write_bytes(make(_good_yaml(tmp_path)))
    t0 = time.perf_counter()
    with pytest.raises(InvalidInput) as ei:
        load_spec(p)
    took = time.perf_counter() - t0
    assert ei.value.field == field, str(ei.value)
    assert words in str(ei.value), str(ei.value)
    assert len(str(ei.value)) < 1000
    assert took < 10, f"{why}: {took:.1f} s"


def test_error_text_is_capped_whatever_the_value() -> None:
    # What flooded the terminal: the bomb's value quoted whole in the message (5.8 MB).
    bomb = yaml.safe_load(_alias_bomb())
    for field in ("eps", "layers", "positions", "models"):
        d = spec_dict("x", Path("/tmp"))
        d[field] = bomb["i"]
        with pytest.raises(InvalidInput) as ei:
            spec_from_dict(d)
        assert len(str(ei.value)) < 1000, (field, len(str(ei.value)))


def test_lattice_and_list_caps() -> None:
    with pytest.raises(InvalidInput, match="at most 10000 eps values"):
        spec_from_dict(spec_dict("x", Path("/tmp"), eps={"start": 1e-300, "stop": 1e300, "per_decade": 100}))
    with pytest.raises(InvalidInput, match="at most 10000 eps values"):
        spec_from_dict(spec_dict("x", Path("/tmp"), eps=[1e-3 * (1 + i) for i in range(10_001)]))


def test_planner_counts_units_without_building_them(tmp_path: Path) -> None:
    # The count used for the cap is exactly what _pack builds.
    for n_eps in (1, 3, 7, 12):
        for n_pos in (1, 5, 33):
            for per, cpu in ((4, 1), (4, 12), (8, 100), (2, 7), (1, 1000)):
                built = _pack(False, tuple(range(n_eps)), list(range(n_pos)), per, cpu)
                assert _n_packs(n_eps, n_pos, per, cpu) == len(built), (n_eps, n_pos, per, cpu)
                # The linear response is one more strength on the same axis.
                with_linear = _pack(True, tuple(range(n_eps - 1)), list(range(n_pos)), per, cpu)
                assert _n_packs(n_eps, n_pos, per, cpu) == len(with_linear), (n_eps, n_pos, per, cpu)
    # A grid of ~10**9 units is refused in well under a second instead of planning for hours.
    huge = spec_from_dict(spec_dict("huge", tmp_path, prompts={"T": 500, "count": 1000},
                                    positions="all", layers=[0, 1, 2, 3],
                                    eps={"start": 1e-6, "stop": 1, "per_decade": 10},
                                    cells_per_unit=1))
    t0 = time.perf_counter()
    with pytest.raises(InvalidInput) as ei:
        plan(huge, meta_fn=lambda n: ModelMeta(n, n, 4, 16, 2048, {"name": n}))
    assert time.perf_counter() - t0 < 2.0
    assert ei.value.field == "cells_per_unit" and str(MAX_UNITS) in str(ei.value)


def test_cli_bad_spec_files_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    for why, make, field, _ in HOSTILE_SPECS:
        p = tmp_path / f"{why}.yaml"
        p.write_bytes(make(_good_yaml(tmp_path)))
        code, _, err = run_main(capsys, "run", str(p), "--plan-only")
        _one_line_error(code, err, f"invalid {field}")
    assert not out.exists()  # nothing was created for any of them


# ---- paths and URLs (item 7) -----------------------------------------------------------------------


def test_output_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(spec_dict("f", blocker)))
    code, _, err = run_main(capsys, "run", str(p), "--plan-only")
    _one_line_error(code, err, "invalid output", "existing file")
    p.write_text(yaml.safe_dump(spec_dict("f", blocker / "sub")))
    code, _, err = run_main(capsys, "run", str(p), "--plan-only")
    _one_line_error(code, err, "invalid output")
    # A SQLite database under a file: the db field, not a traceback.
    p.write_text(yaml.safe_dump(spec_dict("f", tmp_path / "out", database=f"sqlite:///{blocker}/x.db")))
    code, _, err = run_main(capsys, "run", str(p), "--plan-only")
    _one_line_error(code, err, "invalid db")
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("url", ["postgresql://me:s3cretpw@127.0.0.1:54x2/db",
                                 "postgresql://me:s3cretpw@127.0.0.1:99999/db"])
def test_db_url_with_bad_port(url: str, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_main(capsys, "status", "any", "--db", url)
    _one_line_error(code, err, "invalid db")
    assert "s3cretpw" not in out + err


def test_ray_address_refused_before_any_write(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(spec_dict("r", tmp_path / "out")))
    t0 = time.perf_counter()
    code, _, err = run_main(capsys, "run", str(p), "--address", "ray://127.0.0.1:1")
    _one_line_error(code, err, "ray://127.0.0.1:1", "cannot connect")
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "out").exists()


def test_ray_client_timeout_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray's client raises ConnectionError after ~50 s of retries on a port that accepts but
    # never answers; that must be the same one line.
    import ray

    from orchestrator import driver
    from tasks.errors import UnisweepError

    def fake_init(*a, **k):
        raise ConnectionError("ray client connection timeout")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    with pytest.raises(UnisweepError, match="cannot connect to the Ray cluster .ray client connection timeout"):
        driver.init_ray("auto")


# ---- query and report (items 7 and 9) ----------------------------------------------------------


@pytest.fixture(scope="module", params=fixtures_db.BACKENDS)
def small_db(request, tmp_path_factory):
    """Sweep `q` with two done units of synthetic rows."""
    folder = tmp_path_factory.mktemp("q")
    with fixtures_db.make_db_url(request.param, folder) as url:
        store = store_mod.connect(url)
        store.create_sweep("q", {"demo": True}, "hash-q", str(folder / "runs"))
        keys = ["u0", "u1"]
        store.add_units("q", [store_mod.UnitSpec(k, "g", {"k": k}, 1) for k in keys])
        store.lease("w", 2, 60.0, sweep_id="q")
        for k in keys:
            info = shards_mod.write_shard(_rows(k), folder / "runs", "q", k)
            assert store.complete(k, "w", info) == "done"
        store.close()
        yield url, folder


def _rows(key: str, n: int = 6) -> pa.Table:
    cols = {}
    for f in SHARD_SCHEMA:
        if pa.types.is_string(f.type):
            vals = [key if f.name == "unit_key" else ("repeat", "control")[i % 2] if f.name == "prompt_kind"
                    else "x" for i in range(n)]
        elif pa.types.is_floating(f.type):
            vals = [0.5 + i for i in range(n)]
        else:
            vals = [i % 3 for i in range(n)]
        cols[f.name] = pa.array(vals, f.type)
    return pa.table(cols, schema=SHARD_SCHEMA)


def test_explain_analyze_cannot_run_a_write(small_db, capsys, tmp_path: Path) -> None:
    url, _ = small_db
    target = tmp_path / "leak.csv"
    for sql in (f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{target}'",
                "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
                "/* hi */ explain analyze DROP VIEW responses"):
        code, _, err = run_main(capsys, "query", sql, "--db", url)
        _one_line_error(code, err, "invalid sql")
    assert not target.exists()
    # EXPLAIN ANALYZE of a query is still allowed, and runs.
    code, out, err = run_main(capsys, "query", "EXPLAIN ANALYZE SELECT count(*) FROM responses", "--db", url)
    assert code == 0, err


def test_several_statements_refused(small_db, capsys) -> None:
    url, _ = small_db
    code, _, err = run_main(capsys, "query", "SELECT 1; SELECT 2", "--db", url)
    _one_line_error(code, err, "invalid sql", "2 statements")


def test_pivot_allowed(small_db, capsys) -> None:
    url, _ = small_db
    code, out, err = run_main(capsys, "query", "PIVOT responses ON prompt_kind USING count(*) GROUP BY unit_key "
                          "ORDER BY unit_key", "--db", url, "-f", "json")
    assert code == 0, err
    assert json.loads(out) == [{"unit_key": "u0", "control": 3, "repeat": 3},
                               {"unit_key": "u1", "control": 3, "repeat": 3}]


def test_csv_with_a_list_column(small_db, capsys) -> None:
    url, _ = small_db
    code, out, err = run_main(capsys, "query", "SELECT unit_key, list(l ORDER BY l) AS ls FROM responses "
                          "GROUP BY unit_key ORDER BY unit_key", "--db", url, "-f", "csv")
    assert code == 0, err
    assert out.splitlines() == ['"unit_key","ls"', '"u0","[0, 0, 1, 1, 2, 2]"', '"u1","[0, 0, 1, 1, 2, 2]"']


def test_unwritable_outputs(small_db, capsys, tmp_path: Path) -> None:
    url, _ = small_db
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv in (("report", "q", "-o", "/proc/unisweep-report"),
                 ("report", "q", "-o", str(blocker / "sub")),
                 ("query", "SELECT 1", "-o", "/proc/unisweep.csv", "-f", "csv"),
                 ("query", "SELECT 1", "-o", str(tmp_path / "no" / "such" / "x.parquet"), "-f", "parquet")):
        code, _, err = run_main(capsys, *argv, "--db", url)
        _one_line_error(code, err, "invalid --output")


# ---- passwords (item 6) ----------------------------------------------------------------------------


@pytest.mark.postgres
def test_spec_password_never_stored(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sqlalchemy.engine import make_url

    with fixtures_db.make_db_url("postgres", tmp_path) as url:
        # The test server trusts local connections, so any password works and must not leak.
        with_pw = make_url(url).set(password="s3cretpw").render_as_string(hide_password=False)
        p = tmp_path / "s.yaml"
        p.write_text(yaml.safe_dump(spec_dict("pw", tmp_path / "out", database=with_pw)))
        code, out, err = run_main(capsys, "run", str(p), "--plan-only")
        assert code == 0, err
        assert "s3cretpw" not in out + err and "UNISWEEP_DB" in out + err
        store = store_mod.connect(url)
        assert "s3cretpw" not in json.dumps(store.get_sweep("pw").spec)
        store.close()
        code, out, err = run_main(capsys, "query", "SELECT spec FROM sweeps", "--db", url, "-f", "json")
        assert code == 0 and "***" in out and "s3cretpw" not in out, out + err


def test_old_cleartext_spec_masked_on_read(db_url: str) -> None:
    # Sweeps stored before masking keep the password in the row: readers never see it.
    store = store_mod.connect(db_url)
    try:
        store.create_sweep("old", {"database": "postgresql://me:s3cretpw@db.example/x"}, "h", "/tmp/o")
        spec = store.table_arrow("sweeps").column("spec").to_pylist()[0]
        assert "s3cretpw" not in spec and "me:***@db.example" in spec
    finally:
        store.close()


# ---- torn temporaries (item 4) ------------------------------------------------------------------


def test_failed_shard_write_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = shards_mod.pq.write_table

    def disk_full(table, where, **kw):
        real_write(table.slice(0, 1), where, **kw)  # some bytes reach the disk, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards_mod.pq, "write_table", disk_full)
    for _ in range(3):
        with pytest.raises(OSError, match="No space"):
            shards_mod.write_shard(_rows("k1"), tmp_path, "s", "k1")
    left = shards_mod.shard_files(tmp_path, "s")
    assert left == [], left


# ---- corrupted shards (item 5) ---------------------------------------------------------------------


def _flip_bit(path: str, offset: int) -> None:
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0x01
    st = os.stat(path)
    Path(path).write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime as before


def test_corrupted_shard_never_read(db_url: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(shards_mod, "_VERIFIED", set())
    store = store_mod.connect(db_url)
    store.create_sweep("c", {"demo": True}, "hash-c", str(tmp_path / "runs"))
    store.add_units("c", [store_mod.UnitSpec(k, "g", {"k": k}, 1) for k in ("u0", "u1")])
    store.lease("w", 2, 60.0, sweep_id="c")
    infos = {}
    for k in ("u0", "u1"):
        infos[k] = shards_mod.write_shard(_rows(k, n=200), tmp_path / "runs", "c", k)
        store.complete(k, "w", infos[k])
    store.close()
    hashed: list[str] = []
    real_sha = shards_mod.sha256_file
    monkeypatch.setattr(shards_mod, "sha256_file", lambda p, *a: hashed.append(str(p)) or real_sha(p, *a))
    code, out, err = run_main(capsys, "query", "SELECT sum(r) AS s FROM responses", "--db", db_url, "-f", "json")
    assert code == 0, err
    good_sum = json.loads(out)[0]["s"]
    assert sorted(hashed) == sorted(i.path for i in infos.values())
    # Second read: both shards known by (path, size, mtime): nothing hashed again.
    hashed.clear()
    monkeypatch.setattr(shards_mod, "_VERIFIED", set())  # a new process: only the cache file
    code, out, _ = run_main(capsys, "query", "SELECT sum(r) AS s FROM responses", "--db", db_url, "-f", "json")
    assert code == 0 and json.loads(out)[0]["s"] == good_sum and hashed == []
    # One bit flipped in a data page, the file rewritten with its old mtime: still caught
    # when the cache is cold, and (mtime changed) whenever the file was rewritten normally.
    size = infos["u1"].bytes
    for restore_mtime in (False, True):
        monkeypatch.setattr(shards_mod, "_VERIFIED", set())
        if restore_mtime:
            (tmp_path / "cache").joinpath("unisweep", "verified-shards.sqlite").unlink()
            _flip_bit(infos["u1"].path, size // 3)
        else:
            data = bytearray(Path(infos["u1"].path).read_bytes())
            data[size // 3] ^= 0x01
            time.sleep(0.01)
            Path(infos["u1"].path).write_bytes(bytes(data))
        for argv in (("query", "SELECT sum(r) AS s FROM responses"), ("report", "c", "-o", str(tmp_path / "rep"))):
            code, out, err = run_main(capsys, *argv, "--db", db_url)
            _one_line_error(code, err, "1 of 2 done shards do not match", "sha256")
            assert "s" not in out.strip()
        if not restore_mtime:  # flip it back for the second round
            data[size // 3] ^= 0x01
            Path(infos["u1"].path).write_bytes(bytes(data))
    # A missing shard: the same refusal, naming it.
    Path(infos["u0"].path).unlink()
    code, _, err = run_main(capsys, "query", "SELECT 1", "--db", db_url)
    _one_line_error(code, err, "missing")
