"""Integrity of a sweep's files: verify done units' shards, find and delete orphan files.

The database decides what is data (the shards of done units and the head_responses files
beside them); anything else under the sweep's shard folder or object store prefix is an
orphan (torn, temporary or superseded) that gc may delete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from db.leasing import utcnow
from db.models import Unit, in_sweep
from db.shards import (
    ShardInfo,
    canonical,
    heads_path,
    key_of,
    remove_file,
    shard_files,
    stat_shard,
    verify_shard,
)
from db.storage import StorageError
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
                found = stat_shard(path)  # a local file or an object in the store
            except (OSError, StorageError):
                continue  # unreadable right now: `verify` says why
            if found is None:
                problems.append(ShardProblem(key, path, "missing"))
                continue
            size = found[0]
            if size != nbytes:
                problems.append(ShardProblem(key, path, f"size {size} != recorded {nbytes}"))
        return problems

    def orphans(self, sweep: int | str, *, include_in_flight: bool = False) -> list[Path | str]:
        """Files (or objects) under the sweep's shard folder that are not the shard of a done unit.

        Files of units whose lease is live are being written right now: left out unless asked.
        """
        info = self.get_sweep(sweep)
        now = utcnow()
        with self._session() as s:
            done = {
                canonical(q)
                for (p,) in s.execute(
                    select(Unit.result_path).where(in_sweep(info.id), Unit.status == "done")
                )
                if p
                for q in (p, heads_path(p))  # a done shard's head_responses file is data too
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
            if canonical(path) in done:
                continue
            if not include_in_flight and key_of(path) in live:
                continue
            out.append(path)
        return out

    def gc(self, sweep: int | str, *, include_in_flight: bool = False, dry_run: bool = False) -> list[Path | str]:
        """Delete orphan files (torn, temporary, superseded shards); returns what was (or would be) removed."""
        paths = self.orphans(sweep, include_in_flight=include_in_flight)
        if not dry_run:
            for p in paths:
                remove_file(p)
        return paths
