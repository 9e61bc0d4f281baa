"""Perturbation directions: seeded random unit vectors, or explicit unit rows of a .npy file.

Direction k of a seed is the same vector whatever the count, so widening a sweep adds
directions without changing the old ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tasks.errors import InvalidInput, UnisweepError
from tasks.work import UnitWork, file_sha256

# How far from 1 the norm of an explicit direction may be (float32 files round at ~1e-7).
UNIT_TOLERANCE = 1e-4


def random_directions(d_model: int, count: int, seed: int = 0, start: int = 0) -> torch.Tensor:
    """Gaussian directions normalised to unit length, float64 [count, d_model]."""
    if not isinstance(count, int) or count < 1:
        raise InvalidInput("directions.count", "an integer >= 1", count)
    rows = [np.random.default_rng([seed, 7919, k]).standard_normal(d_model)
            for k in range(start, start + count)]
    vecs = torch.from_numpy(np.stack(rows))
    return vecs / vecs.norm(dim=1, keepdim=True)


def load_directions(path: str | Path, d_model: int, count: int | None = None) -> torch.Tensor:
    """Explicit directions from a .npy file [count, d_model], float64.

    The one rule: every row must have unit length within UNIT_TOLERANCE, else the file is
    refused (a row of another length is a mistake, not a direction); accepted rows are then
    renormalised to unit length exactly.
    """
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
    vecs = torch.from_numpy(arr.astype(np.float64))
    norms = vecs.norm(dim=1)
    bad = ~(torch.isfinite(norms) & ((norms - 1.0).abs() < UNIT_TOLERANCE))
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise InvalidInput("directions.file", f"unit rows (|norm - 1| < {UNIT_TOLERANCE:g})", got=str(path),
                           detail=f"row {row} has norm {float(norms[row]):.6g}")
    return vecs / norms[:, None]


def unit_directions(work: UnitWork, d_model: int) -> torch.Tensor:
    """The directions of one unit: seeded random ones, or the sweep's file (unchanged since
    it was planned: its sha256 is part of the unit key)."""
    d = work.directions
    if d.family != "file":
        return random_directions(d_model, count=d.count, seed=d.seed or 0)
    path = work.run.directions_file
    if path is None:
        raise UnisweepError("directions.family 'file' needs directions.file")
    digest = file_sha256(path, "directions.file")
    if digest != d.sha256:
        raise UnisweepError(f"directions file {path} changed since the sweep was planned "
                            f"(sha256 {digest[:12]} != {str(d.sha256)[:12]})")
    return load_directions(path, d_model, d.count)
