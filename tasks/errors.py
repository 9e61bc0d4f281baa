"""Errors a user can cause, with messages that name the field and what is allowed.

Every package raises these for bad input; the CLI prints them without a traceback.
"""

from __future__ import annotations

import errno
from typing import Any

# A value quoted in a message is cut to this many characters: a hostile input (a YAML alias
# bomb expands 600 bytes into millions of items) must not become a megabyte error line.
MAX_QUOTED = 200


def quoted(value: Any, limit: int = MAX_QUOTED) -> str:
    """repr(value), cut to `limit` characters with the full length said, built lazily.

    Containers are summarised before repr so a huge nested value costs no time either.
    """
    if isinstance(value, (list, tuple, dict, set)) and _size_over(value, limit):
        return f"<{type(value).__name__} of {len(value)} items, too large to show>"
    text = repr(value)
    if len(text) > limit:
        return f"{text[:limit]}... ({len(text)} characters)"
    return text


def _size_over(value: Any, limit: int) -> bool:
    # Count items breadth-first and stop at `limit`: bounded work whatever the nesting.
    todo, seen = [value], 0
    while todo:
        v = todo.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, (list, tuple, set)):
            seen += len(v)
            if seen > limit:
                return True
            todo.extend(x for x in v if isinstance(x, (list, tuple, dict, set)))
    return False


class UnisweepError(Exception):
    """Base of every error the user can cause (bad input, unreachable database, ...)."""


# errno values that say the machine is in a bad state (disk full or read-only, no permission,
# quota, I/O error), not that the unit's input is bad: fixing the machine makes it work.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                errno.EPERM, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE})


def is_environment_error(exc: BaseException) -> bool:
    """True when `exc` (or what it was raised from) is an OSError of ENVIRONMENT_ERRNOS."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
            return True
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class InvalidInput(UnisweepError, ValueError):
    """A named argument or spec field has a value outside what is allowed."""

    def __init__(self, field: str, allowed: str, got: Any = None, *, detail: str = "") -> None:
        self.field = field
        self.allowed = allowed
        self.got = got
        msg = f"invalid {field}: got {quoted(got)}; allowed: {allowed}"
        if detail:
            msg += f" ({_cut(detail)})"
        super().__init__(msg)


def _cut(text: str, limit: int = 4 * MAX_QUOTED) -> str:
    # One line (a parser's caret diagram spans three) and a bounded length.
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
