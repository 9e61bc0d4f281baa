"""Where shards live: a local folder, or an object store URI (s3://, gs://, abfs://) via pyarrow.fs.

Endpoints and credentials come only from the standard places (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, instance roles; GOOGLE_* and AZURE_* for
the others), never from the URL, so the `output` a sweep records holds no secret.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from tasks.errors import InvalidInput, UnisweepError

# Object stores pyarrow.fs opens from a URI; "file://" and plain paths are local folders.
OBJECT_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss")
ALLOWED = ("a local folder, or s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] or "
           "abfs://CONTAINER@ACCOUNT.dfs.core.windows.net[/PREFIX]")
CREDENTIALS_HELP = ("credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
                    "or an instance role; a custom endpoint from AWS_ENDPOINT_URL")


class StorageError(UnisweepError):
    """An object store refused or failed a request (network, permissions, missing object)."""


def is_object_store(location: str | os.PathLike[str] | None) -> bool:
    """True for an object store URI (s3://, gs://, abfs://...), False for a local path."""
    if location is None or isinstance(location, Path):
        return False
    scheme = urlsplit(str(location)).scheme.lower()
    return "://" in str(location) and scheme in OBJECT_SCHEMES


def check_output(value: str, field: str = "output") -> str:
    """Offline check of an `output`: a local path, or an object store URI with a bucket.

    Refuses credentials in the URL (user:password@) and query strings, so that what the
    database and the spec copy record can never carry a secret. Returns the URI without a
    trailing slash (a file:// URL becomes its plain path).
    """
    text = str(value)
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError as exc:
        raise InvalidInput(field, ALLOWED, _masked(text), detail=str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        return parts.path  # a local folder spelled as a URL
    if scheme not in OBJECT_SCHEMES:
        raise InvalidInput(field, ALLOWED, _masked(text), detail=f"unsupported scheme {scheme!r}")
    if password is not None:
        raise InvalidInput(field, ALLOWED, _masked(text),
                           detail=f"credentials in the URL are refused: {CREDENTIALS_HELP}")
    if parts.query or parts.fragment:
        raise InvalidInput(field, ALLOWED, _masked(text),
                           detail="no ?options in the URL: the endpoint comes from AWS_ENDPOINT_URL")
    bucket = parts.username if scheme in ("abfs", "abfss") else parts.hostname
    if not bucket:
        raise InvalidInput(field, ALLOWED, text, detail="no bucket")
    return text.rstrip("/")


def _masked(text: str) -> str:
    return re.sub(r"(://[^:/@\s]*):[^@\s]*@", r"\1:***@", text)


# One filesystem per (scheme, bucket/account): creating an S3 client costs milliseconds and
# every shard read or write would otherwise pay it.
_FS_CACHE: dict[tuple[str, str], tuple[pafs.FileSystem, str]] = {}
_FS_LOCK = threading.Lock()


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it of an object store URI (cached per bucket)."""
    parts = urlsplit(uri)
    key = (parts.scheme.lower(), parts.netloc)
    with _FS_LOCK:
        hit = _FS_CACHE.get(key)
    if hit is None:
        try:
            fs, root = pafs.FileSystem.from_uri(f"{key[0]}://{key[1]}/")
        except (OSError, ValueError, TypeError) as exc:
            raise StorageError(f"{uri}: cannot open the object store: {reason(exc)}") from None
        hit = (fs, root.rstrip("/"))
        with _FS_LOCK:
            _FS_CACHE[key] = hit
    fs, root = hit
    return fs, f"{root}/{parts.path.strip('/')}".rstrip("/")


def join(uri: str, *parts: str) -> str:
    """`uri` with path parts appended (object store URIs and local paths alike)."""
    if is_object_store(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri).joinpath(*parts))


def forget_filesystems() -> None:
    """Drop cached clients (tests that change AWS_* variables between cases)."""
    with _FS_LOCK:
        _FS_CACHE.clear()


# What the AWS SDK's error text means for a user, most specific first.
_REASONS = (
    ("NO_SUCH_BUCKET", "no such bucket"),
    ("NoSuchBucket", "no such bucket"),
    ("INVALID_ACCESS_KEY_ID", f"the access key is not known to the store ({CREDENTIALS_HELP})"),
    ("SIGNATURE_DOES_NOT_MATCH", f"the secret key does not match ({CREDENTIALS_HELP})"),
    ("SignatureDoesNotMatch", f"the secret key does not match ({CREDENTIALS_HELP})"),
    ("ACCESS_DENIED", f"access denied: missing or wrong credentials ({CREDENTIALS_HELP})"),
    ("AccessDenied", f"access denied: missing or wrong credentials ({CREDENTIALS_HELP})"),
    ("NETWORK_CONNECTION", "cannot reach the store's endpoint (AWS_ENDPOINT_URL, network)"),
    ("Could not resolve host", "cannot resolve the store's host (AWS_ENDPOINT_URL, network)"),
)


def reason(exc: BaseException) -> str:
    """One short line saying why an object store request failed (no secrets in it)."""
    text = str(exc)
    for needle, why in _REASONS:
        if needle in text:
            return why
    return text.splitlines()[0][:300] if text else type(exc).__name__


def preflight(output: str, field: str = "output") -> None:
    """Check, before any unit is leased, that an object store `output` is usable; writes nothing.

    Lists the prefix (needs the bucket, the endpoint and credentials allowed to list); a
    local folder needs no check here (it is created on the first write).
    """
    uri = check_output(output, field)
    if not is_object_store(uri):
        return
    try:
        fs, path = resolve(uri)
        bucket = path.split("/", 1)[0]
        info = fs.get_file_info(bucket)
        if info.type == pafs.FileType.NotFound:
            raise InvalidInput(field, "an existing bucket the credentials can list", uri,
                               detail="no such bucket")
        fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except StorageError as exc:
        raise InvalidInput(field, "a reachable object store", uri, detail=str(exc)) from None
    except OSError as exc:
        raise InvalidInput(field, "an existing bucket the credentials can list", uri,
                           detail=reason(exc)) from None
