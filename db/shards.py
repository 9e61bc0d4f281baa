"""Result shards: one zstd Parquet file per unit, written atomically, checked by sha256.

A shard is data only once its unit is marked done with the same path, rows and sha256;
anything else on disk or in the bucket (torn, temporary, superseded) is garbage for
`unisweep gc`. Shards go to a local folder or to an object store (db.storage says which and
opens it); every function here takes either. A unit that records heads has a second file
beside its shard, `<key>.<token>.heads.parquet` (the head_responses table), written, read,
listed and deleted the same way; the shard's own Parquet metadata holds that file's rows,
bytes and sha256, so the checksum the database keeps for the shard covers both.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from db import storage
from db.storage import StorageError
from tasks.errors import InvalidInput, UnisweepError
from tasks.layout import HEAD_SHARD_SCHEMA, SHARD_SCHEMA

SHARDS_DIR = "shards"
SUFFIX = ".parquet"
TMP_SUFFIX = ".tmp"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")  # no '.': it separates key and token
# <key>.<token>.parquet: the token keeps a slow, expired writer from overwriting the shard
# of the worker that re-leased the unit; the loser's file is an orphan, never data.
_FILE_RE = re.compile(r"^\.?(?P<key>[A-Za-z0-9][A-Za-z0-9_-]*)\.(?P<token>[0-9a-f]{8,})"
                      r"(\.heads)?\.parquet(\.tmp)?$")
HEADS_SUFFIX = ".heads" + SUFFIX
# Key of the shard's Parquet metadata that describes its head_responses file.
HEADS_META = b"unisweep.head_responses"


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
    """The local folder holding one sweep's shards (fanned out by the key's first two characters)."""
    return Path(output_dir) / SHARDS_DIR / check_name("sweep", sweep)


def sweep_shard_uri(output: str, sweep: str) -> str:
    """The object store prefix holding one sweep's shards (same layout as the local folder)."""
    return storage.join(output, SHARDS_DIR, check_name("sweep", sweep))


def _name(path: str | os.PathLike[str]) -> str:
    return str(path).rsplit("/", 1)[-1] if storage.is_object_store(path) else Path(path).name


def _sibling(path: str | os.PathLike[str], name: str) -> str | Path:
    """The file `name` in the folder (or under the prefix) of `path`."""
    if storage.is_object_store(path):
        return str(path).rsplit("/", 1)[0] + "/" + name
    return Path(path).with_name(name)


def key_of(path: str | os.PathLike[str]) -> str | None:
    """The unit key a shard (or temporary) file name belongs to, or None if not a shard name."""
    m = _FILE_RE.match(_name(path))
    return m["key"] if m else None


def canonical(path: str | os.PathLike[str]) -> str:
    """One spelling per shard, to compare a listed file with a recorded path."""
    return str(path) if storage.is_object_store(path) else os.path.realpath(path)


def sha256_file(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _conform(table: pa.Table, schema: pa.Schema = SHARD_SCHEMA, what: str = "SHARD_SCHEMA") -> pa.Table:
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise InvalidInput(
            "table", f"a table with the columns of tasks.layout.{what}", f"missing {missing}"
        )
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        raise InvalidInput("table", f"columns castable to tasks.layout.{what}", str(exc)) from exc


def heads_path(shard_path: str | os.PathLike[str]) -> str | Path:
    """Where the head_responses file of a shard is (whether or not the unit recorded heads):
    a Path beside a local shard, a URI beside an object."""
    return _sibling(shard_path, _name(shard_path).removesuffix(SUFFIX) + HEADS_SUFFIX)


def _write_atomic(table: pa.Table, folder: Path, name: str) -> ShardInfo:
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
    return ShardInfo(path=str(final.resolve()), rows=table.num_rows, bytes=final.stat().st_size,
                     sha256=sha256_file(final))


def _upload(table: pa.Table, uri: str) -> ShardInfo:
    """Upload `table` as one object under a fresh name: an object store shows an object only
    once its upload completes, so a killed writer leaves nothing readable behind."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    fs, path = storage.resolve(uri)
    try:
        with fs.open_output_stream(path) as out:
            out.write(data)
        stored = fs.get_file_info(path).size
    except OSError as exc:
        raise StorageError(f"upload of {uri} failed: {storage.reason(exc)}") from None
    if stored != data.size:
        # Some S3-compatible stores keep the SDK's aws-chunked framing as the object's bytes.
        raise StorageError(
            f"{uri}: the store kept {stored} bytes of a {data.size}-byte upload; for a store "
            "that does not understand the AWS SDK's default checksums set "
            "AWS_REQUEST_CHECKSUM_CALCULATION=when_required and "
            "AWS_RESPONSE_CHECKSUM_VALIDATION=when_required")
    return ShardInfo(path=uri, rows=table.num_rows, bytes=data.size, sha256=digest)


def _with_heads(table: pa.Table, heads: ShardInfo) -> pa.Table:
    """The shard table with its head_responses file described in its Parquet metadata."""
    meta = {"file": _name(heads.path), "rows": heads.rows, "bytes": heads.bytes, "sha256": heads.sha256}
    return table.replace_schema_metadata(
        {**(table.schema.metadata or {}), HEADS_META: json.dumps(meta).encode()})


def write_shard(
    table: pa.Table, output_dir: str | os.PathLike[str], sweep: str, unit_key: str,
    heads: pa.Table | None = None,
) -> ShardInfo:
    """Write `table` as the shard of `unit_key`: locally temporary name, fsync, rename, fsync
    the folder; in an object store one whole upload under a fresh name.

    With `heads` (a head_responses table), that file is written first (the same way, beside
    the shard) and described in the shard's metadata. The caller then marks the unit done
    with the returned ShardInfo (Store.complete); until then neither file is data.
    """
    check_key("unit_key", unit_key)
    table = _conform(table)
    if heads is not None:
        heads = _conform(heads, HEAD_SHARD_SCHEMA, "HEAD_SHARD_SCHEMA")
    name = f"{unit_key}.{secrets.token_hex(4)}{SUFFIX}"
    if storage.is_object_store(output_dir):
        folder_uri = storage.join(sweep_shard_uri(str(output_dir), sweep), unit_key[:2])
        if heads is not None:
            table = _with_heads(table, _upload(heads, storage.join(folder_uri, str(heads_path(name)))))
        return _upload(table, storage.join(folder_uri, name))
    folder = sweep_shard_dir(output_dir, sweep) / unit_key[:2]
    folder.mkdir(parents=True, exist_ok=True)
    if heads is not None:
        table = _with_heads(table, _write_atomic(heads, folder, heads_path(name).name))
    info = _write_atomic(table, folder, name)
    _fsync_dir(folder)
    return info


def _schema_metadata(shard_path: str | os.PathLike[str]) -> dict[bytes, bytes]:
    if not storage.is_object_store(shard_path):
        return pq.read_schema(shard_path).metadata or {}
    fs, path = storage.resolve(str(shard_path))
    try:
        return pq.read_schema(path, filesystem=fs).metadata or {}
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StorageError(f"{shard_path}: {storage.reason(exc)}") from None


def head_shard(shard_path: str | os.PathLike[str],
               metadata: dict[bytes, bytes] | None = None) -> ShardInfo | None:
    """The head_responses file a shard's metadata names, or None if its unit recorded none.

    `metadata`: the shard's Parquet schema metadata when the caller already read it (saves a
    second read of an object's footer)."""
    meta = _schema_metadata(shard_path) if metadata is None else metadata
    if HEADS_META not in meta:
        return None
    d = json.loads(meta[HEADS_META])
    return ShardInfo(str(_sibling(shard_path, d["file"])), d["rows"], d["bytes"], d["sha256"])


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_shard(info: ShardInfo, *, checksum: bool = True) -> str | None:
    """None if the file matches `info` (exists, bytes, sha256, Parquet row count) and so does
    the head_responses file its metadata names, if any; else why not."""
    check = _check_object if storage.is_object_store(info.path) else _check_file
    reason, meta = check(info, checksum)
    if reason:
        return reason
    heads = head_shard(info.path, meta)
    if heads is not None:
        reason = verify_shard(heads, checksum=checksum)
        if reason:
            return f"head_responses file {_name(heads.path)}: {reason}"
    return None


def _check_file(info: ShardInfo, checksum: bool) -> tuple[str | None, dict[bytes, bytes]]:
    path = Path(info.path)
    if not path.is_file():
        return "missing", {}
    size = path.stat().st_size
    if size != info.bytes:
        return f"size {size} != recorded {info.bytes}", {}
    digest = sha256_file(path) if checksum else info.sha256
    if digest != info.sha256:
        return f"sha256 {digest[:12]}... != recorded {info.sha256[:12]}...", {}
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        return f"unreadable Parquet: {exc}", {}
    return _check_rows(pf, info)


def _check_object(info: ShardInfo, checksum: bool) -> tuple[str | None, dict[bytes, bytes]]:
    fs, path = storage.resolve(info.path)
    try:
        found = fs.get_file_info(path)
        if found.type == pafs.FileType.NotFound:
            return "missing", {}
        if found.size != info.bytes:
            return f"size {found.size} != recorded {info.bytes}", {}
        if checksum:
            with fs.open_input_stream(path) as f:
                data = f.read()
            digest = hashlib.sha256(data).hexdigest()
            if digest != info.sha256:
                return f"sha256 {digest[:12]}... != recorded {info.sha256[:12]}...", {}
            source = pa.BufferReader(data)
        else:
            source = fs.open_input_file(path)
        pf = pq.ParquetFile(source)
    except pa.ArrowInvalid as exc:
        return f"unreadable Parquet: {exc}", {}
    except OSError as exc:
        raise StorageError(f"{info.path}: {storage.reason(exc)}") from None
    return _check_rows(pf, info)


def _check_rows(pf: pq.ParquetFile, info: ShardInfo) -> tuple[str | None, dict[bytes, bytes]]:
    rows = pf.metadata.num_rows
    if rows != info.rows:
        return f"rows {rows} != recorded {info.rows}", {}
    return None, pf.schema_arrow.metadata or {}


def shard_files(output_dir: str | os.PathLike[str], sweep: str) -> list[Path] | list[str]:
    """Every file under the sweep's shard folder or prefix (shards, head_responses files,
    temporaries, anything else): Paths for a local folder, URIs for an object store."""
    if storage.is_object_store(output_dir):
        prefix = sweep_shard_uri(str(output_dir), sweep)
        fs, path = storage.resolve(prefix)
        try:
            found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
        except OSError as exc:
            raise StorageError(f"listing {prefix} failed: {storage.reason(exc)}") from None
        return sorted(storage.join(prefix, f.path[len(path):]) for f in found
                      if f.type == pafs.FileType.File)
    root = sweep_shard_dir(output_dir, sweep)
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file())


def remove_file(path: str | os.PathLike[str]) -> None:
    """Delete one shard-folder file or object (already gone is fine)."""
    if not storage.is_object_store(path):
        Path(path).unlink(missing_ok=True)
        return
    fs, fs_path = storage.resolve(str(path))
    try:
        fs.delete_file(fs_path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StorageError(f"deleting {path} failed: {storage.reason(exc)}") from None


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


# (path, size, version, sha256) of shards this process already hashed.
_VERIFIED: set[tuple[str, int, int, str]] = set()


class _VerifiedCache:
    """Shards already hashed, by (path, size, version, recorded sha256), kept across runs in
    a small SQLite file in the user's cache folder (XDG_CACHE_HOME, else ~/.cache).

    The version is what stat_shard says changes with the bytes (a local file's mtime_ns, an
    object's ETag), mixed with the head_responses file's when the shard has one; the column
    keeps its first name, mtime_ns. A file rewritten in place gets a new version or size and
    is hashed again; bit rot under an unchanged mtime is what the full `unisweep verify` is
    for. The cache is an optimisation only: when it cannot be opened or written, every shard
    is hashed.
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


def stat_shard(path: str | os.PathLike[str]) -> tuple[int, int | None] | None:
    """(size, version) of a shard, local or in an object store; None when it is missing.

    The version changes whenever the bytes do: a local file's mtime_ns; an object's ETag
    (as a 56-bit integer), since an object's mtime has whole seconds only and a rewrite in
    the same second would keep it. None when the store gives no ETag (never cached then).
    """
    if not storage.is_object_store(path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns
    fs, fs_path = storage.resolve(str(path))
    try:
        with fs.open_input_file(fs_path) as f:  # one HEAD request: size and ETag
            size, etag = f.size(), (f.metadata() or {}).get("ETag")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"{path}: {storage.reason(exc)}") from None
    if not etag:
        return size, None
    return size, int.from_bytes(hashlib.sha256(etag).digest()[:7], "big")


def _cache_key(info: ShardInfo, st: tuple[int, int | None]) -> tuple[str, int, int, str] | None:
    """The _VerifiedCache key of a shard as it is now, or None when it cannot be cached.

    A shard with a head_responses file mixes that file's (size, version) into the version,
    so that a changed or deleted head file is hashed again too; a shard without one keeps
    its own version (its key never changed when head files came)."""
    version = st[1]
    if version is None:
        return None
    hst = stat_shard(heads_path(info.path))
    if hst is not None:
        if hst[1] is None:
            return None
        mix = hashlib.sha256(f"{version}:{hst[0]}:{hst[1]}".encode()).digest()[:7]
        version = int.from_bytes(mix, "big")
    return (info.path, st[0], version, info.sha256)


def check_shards(shards: list[ShardInfo]) -> list[ShardInfo]:
    """The shards, each checked against its recorded bytes and sha256 before any data is read
    (and its head_responses file, if any, against the shard's metadata).

    A shard seen before with the same (path, size, version) is not hashed again (see
    _VerifiedCache). Raises ShardMismatch naming the missing or changed shards.
    """
    cache = _VerifiedCache()
    problems: list[tuple[str, str]] = []
    fresh: list[tuple[str, int, int, str]] = []
    try:
        for info in shards:
            st = stat_shard(info.path)
            if st is None:
                problems.append((info.path, "missing"))
                continue
            key = _cache_key(info, st)
            if key is not None and st[0] == info.bytes and cache.has(key):
                continue
            reason = verify_shard(info)
            if reason:
                problems.append((info.path, reason))
            elif key is not None:
                fresh.append(key)
        cache.add(fresh)
    finally:
        cache.close()
    if problems:
        raise ShardMismatch(problems, len(shards))
    return shards
