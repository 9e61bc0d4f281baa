"""Model metadata for spec validation and unit keys: tasks.models.model_info behind a cache.

Config or GGUF header only, no weights; errors name the spec's `models` field.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from tasks.errors import InvalidInput
from tasks.model_catalog import ModelInfo, model_info

# The orchestrator's name for what it knows about a model before any compute.
ModelMeta = ModelInfo
MetaFn = Callable[[str], ModelMeta]
_ALLOWED = "a known alias, hub name, local folder, .gguf file, tiny:<family> or shape:<name>"


@functools.lru_cache(maxsize=64)
def model_meta(name: str) -> ModelMeta:
    """Metadata of the model `name`; InvalidInput naming `models` when it is unknown or unreadable."""
    try:
        return model_info(name)
    except InvalidInput as exc:
        raise InvalidInput("models", _ALLOWED, got=name, detail=str(exc)) from None
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInput("models", _ALLOWED, got=name, detail=f"{type(exc).__name__}: {exc}") from None
