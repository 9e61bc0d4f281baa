"""Perturbation directions: seeded random unit vectors, or explicit ones from a .npy file.

Direction k of a seed is the same vector whatever the count, so widening a sweep adds
directions without changing the old ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tasks.errors import InvalidInput


def random_directions(d_model: int, count: int, seed: int = 0, start: int = 0) -> torch.Tensor:
    """Gaussian directions normalised to unit length, float64 [count, d_model]."""
    if not isinstance(count, int) or count < 1:
        raise InvalidInput("directions.count", "an integer >= 1", count)
    rows = [np.random.default_rng([seed, 7919, k]).standard_normal(d_model)
            for k in range(start, start + count)]
    vecs = torch.from_numpy(np.stack(rows))
    return vecs / vecs.norm(dim=1, keepdim=True)


def load_directions(path: str | Path, d_model: int) -> torch.Tensor:
    """Explicit directions from a .npy file [D, d_model]; rows are normalised to unit length."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInput("directions.file", "an existing .npy file", str(path))
    arr = np.load(p)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != d_model:
        raise InvalidInput("directions.file", f"an array of shape [D, {d_model}]", arr.shape)
    vecs = torch.from_numpy(arr.astype(np.float64))
    norms = vecs.norm(dim=1, keepdim=True)
    if not torch.isfinite(vecs).all() or (norms == 0).any():
        raise InvalidInput("directions.file", "finite, non-zero vectors", str(path))
    return vecs / norms
