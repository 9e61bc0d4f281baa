"""The metadata of a GGUF file, read from its header without touching the tensors.

gguf.GGUFReader maps and indexes every tensor and token first (about 10 s for SmolLM2-135M on
a loaded 2-core machine); planning needs four numbers, so this reads the key/value section
only, skipping arrays. Value types and the magic number are the gguf package's.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from gguf import GGUF_MAGIC, GGUFValueType

from tasks.errors import InvalidInput

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


class ArrayLength(int):
    """An array value that was skipped, not read: only its length is kept."""


def _read(fh: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = fh.read(size)
    if len(data) != size:
        raise EOFError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _string(fh: BinaryIO) -> str:
    n = _read(fh, "<Q")
    return fh.read(n).decode("utf-8", errors="replace")


def _value(fh: BinaryIO, vtype: int) -> Any:
    vtype = GGUFValueType(vtype)
    if vtype == GGUFValueType.STRING:
        return _string(fh)
    if vtype == GGUFValueType.ARRAY:
        item = GGUFValueType(_read(fh, "<I"))
        count = _read(fh, "<Q")
        if item in _SCALAR:
            fh.seek(count * struct.calcsize(_SCALAR[item]), 1)
        else:  # strings (the vocabulary) or nested arrays: skip item by item
            for _ in range(count):
                _value(fh, item)
        return ArrayLength(count)
    return _read(fh, _SCALAR[vtype])


def read_header(path: str | Path) -> dict[str, Any]:
    """Key -> value of the GGUF metadata; arrays (vocabulary, merges) as their ArrayLength."""
    found: dict[str, Any] = {}
    try:
        with open(path, "rb") as fh:
            if _read(fh, "<I") != GGUF_MAGIC:
                raise InvalidInput("model", "a GGUF file (magic 'GGUF')", str(path))
            _read(fh, "<I")  # version
            _read(fh, "<Q")  # tensor count
            for _ in range(_read(fh, "<Q")):
                key = _string(fh)
                found[key] = _value(fh, _read(fh, "<I"))
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise InvalidInput("model", "a readable GGUF file", str(path),
                           detail=f"{type(exc).__name__}: {exc}") from None
    return found
