"""Result shards: one zstd Parquet file per unit, written atomically, checked by sha256.

A shard is data only once its unit is marked done with the same path, rows and sha256;
anything else on disk (torn, temporary, superseded) is garbage for `unisweep gc`.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import InvalidInput, UnisweepError
from tasks.layout import SHARD_SCHEMA

SHARDS_DIR = "shards"
SUFFIX = ".parquet"
TMP_SUFFIX = ".tmp"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")  # no '.': it separates key and token
# <key>.<token>.parquet: the token keeps a slow, expired writer from overwriting the shard
# of the worker that re-leased the unit; the loser's file is an orphan, never data.
_FILE_RE = re.compile(r"^\.?(?P<key>[A-Za-z0-9][A-Za-z0-9_-]*)\.(?P<token>[0-9a-f]{8,})\.parquet(\.tmp)?$")


@dataclass(frozen=True)
class ShardInfo:
    """Where a unit's shard is and what it must contain (recorded with the done unit)."""

    path: str
    rows: int
    bytes: int
    sha256: str


def check_name(field: str, value: str) -> str:
    """Sweep names become path parts: letters, digits, '.', '_', '-' only."""
    if not isinstance(value, str) or not NAME_RE.match(value) or ".." in value:
        raise InvalidInput(
            field, "1-128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit", value
        )
    return value


def check_key(field: str, value: str) -> str:
    """Unit keys become file names: letters, digits, '_', '-' only (a hex digest fits)."""
    if not isinstance(value, str) or not KEY_RE.match(value):
        raise InvalidInput(field, "1-128 characters of A-Z a-z 0-9 _ - starting with a letter or digit", value)
    return value


def sweep_shard_dir(output_dir: str | os.PathLike[str], sweep: str) -> Path:
    """The folder holding one sweep's shards (fanned out by the key's first two characters)."""
    return Path(output_dir) / SHARDS_DIR / check_name("sweep", sweep)


def key_of(path: str | os.PathLike[str]) -> str | None:
    """The unit key a shard (or temporary) file name belongs to, or None if not a shard name."""
    m = _FILE_RE.match(Path(path).name)
    return m["key"] if m else None


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _conform(table: pa.Table) -> pa.Table:
    missing = [f.name for f in SHARD_SCHEMA if f.name not in table.column_names]
    if missing:
        raise InvalidInput(
            "table", "a table with the columns of tasks.layout.SHARD_SCHEMA", f"missing {missing}"
        )
    try:
        return table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        raise InvalidInput("table", "columns castable to tasks.layout.SHARD_SCHEMA", str(exc)) from exc


def write_shard(
    table: pa.Table, output_dir: str | os.PathLike[str], sweep: str, unit_key: str
) -> ShardInfo:
    """Write `table` as the shard of `unit_key`: temporary name, fsync, rename, fsync the folder.

    The caller then marks the unit done with the returned ShardInfo (Store.complete); until
    then the file is not data.
    """
    check_key("unit_key", unit_key)
    table = _conform(table)
    folder = sweep_shard_dir(output_dir, sweep) / unit_key[:2]
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{unit_key}.{secrets.token_hex(4)}{SUFFIX}"
    final = folder / name
    tmp = folder / f".{name}{TMP_SUFFIX}"  # hidden: no glob for *.parquet ever sees it
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        # A full or read-only disk, or an interrupt: a torn temporary would only fill the
        # disk further (and every retry would leave one more).
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    size = final.stat().st_size
    return ShardInfo(path=str(final.resolve()), rows=table.num_rows, bytes=size, sha256=sha256_file(final))


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_shard(info: ShardInfo, *, checksum: bool = True) -> str | None:
    """None if the file matches `info` (exists, bytes, sha256, Parquet row count); else why not."""
    path = Path(info.path)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != info.bytes:
        return f"size {size} != recorded {info.bytes}"
    digest = sha256_file(path) if checksum else info.sha256
    if digest != info.sha256:
        return f"sha256 {digest[:12]}... != recorded {info.sha256[:12]}..."
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        return f"unreadable Parquet: {exc}"
    if rows != info.rows:
        return f"rows {rows} != recorded {info.rows}"
    return None


def shard_files(output_dir: str | os.PathLike[str], sweep: str) -> list[Path]:
    """Every file under the sweep's shard folder (shards, temporaries, anything else)."""
    root = sweep_shard_dir(output_dir, sweep)
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file())


class ShardMismatch(UnisweepError):
    """Done shards whose bytes differ from what was recorded: their data is never returned."""

    def __init__(self, problems: list[tuple[str, str]], checked: int) -> None:
        self.problems = problems
        path, why = problems[0]
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        super().__init__(
            f"{len(problems)} of {checked} done shards do not match the database ({path}: {why}"
            f"{more}); nothing was read. `unisweep verify SWEEP` lists them, "
            "`unisweep retry SWEEP --bad-shards` recomputes them")


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "unisweep" / "verified-shards.sqlite"


# (path, size, mtime_ns, sha256) of files this process already hashed.
_VERIFIED: set[tuple[str, int, int, str]] = set()


class _VerifiedCache:
    """Shards already hashed, by (path, size, mtime_ns, recorded sha256), kept across runs in
    a small SQLite file in the user's cache folder (XDG_CACHE_HOME, else ~/.cache).

    A file rewritten in place gets a new mtime or size and is hashed again; bit rot under an
    unchanged mtime is what the full `unisweep verify` is for. The cache is an optimisation
    only: when it cannot be opened or written, every shard is hashed.
    """

    def __init__(self) -> None:
        self.con: sqlite3.Connection | None = None
        try:
            path = _cache_file()
            path.parent.mkdir(parents=True, exist_ok=True)
            self.con = sqlite3.connect(path, timeout=5)
            self.con.execute("CREATE TABLE IF NOT EXISTS verified (path TEXT, size INTEGER, "
                             "mtime_ns INTEGER, sha256 TEXT, PRIMARY KEY (path, size, mtime_ns, sha256))")
        except (OSError, sqlite3.Error):
            self.con = None

    def has(self, key: tuple[str, int, int, str]) -> bool:
        if key in _VERIFIED:
            return True
        if self.con is None:
            return False
        try:
            hit = self.con.execute("SELECT 1 FROM verified WHERE path=? AND size=? AND mtime_ns=? "
                                   "AND sha256=?", key).fetchone() is not None
        except sqlite3.Error:
            return False
        if hit:
            _VERIFIED.add(key)
        return hit

    def add(self, keys: list[tuple[str, int, int, str]]) -> None:
        _VERIFIED.update(keys)
        if self.con is None or not keys:
            return
        try:
            with self.con:
                self.con.executemany("INSERT OR IGNORE INTO verified VALUES (?, ?, ?, ?)", keys)
        except sqlite3.Error:
            pass

    def close(self) -> None:
        if self.con is not None:
            self.con.close()


def _stat(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a shard, local or in an object store; None when it is missing."""
    if "://" in path:
        import pyarrow.fs as pafs

        try:
            fs, inner = pafs.FileSystem.from_uri(path)
            found = fs.get_file_info(inner)
        except (OSError, ValueError) as exc:
            raise UnisweepError(f"{path}: cannot reach the shard ({str(exc).splitlines()[0]})") from None
        if found.type == pafs.FileType.NotFound:
            return None
        return int(found.size or 0), int(found.mtime_ns or 0)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def check_shards(shards: list[ShardInfo]) -> list[ShardInfo]:
    """The shards, each checked against its recorded bytes and sha256 before any data is read.

    A file seen before with the same (path, size, mtime) is not hashed again (see
    _VerifiedCache). Raises ShardMismatch naming the missing or changed shards.
    """
    cache = _VerifiedCache()
    problems: list[tuple[str, str]] = []
    fresh: list[tuple[str, int, int, str]] = []
    try:
        for info in shards:
            st = _stat(info.path)
            if st is None:
                problems.append((info.path, "missing"))
                continue
            key = (info.path, st[0], st[1], info.sha256)
            if st[0] == info.bytes and cache.has(key):
                continue
            reason = verify_shard(info)
            if reason:
                problems.append((info.path, reason))
            else:
                fresh.append(key)
        cache.add(fresh)
    finally:
        cache.close()
    if problems:
        raise ShardMismatch(problems, len(shards))
    return shards
