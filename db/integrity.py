"""Integrity of a sweep's files: verify done units' shards, find and delete orphan files.

The database decides what is data (the shards of done units); anything else under the
sweep's shard folder is an orphan (torn, temporary or superseded) that gc may delete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from db.leasing import utcnow
from db.models import Unit, in_sweep
from db.shards import ShardInfo, key_of, shard_files, verify_shard
from db.sweeps import SweepStore


@dataclass(frozen=True)
class ShardProblem:
    key: str
    path: str | None
    reason: str


@dataclass(frozen=True)
class VerifyReport:
    sweep: str
    checked: int
    problems: list[ShardProblem]

    @property
    def ok(self) -> bool:
        return not self.problems


class IntegrityStore(SweepStore):
    """verify(), orphans() and gc() of a sweep."""

    def verify(self, sweep: int | str, *, quick: bool = False) -> VerifyReport:
        """Check every done unit's shard: file exists, size, sha256 and Parquet row count match.

        quick skips the sha256 (which reads every byte): existence, size and row count only.
        """
        info = self.get_sweep(sweep)
        with self._session() as s:
            rows = s.execute(
                select(Unit.key, Unit.result_path, Unit.result_rows, Unit.result_bytes, Unit.result_sha256)
                .where(in_sweep(info.id), Unit.status == "done")
                .order_by(Unit.id)
            ).all()
        problems = []
        for key, path, nrows, nbytes, sha in rows:
            if not path or nrows is None or nbytes is None or not sha:
                problems.append(ShardProblem(key, path, "done without a recorded shard"))
                continue
            reason = verify_shard(ShardInfo(path, nrows, nbytes, sha), checksum=not quick)
            if reason:
                problems.append(ShardProblem(key, path, reason))
        return VerifyReport(info.name, len(rows), problems)

    def lost_shards(self, sweep: int | str) -> list[ShardProblem]:
        """Done units whose shard file is missing or has another size: a stat per shard, no
        read (for `status` and `resume`; `verify` also reads rows and the sha256)."""
        info = self.get_sweep(sweep)
        with self._session() as s:
            rows = s.execute(
                select(Unit.key, Unit.result_path, Unit.result_bytes)
                .where(in_sweep(info.id), Unit.status == "done").order_by(Unit.id)
            ).all()
        problems = []
        for key, path, nbytes in rows:
            if not path:
                problems.append(ShardProblem(key, path, "done without a recorded shard"))
                continue
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                problems.append(ShardProblem(key, path, "missing"))
                continue
            except OSError:
                continue  # not a local file (object store): `verify` checks it
            if size != nbytes:
                problems.append(ShardProblem(key, path, f"size {size} != recorded {nbytes}"))
        return problems

    def orphans(self, sweep: int | str, *, include_in_flight: bool = False) -> list[Path]:
        """Files under the sweep's shard folder that are not the shard of a done unit.

        Files of units whose lease is live are being written right now: left out unless asked.
        """
        info = self.get_sweep(sweep)
        now = utcnow()
        with self._session() as s:
            done = {
                os.path.realpath(p)
                for (p,) in s.execute(
                    select(Unit.result_path).where(in_sweep(info.id), Unit.status == "done")
                )
                if p
            }
            live = set(
                s.execute(
                    select(Unit.key).where(
                        in_sweep(info.id), Unit.status == "leased", Unit.lease_expires >= now
                    )
                ).scalars()
            )
        out = []
        for path in shard_files(info.output_dir, info.name):
            if os.path.realpath(path) in done:
                continue
            if not include_in_flight and key_of(path) in live:
                continue
            out.append(path)
        return out

    def gc(self, sweep: int | str, *, include_in_flight: bool = False, dry_run: bool = False) -> list[Path]:
        """Delete orphan files (torn, temporary, superseded shards); returns what was (or would be) removed."""
        paths = self.orphans(sweep, include_in_flight=include_in_flight)
        if not dry_run:
            for p in paths:
                p.unlink(missing_ok=True)
        return paths
