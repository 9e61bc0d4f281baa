"""Result shards: atomic zstd Parquet writes, torn files never read as data, verify and gc.

Runs on SQLite and PostgreSQL; the torn-file test kills a real writer process mid-write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from db.shards import key_of, shard_files, verify_shard, write_shard
from db.store import Store, UnitSpec
from tasks.errors import InvalidInput
from tasks.layout import SHARD_SCHEMA

ROOT = Path(__file__).resolve().parents[1]


def shard_table(n: int, key: str = "k", seed: int = 0) -> pa.Table:
    """n rows in the shard layout (numbers arbitrary, types exact)."""
    cols = {
        "sweep": ["s"] * n, "unit_key": [key] * n, "model": ["tiny"] * n, "dtype": ["float32"] * n,
        "T": [8] * n, "n_layers": [4] * n, "prompt_id": [i % 7 for i in range(n)],
        "prompt_kind": ["repeat"] * n, "lp": [0] * n, "j": [1] * n,
        "eps": [None if i % 5 == 0 else 1e-3 for i in range(n)], "direction": [0] * n,
        "l": [i % 5 for i in range(n)], "i": [i % 17 for i in range(n)],
        "r": [float((i * 37 + seed) % 101) / 7 for i in range(n)],
        "r_attn": [0.5] * n, "r_mlp": [0.25] * n, "kl": [None] * n,
    }
    return pa.table(cols).cast(SHARD_SCHEMA)


def test_write_shard_roundtrip(tmp_path: Path) -> None:
    t = shard_table(1000, "abc123")
    info = write_shard(t, tmp_path, "s", "abc123")
    path = Path(info.path)
    assert path.parent == (tmp_path / "shards" / "s" / "ab").resolve()
    assert key_of(path) == "abc123" and info.rows == 1000 and info.bytes == path.stat().st_size
    back = pq.read_table(path)
    assert back.schema.equals(SHARD_SCHEMA) and back.equals(t)
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    assert verify_shard(info) is None
    assert shard_files(tmp_path, "s") == [path]  # the temporary is gone
    # A second write of the same unit gets its own name: a late writer never clobbers a shard.
    assert write_shard(t, tmp_path, "s", "abc123").path != info.path
    with pytest.raises(InvalidInput, match="table"):
        write_shard(t.drop_columns(["r"]), tmp_path, "s", "abc123")
    with pytest.raises(InvalidInput, match="unit_key"):
        write_shard(t, tmp_path, "s", "../evil")


WRITER = """
import sys, pyarrow as pa
sys.path.insert(0, sys.argv[1])
from tests.test_db_shards import shard_table
from db.shards import write_shard
t = shard_table(400_000, "victim01", seed=1)
print("ready", flush=True)
while True:
    write_shard(t, sys.argv[2], "torn", "victim01")
"""


def test_torn_and_orphan_files_never_data(store: Store, tmp_path: Path) -> None:
    sid = store.create_sweep("torn", {}, "h", tmp_path)
    store.add_units(sid, [UnitSpec("victim01", None, {}, 1), UnitSpec("good0001", None, {}, 1)])
    [good, victim] = [store.lease("w", 1, 60, sweep_id="torn")[0] for _ in range(2)][::-1]
    assert (good.key, victim.key) == ("good0001", "victim01")
    info = write_shard(shard_table(50, "good0001"), tmp_path, "torn", "good0001")
    assert store.complete("good0001", "w", info, 0.1) == "done"

    p = subprocess.Popen([sys.executable, "-c", WRITER, str(ROOT), str(tmp_path)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(1.0)  # several writes in flight or done, none marked done
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    victims = [f for f in shard_files(tmp_path, "torn") if key_of(f) == "victim01"]
    assert victims  # the writer left files behind (renamed shards and/or a partial temporary)
    # A torn copy under a final-looking name, as a crash without rename-safety would leave it.
    full = next((f for f in victims if f.suffix == ".parquet"), None) or victims[0]
    torn = full.with_name("victim01.deadbeef.parquet")
    torn.write_bytes(full.read_bytes()[: max(1, full.stat().st_size // 2)])

    # The only data is what done units point to: the good shard, nothing of the victim's.
    assert store.done_shards("torn") == [info]
    data = pa.concat_tables([pq.read_table(s.path) for s in store.done_shards("torn")])
    assert set(data.column("unit_key").to_pylist()) == {"good0001"} and data.num_rows == 50
    assert store.verify("torn").ok

    # The victim's lease is live: gc leaves its files alone (a worker may be writing) ...
    assert store.gc("torn") == []
    # ... until asked, or until the lease is gone.
    removed = store.gc("torn", include_in_flight=True, dry_run=True)
    assert sorted(removed) == sorted(victims + [torn])
    assert store.release("w") == 1
    assert sorted(store.gc("torn")) == sorted(victims + [torn])
    assert shard_files(tmp_path, "torn") == [Path(info.path)]
    assert store.verify("torn").ok


def test_verify_reports_changed_missing_and_truncated(store: Store, tmp_path: Path) -> None:
    sid = store.create_sweep("v", {}, "h", tmp_path)
    keys = ["aa01", "bb02", "cc03", "dd04"]
    store.add_units(sid, [UnitSpec(k, None, {}, 1) for k in keys])
    infos = {}
    for u in store.lease("w", 4, 60, sweep_id="v"):
        infos[u.key] = write_shard(shard_table(200, u.key), tmp_path, "v", u.key)
        assert store.complete(u.key, "w", infos[u.key], 0.0) == "done"
    rep = store.verify("v")
    assert rep.ok and rep.checked == 4
    flip = Path(infos["aa01"].path)
    raw = bytearray(flip.read_bytes())
    raw[8] ^= 0xFF  # same size, one byte of the first data page changed
    flip.write_bytes(bytes(raw))
    Path(infos["bb02"].path).unlink()
    cut = Path(infos["cc03"].path)
    cut.write_bytes(cut.read_bytes()[:-10])
    rep = store.verify("v")
    assert not rep.ok and rep.checked == 4
    reasons = {p.key: p.reason for p in rep.problems}
    assert set(reasons) == {"aa01", "bb02", "cc03"}
    assert reasons["aa01"].startswith("sha256") and reasons["bb02"] == "missing"
    assert reasons["cc03"].startswith("size")
    # --quick skips the checksum: it still sees missing and truncated files, not a flipped byte.
    assert {p.key for p in store.verify("v", quick=True).problems} == {"bb02", "cc03"}
