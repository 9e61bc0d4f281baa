"""Shards in an object store, against a real S3-compatible server (SeaweedFS on 127.0.0.1).

Write / verify / gc through the Store, `query` and the Python API over s3 shards, head_responses
files beside them (the same lifecycle as shards, local and s3 alike), the sha-on-read cache
keyed by an object's ETag, and the bad outputs a user can give (no bucket, a misspelled
bucket, no credentials, no endpoint): one line naming `output`, exit 2, nothing written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from db import shards as shards_mod
from db import storage
from db.shards import ShardMismatch, check_shards, heads_path, shard_files, write_shard
from db.store import Store, UnitSpec, connect
from tasks.errors import InvalidInput
from tasks.layout import HEAD_SHARD_SCHEMA
from tests.fixtures_s3 import S3Server
from tests.orch_helpers import spec_dict, write_spec
from tests.test_db_shards import shard_table

ROOT = Path(__file__).absolute().parents[1]


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """The server's variables in this process, and fresh clients that see them."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    storage.forget_filesystems()
    yield s3_server
    storage.forget_filesystems()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    store = connect(f"sqlite:///{tmp_path / 'u.db'}")
    yield store
    store.close()


def _raw_fs(s3: S3Server) -> pafs.S3FileSystem:
    """A client of our own, to change objects behind the Store's back."""
    return pafs.S3FileSystem(access_key=s3.env["AWS_ACCESS_KEY_ID"],
                             secret_key=s3.env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_override=s3.endpoint, region="us-east-1")


def _done_sweep(store: Store, output: str, name: str, keys: list[str], rows: int = 200) -> dict:
    sid = store.create_sweep(name, {}, "h", output)
    store.add_units(sid, [UnitSpec(k, None, {}, 1) for k in keys])
    infos = {}
    for u in store.lease("w", len(keys), 60, sweep_id=name):
        infos[u.key] = write_shard(shard_table(rows, u.key), output, name, u.key)
        assert store.complete(u.key, "w", infos[u.key], 0.0) == "done"
    return infos


# ---- offline: what an `output` may be ----------------------------------------------------


@pytest.mark.parametrize("value, needle", [
    ("s3://", "no bucket"),
    ("s3:///prefix", "no bucket"),
    ("ftp://host/x", "unsupported scheme"),
    ("s3://AKIA:topsecret@bucket/x", "credentials in the URL are refused"),
    ("s3://bucket/x?endpoint_override=h", "AWS_ENDPOINT_URL"),
])
def test_check_output_refuses(value: str, needle: str) -> None:
    with pytest.raises(InvalidInput, match="output") as err:
        storage.check_output(value)
    assert needle in str(err.value)
    assert "topsecret" not in str(err.value)


def test_check_output_accepts() -> None:
    assert storage.check_output("s3://b/pre/") == "s3://b/pre"
    assert storage.check_output("gs://b") == "gs://b"
    assert storage.check_output("abfs://c@acct.dfs.core.windows.net/p") == "abfs://c@acct.dfs.core.windows.net/p"
    assert storage.check_output("file:///tmp/x") == "/tmp/x"
    assert storage.check_output("runs/out") == "runs/out"


def test_object_store_output_needs_a_named_database(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("UNISWEEP_DB", raising=False)
    with pytest.raises(InvalidInput, match="database"):
        connect(None, output_dir="s3://bucket/x")


# ---- against the server ---------------------------------------------------------------------


def test_write_verify_gc_on_s3(s3: S3Server, sqlite_store: Store) -> None:
    out = s3.uri("wvg")
    infos = _done_sweep(sqlite_store, out, "wvg", ["aa01", "bb02", "cc03"])
    assert all(i.path.startswith(f"{out}/shards/wvg/") for i in infos.values())
    rep = sqlite_store.verify("wvg")
    assert rep.ok and rep.checked == 3

    raw = _raw_fs(s3)
    path = infos["aa01"].path.removeprefix("s3://")
    with raw.open_input_stream(path) as f:
        data = bytearray(f.read())
    data[8] ^= 0xFF  # same size, one byte changed
    with raw.open_output_stream(path) as f:
        f.write(bytes(data))
    raw.delete_file(infos["bb02"].path.removeprefix("s3://"))
    reasons = {p.key: p.reason for p in sqlite_store.verify("wvg").problems}
    assert set(reasons) == {"aa01", "bb02"}
    assert reasons["aa01"].startswith("sha256") and reasons["bb02"] == "missing"
    assert {p.key for p in sqlite_store.verify("wvg", quick=True).problems} == {"bb02"}


def test_gc_removes_only_orphans_on_s3(s3: S3Server, sqlite_store: Store) -> None:
    out = s3.uri("gc")
    infos = _done_sweep(sqlite_store, out, "gc", ["aa01", "bb02"])
    # A superseded upload of a done unit (a slow worker that lost its lease) and a stray object.
    late = write_shard(shard_table(10, "aa01"), out, "gc", "aa01")
    stray = f"{out}/shards/gc/zz/stray.bin"
    with _raw_fs(s3).open_output_stream(stray.removeprefix("s3://")) as f:
        f.write(b"not a shard")
    assert set(shard_files(out, "gc")) == {infos["aa01"].path, infos["bb02"].path, late.path, stray}
    assert sorted(sqlite_store.gc("gc", dry_run=True)) == sorted([late.path, stray])
    assert sorted(sqlite_store.gc("gc")) == sorted([late.path, stray])
    assert set(shard_files(out, "gc")) == {infos["aa01"].path, infos["bb02"].path}
    assert sqlite_store.verify("gc").ok


def test_query_and_api_read_s3_shards(s3: S3Server, tmp_path: Path) -> None:
    from analysis.api import load_sweep

    db = f"sqlite:///{tmp_path / 'q.db'}"
    store = connect(db)
    _done_sweep(store, s3.uri("q"), "q", ["aa01", "bb02", "cc03"], rows=300)
    # One unit leased but not done: its uploaded shard is not data.
    sid = store.get_sweep("q").id
    store.add_units(sid, [UnitSpec("dd04", None, {}, 1)])
    [u] = store.lease("w", 1, 60, sweep_id="q")
    write_shard(shard_table(300, u.key), s3.uri("q"), "q", u.key)
    store.close()

    data = load_sweep("q", db=db)
    [(n, keys)] = data.sql("SELECT count(*), count(DISTINCT unit_key) FROM responses").fetchall()
    assert (n, keys) == (900, 3)
    # The CLI in a fresh process: credentials and endpoint only from the environment.
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "query",
                          "SELECT count(*) AS n, sum(r) AS s FROM responses", "--sweep", "q",
                          "--db", db, "--format", "csv"],
                         cwd=ROOT, env={**os.environ}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    expected = sum(sum(shard_table(300, k).column("r").to_pylist()) for k in ("aa01", "bb02", "cc03"))
    n_cli, s_cli = res.stdout.strip().splitlines()[-1].split(",")
    assert int(n_cli) == 900 and float(s_cli) == pytest.approx(expected, rel=1e-12)


# ---- head_responses files: the same storage layer as shards ---------------------------------


def _head_table(n: int, key: str, seed: int = 0) -> pa.Table:
    """n rows in the head_responses layout (numbers arbitrary, types exact)."""
    return pa.Table.from_pylist([dict(
        sweep="hd", unit_key=key, model="tiny", dtype="float32", T=8, n_layers=4,
        prompt_id=i % 3, prompt_kind="repeat", lp=0, j=1, eps=None if i % 2 else 1e-3,
        direction=0, l=i % 4, head=i % 2, i=1 + i % 9, r_head=float((i * 13 + seed) % 31) / 3,
        attn=0.125) for i in range(n)], schema=HEAD_SHARD_SCHEMA)


def _head_keys(t: pa.Table) -> set[tuple]:
    cols = ("unit_key", "prompt_id", "eps", "l", "head", "i", "r_head")
    return set(zip(*(t.column(c).to_pylist() for c in cols), strict=True))


def _read(path: str) -> bytes:
    if not storage.is_object_store(path):
        return Path(path).read_bytes()
    fs, p = storage.resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def _overwrite(path: str, data: bytes) -> None:
    """Replace a file or object in place (same name), as a faulty tool or bit rot would."""
    if not storage.is_object_store(path):
        Path(path).write_bytes(data)
        return
    fs, p = storage.resolve(path)
    with fs.open_output_stream(p) as f:
        f.write(data)


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3").uri(f"hd-{tmp_path.name}")


def test_head_files_live_and_die_with_their_shards(output: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from analysis.api import load_sweep

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(shards_mod, "_VERIFIED", set())
    db = f"sqlite:///{tmp_path / 'h.db'}"
    store = connect(db)
    store.create_sweep("hd", {}, "h", output)
    store.add_units("hd", [UnitSpec(k, None, {}, 1) for k in ("aa01", "bb02")])
    heads = {"aa01": _head_table(30, "aa01"), "bb02": _head_table(40, "bb02", seed=5)}
    infos = {}
    for u in store.lease("w", 2, 60, sweep_id="hd"):
        infos[u.key] = write_shard(shard_table(50, u.key), output, "hd", u.key, heads=heads[u.key])
        assert store.complete(u.key, "w", infos[u.key], 0.0) == "done"
    hpaths = {k: str(heads_path(i.path)) for k, i in infos.items()}
    if storage.is_object_store(output):
        assert all(p.startswith(f"{output}/shards/hd/") for p in hpaths.values())
    assert {str(p) for p in shard_files(output, "hd")} == {i.path for i in infos.values()} | set(hpaths.values())
    assert store.verify("hd").ok and store.orphans("hd") == []

    # Both views read from where the files are, exactly the rows written.
    data = load_sweep("hd", db=db)
    assert data.sql("SELECT count(*) FROM responses").fetchall() == [(100,)]
    got = data.sql("SELECT unit_key, prompt_id, eps, l, head, i, r_head FROM heads").fetchall()
    assert len(got) == 70 and set(got) == _head_keys(heads["aa01"]) | _head_keys(heads["bb02"])

    # A superseded write (a slow worker that lost its lease) leaves two orphans; gc takes both.
    late = write_shard(shard_table(5, "aa01"), output, "hd", "aa01", heads=_head_table(3, "aa01"))
    orphans = {late.path, str(heads_path(late.path))}
    assert {str(p) for p in store.gc("hd")} == orphans
    assert {str(p) for p in shard_files(output, "hd")} == {i.path for i in infos.values()} | set(hpaths.values())

    # One byte of a done head file changed in place, same size, right after a cached read:
    # verify names the file, every read refuses, retry --bad-shards requeues its unit.
    body = bytearray(_read(hpaths["bb02"]))
    body[len(body) // 2] ^= 0xFF
    _overwrite(hpaths["bb02"], bytes(body))
    [problem] = store.verify("hd").problems
    assert problem.key == "bb02" and problem.reason.startswith("head_responses file ")
    assert "sha256" in problem.reason
    with pytest.raises(ShardMismatch, match="head_responses"):
        load_sweep("hd", db=db)
    # What `unisweep retry --bad-shards` does before it runs the driver (the sweep test in
    # test_s3_sweep.py runs the command itself, on Ray).
    from orchestrator.run_commands import _requeue_lost_shards

    assert _requeue_lost_shards(store, "hd", checksum=True) == 1
    [u] = store.lease("w2", 5, 60, sweep_id="hd")
    assert u.key == "bb02"
    fresh = write_shard(shard_table(50, "bb02"), output, "hd", "bb02", heads=heads["bb02"])
    assert store.complete("bb02", "w2", fresh, 0.0) == "done"
    # The bad pair is garbage now; gc removes it and leaves the recomputed pair.
    assert {str(p) for p in store.gc("hd")} == {infos["bb02"].path, hpaths["bb02"]}
    assert store.verify("hd").ok
    got = load_sweep("hd", db=db).sql("SELECT unit_key, prompt_id, eps, l, head, i, r_head FROM heads")
    assert set(got.fetchall()) == _head_keys(heads["aa01"]) | _head_keys(heads["bb02"])
    store.close()


def test_read_cache_keys_objects_by_etag(s3: S3Server, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An object's mtime has whole seconds: a same-size rewrite in the same second keeps it.
    The sha-on-read cache must hash such an object again (its ETag changed)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(shards_mod, "_VERIFIED", set())
    hashed: list[str] = []
    real_verify = shards_mod.verify_shard
    monkeypatch.setattr(shards_mod, "verify_shard",
                        lambda info, **kw: hashed.append(info.path) or real_verify(info, **kw))
    fs = _raw_fs(s3)
    for attempt in range(5):
        info = write_shard(shard_table(200, "ee05"), s3.uri(f"etag{attempt}"), "e", "ee05")
        path = info.path.removeprefix("s3://")
        hashed.clear()
        check_shards([info])
        check_shards([info])
        assert hashed == [info.path]  # cached after the first read: not hashed again
        before = fs.get_file_info(path).mtime_ns
        data = bytearray(_read(info.path))
        data[len(data) // 3] ^= 0x01
        _overwrite(info.path, bytes(data))
        if fs.get_file_info(path).mtime_ns == before:
            break  # the rewrite kept the mtime: the case this test is about
    else:
        pytest.fail("could not rewrite an object within one second in 5 tries")
    assert fs.get_file_info(path).size == info.bytes
    with pytest.raises(ShardMismatch, match="sha256"):
        check_shards([info])


# ---- bad outputs: exit 2, one line naming output, nothing written ----------------------------


def _run_cli(spec: Path, db: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--db",
                           f"sqlite:///{db}", "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["no_bucket_in_url", "misspelled_bucket", "no_credentials",
                                  "wrong_secret", "unreachable"])
def test_bad_output_exits_2_before_any_write(case: str, s3: S3Server, tmp_path: Path) -> None:
    env = {**os.environ}
    output = s3.uri("bad")
    if case == "no_bucket_in_url":
        output = "s3://"
    elif case == "misspelled_bucket":
        output = f"s3://{s3.bucket}-typo/bad"
    elif case == "no_credentials":
        env.pop("AWS_ACCESS_KEY_ID")
        env.pop("AWS_SECRET_ACCESS_KEY")
    elif case == "wrong_secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif case == "unreachable":
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # discard port: nothing listens
    spec = write_spec(tmp_path / "s.yaml", spec_dict("bad", Path("x"), output=output))
    res = _run_cli(spec, tmp_path / "u.db", env)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "output" in lines[0], res.stderr
    assert "Traceback" not in res.stderr and "not-the-secret" not in res.stderr + res.stdout
    assert not (tmp_path / "u.db").exists()  # no database row, no file: nothing written
    listing = _raw_fs(s3).get_file_info(pafs.FileSelector(f"{s3.bucket}/bad", allow_not_found=True,
                                                          recursive=True))
    assert listing == []
