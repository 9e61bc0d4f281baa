"""The db CLI as a user meets it: status, verify, gc, db upgrade, and bad or unreachable URLs.

Error cases run the real `unisweep` entry point in a subprocess: one line, masked URL, no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from db.migrate import head_revision
from db.shards import write_shard
from db.store import UnitSpec, connect
from orchestrator.cli import app
from tasks.errors import UnisweepError
from tests.fixtures_db import PG_TEST_URL, postgres_available
from tests.test_db_shards import shard_table

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "UNISWEEP_DB"}  # only what the test sets
    full_env = {**base, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=60,
    )


BAD_PG = [
    ("postgresql://bob:s3cretpw@127.0.0.1:1/test", "bob:***@127.0.0.1:1/test"),  # nothing listens
    ("postgresql://bob:s3cretpw@127.0.0.1:5432/test", "bob:***@127.0.0.1:5432/test"),  # no such role
    ("postgresql://bob:s3cretpw@no-such-host.invalid/x", "bob:***@no-such-host.invalid/x"),
    ("postgresql+pg8000://bob:s3cretpw@127.0.0.1/x", "bob:***@127.0.0.1/x"),  # other driver
    ("mysql://bob:s3cretpw@127.0.0.1/x", "bob:***@127.0.0.1/x"),  # unsupported backend
]


@pytest.mark.postgres
def test_bad_postgres_url_one_masked_line() -> None:
    if not postgres_available():
        pytest.skip(f"PostgreSQL not reachable at {PG_TEST_URL}")
    # In-process: every bad URL is a UnisweepError naming the masked URL, never the password.
    for url, shown in BAD_PG:
        with pytest.raises(UnisweepError) as exc:
            connect(url)
        assert shown in str(exc.value) and "s3cretpw" not in str(exc.value), str(exc.value)
    # As the user runs it: one line on stderr, exit non-zero, no traceback (flag and env var).
    url, shown = BAD_PG[1]
    for args, env in ((["status", "s1", "--db", url], None), (["db", "upgrade"], {"UNISWEEP_DB": url})):
        res = _cli(*args, env=env)
        out = res.stdout + res.stderr
        assert res.returncode != 0 and shown in out and "s3cretpw" not in out, out
        assert "Traceback" not in out and out.strip().startswith("error:")
        assert "role \"bob\" does not exist" in out


def test_bad_sqlite_paths(tmp_path: Path) -> None:
    res = _cli("status", "s1", "--out", str(tmp_path / "nothing-here"))
    assert res.returncode != 0 and "no database file" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "nothing-here").exists()  # a reading command creates nothing
    (tmp_path / "adir.db").mkdir()
    res = _cli("db", "upgrade", "--db", f"sqlite:///{tmp_path / 'adir.db'}")
    assert res.returncode != 0 and "adir.db" in res.stderr and "Traceback" not in res.stderr
    res = _cli("status", "s1", "--db", "sqlite://")
    assert res.returncode != 0 and "invalid db" in res.stderr


def test_cli_status_verify_gc(db_url: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    store = connect(db_url)
    sid = store.create_sweep("cli", {}, "h", out)
    store.add_units(sid, [UnitSpec(f"u{i}", None, {}, 10) for i in range(5)])
    units = store.lease("w", 3, 60, sweep_id="cli")
    infos = {}
    for u in units[:2]:
        infos[u.key] = write_shard(shard_table(30, u.key), out, "cli", u.key)
        assert store.complete(u.key, "w", infos[u.key], 1.0) == "done"
    assert store.fail(units[2].key, "w", "Traceback...\nRuntimeError: CUDA out of memory", 1) == "failed"
    store.release("w")
    orphan = out / "shards" / "cli" / "u9" / "u9.0123abcd.parquet"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"PAR1 torn")
    runner = CliRunner()
    env = {"UNISWEEP_DB": db_url, "COLUMNS": "200"}

    res = runner.invoke(app, ["status", "cli"], env=env)
    assert res.exit_code == 0, res.output
    assert "cells 20/50 (40.0%)" in res.output
    assert "u2" in res.output and "[w] RuntimeError: CUDA out of memory" in res.output

    res = runner.invoke(app, ["verify", "cli"], env=env)
    assert res.exit_code == 0 and "2 shards verified" in res.output
    Path(infos["u1"].path).write_bytes(b"not the shard any more")
    res = runner.invoke(app, ["verify", "cli"], env=env)
    assert res.exit_code == 1 and "u1" in res.output and "size" in res.output

    res = runner.invoke(app, ["gc", "cli", "--dry-run"], env=env)
    assert res.exit_code == 0 and "would remove 1 orphan" in res.output and orphan.exists()
    res = runner.invoke(app, ["gc", "cli"], env=env)
    assert res.exit_code == 0 and "removed 1 orphan" in res.output and not orphan.exists()
    assert Path(infos["u0"].path).exists()

    res = runner.invoke(app, ["db", "upgrade", "--db", db_url])
    assert res.exit_code == 0 and f"already at revision {head_revision()}" in res.output
    store.close()


def test_cli_db_upgrade_creates_default_sqlite(tmp_path: Path) -> None:
    res = _cli("db", "upgrade", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert f"upgraded <empty> -> {head_revision()}" in res.stdout and (tmp_path / "unisweep.db").is_file()
