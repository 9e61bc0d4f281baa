"""Model metadata for spec validation and unit keys (depth, width, context, identity), no compute.

An adapter over tasks.models: uses its `model_info(name)` (config only) when it exists, else
loads the model once on the CPU and reads the same fields from the LoadedModel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.errors import InvalidInput, UnisweepError


@dataclass(frozen=True)
class ModelMeta:
    """What the orchestrator needs to know about a model before any compute."""

    name: str  # as written in the spec
    model_id: str  # short stable id (alias or name), the shards' `model` column
    n_layers: int
    d_model: int
    max_positions: int
    identity: dict[str, Any] = field(default_factory=dict)  # goes into unit keys


MetaFn = Callable[[str], ModelMeta]


def _get(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def _from_info(name: str, info: Any) -> ModelMeta:
    identity = dict(_get(info, "identity"))
    identity.pop("dtype", None)  # the dtype is a key field of its own
    return ModelMeta(
        name=name,
        model_id=str(_get(info, "model_id")),
        n_layers=int(_get(info, "n_layers")),
        d_model=int(_get(info, "d_model")),
        max_positions=int(_get(info, "max_positions")),
        identity=identity,
    )


@functools.lru_cache(maxsize=64)
def model_meta(name: str) -> ModelMeta:
    """Metadata of the model `name` (alias, hub name, folder, .gguf, tiny:*).

    Raises InvalidInput naming `models` when the model is unknown or cannot be read.
    """
    try:
        import tasks.models as tm
    except ImportError as exc:  # the engine is not installed: nothing can run anyway
        raise UnisweepError(f"tasks.models is not available: {exc}") from exc
    try:
        info_fn = getattr(tm, "model_info", None)
        if info_fn is not None:
            return _from_info(name, info_fn(name))
        # No config-only reader yet: load once on the CPU, without the start-up check (and
        # without transformers' weight-loading bar in the driver's output).
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        return _from_info(name, tm.load_model(name, dtype="float32", device="cpu", check=False))
    except InvalidInput as exc:
        raise InvalidInput("models", "a known alias, hub name, local folder, .gguf file or "
                           "tiny:<family>", got=name, detail=str(exc)) from None
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInput("models", "a known alias, hub name, local folder, .gguf file or "
                           "tiny:<family>", got=name, detail=f"{type(exc).__name__}: {exc}") from None


def load_directions_file(path: str, d_model: int | None = None, count: int | None = None) -> np.ndarray:
    """Explicit directions: a .npy array [count, d_model] of unit rows, checked before use."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidInput("directions.file", "a readable .npy file of unit vectors [count, d_model]",
                           got=path, detail=str(exc)) from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise InvalidInput("directions.file", "a float array of shape [count, d_model]", got=path,
                           detail=f"shape {arr.shape}, dtype {arr.dtype}")
    if d_model is not None and arr.shape[1] != d_model:
        raise InvalidInput("directions.file", f"rows of length d_model = {d_model}", got=path,
                           detail=f"shape {arr.shape}")
    if count is not None and arr.shape[0] != count:
        raise InvalidInput("directions.count", f"the number of rows of directions.file ({arr.shape[0]})",
                           got=count)
    norms = np.linalg.norm(arr.astype(np.float64), axis=1)
    if not np.all(np.abs(norms - 1.0) < 1e-4):
        raise InvalidInput("directions.file", "unit rows (|norm - 1| < 1e-4)", got=path,
                           detail=f"norms between {norms.min():.6g} and {norms.max():.6g}")
    return arr.astype(np.float64)
