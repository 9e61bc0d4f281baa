"""The one rule for explicit direction files: a .npy array [count, d_model] of unit rows.

A row whose norm is off 1 by more than UNIT_TOLERANCE is refused (a row of another length is
a mistake, not a direction); accepted rows are renormalised to unit length exactly. numpy
only, so that planning checks a file without importing torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.errors import InvalidInput

# How far from 1 the norm of an explicit direction may be (float32 files round at ~1e-7).
UNIT_TOLERANCE = 1e-4


def read_direction_file(path: str | Path, d_model: int, count: int | None = None) -> np.ndarray:
    """The rows of a direction file, float64 [count, d_model], checked and renormalised."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidInput("directions.file", "a readable .npy file of unit vectors [count, d_model]",
                           got=str(path), detail=str(exc)) from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise InvalidInput("directions.file", "a float array of shape [count, d_model]", got=str(path),
                           detail=f"shape {arr.shape}, dtype {arr.dtype}")
    if arr.shape[1] != d_model:
        raise InvalidInput("directions.file", f"rows of length d_model = {d_model}", got=str(path),
                           detail=f"shape {arr.shape}")
    if count is not None and arr.shape[0] != count:
        raise InvalidInput("directions.count", f"the number of rows of directions.file ({arr.shape[0]})",
                           got=count)
    vecs = arr.astype(np.float64)
    norms = np.linalg.norm(vecs, axis=1)
    bad = ~(np.isfinite(norms) & (np.abs(norms - 1.0) < UNIT_TOLERANCE))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InvalidInput("directions.file", f"unit rows (|norm - 1| < {UNIT_TOLERANCE:g})", got=str(path),
                           detail=f"row {row} has norm {norms[row]:.6g}")
    return vecs / norms[:, None]
