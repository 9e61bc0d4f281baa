"""Perturbation directions: seeded random unit vectors, or explicit unit rows of a .npy file.

Direction k of a seed is the same vector whatever the count, so widening a sweep adds
directions without changing the old ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tasks.direction_file import read_direction_file
from tasks.errors import InvalidInput, UnisweepError
from tasks.work import UnitWork, file_sha256


def random_directions(d_model: int, count: int, seed: int = 0, start: int = 0) -> torch.Tensor:
    """Gaussian directions normalised to unit length, float64 [count, d_model]."""
    if not isinstance(count, int) or count < 1:
        raise InvalidInput("directions.count", "an integer >= 1", count)
    rows = [np.random.default_rng([seed, 7919, k]).standard_normal(d_model)
            for k in range(start, start + count)]
    vecs = torch.from_numpy(np.stack(rows))
    return vecs / vecs.norm(dim=1, keepdim=True)


def load_directions(path: str | Path, d_model: int, count: int | None = None) -> torch.Tensor:
    """Explicit directions from a .npy file [count, d_model], float64, under the one rule of
    tasks.direction_file (unit rows within its tolerance, renormalised exactly)."""
    return torch.from_numpy(read_direction_file(path, d_model, count))


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
