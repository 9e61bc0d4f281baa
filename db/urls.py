"""Database URLs: where the database is (flag, env, run folder), checking and masking them.

Every message that names a URL goes through `mask_url`, so a password never reaches a log.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from tasks.errors import InvalidInput

ENV_VAR = "UNISWEEP_DB"
DEFAULT_OUT = "runs"
DB_FILENAME = "unisweep.db"
ALLOWED = "sqlite:///PATH/unisweep.db or postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"

# user:password@ in anything that looks like a URL, for strings SQLAlchemy cannot parse.
_CRED_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]*)@")


def mask_url(url: str | URL | None) -> str:
    """The URL with its password replaced by ***, safe for any log line or error message."""
    if url is None:
        return "<none>"
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # unparsable: mask by pattern so a typo'd URL still hides its secret
        return _CRED_RE.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(url))


def scrub(text: str, url: str | URL | None) -> str:
    """Remove the URL's password (and the raw URL) from a driver's message."""
    text = _CRED_RE.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    try:
        password = make_url(url).password if url is not None else None
    except Exception:
        password = None
    if password and len(password) >= 3:
        text = text.replace(str(password), "***")
    return text


def default_url(output_dir: str | os.PathLike[str]) -> str:
    """The embedded default: a SQLite file `unisweep.db` in the run folder."""
    return f"sqlite:///{Path(output_dir).expanduser().resolve() / DB_FILENAME}"


def resolve_url(db: str | None = None, out: str | os.PathLike[str] | None = None) -> str:
    """Where the database is: `--db`, else env UNISWEEP_DB, else `<out or runs/>/unisweep.db`."""
    if db:
        return db
    env = os.environ.get(ENV_VAR)
    if env:
        return env
    if out is not None and "://" in str(out):
        # Shards in a bucket: the database cannot sit beside them, so it must be named.
        raise InvalidInput("database", f"a database URL ({ALLOWED}) given by --db, the spec's "
                           f"`database` or env {ENV_VAR} when output is an object store", str(out))
    return default_url(out if out is not None else DEFAULT_OUT)


def normalize_url(url: str | URL) -> URL:
    """Parse and check a URL; plain `postgresql://` gets the psycopg 3 driver.

    Raises InvalidInput (field `db`, password masked) for anything but SQLite or PostgreSQL.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        # ValueError: a port that is not a number (SQLAlchemy's int() on it).
        raise InvalidInput("db", ALLOWED, mask_url(url), detail="not a database URL") from None
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise InvalidInput("db", ALLOWED, mask_url(parsed), detail="port must be 1..65535")
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        driver = parsed.get_driver_name()
        if driver in ("psycopg2", "postgresql") or "+" not in parsed.drivername:
            parsed = parsed.set(drivername="postgresql+psycopg")
        elif driver != "psycopg":
            raise InvalidInput("db", ALLOWED, mask_url(parsed), detail="use the psycopg (3) driver")
        if not parsed.database:
            raise InvalidInput("db", ALLOWED, mask_url(parsed), detail="no database name")
    elif backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            # An in-memory database is private to one process: useless as a queue of record.
            raise InvalidInput("db", ALLOWED, mask_url(parsed), detail="SQLite needs a file path")
    else:
        raise InvalidInput("db", ALLOWED, mask_url(parsed), detail=f"unsupported backend {backend!r}")
    return parsed
