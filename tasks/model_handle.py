"""The model handle types: LoadedModel (what the engine computes on), TokenSpace, the dtypes.

Every part of tasks/ that uses a loaded model (engine, prompts, shapes, check) imports these
from here; tasks.models (loading, identity, model_info) builds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tasks.adapters import Adapter
from tasks.errors import InvalidInput

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    # float64 exists for exactness tests against the naive reference.
    "float64": torch.float64,
}


@dataclass(frozen=True)
class TokenSpace:
    """What prompt generation needs from a tokenizer: the vocabulary and its special ids."""

    vocab_size: int
    bos_token_id: int | None
    special_ids: frozenset[int]

    def ordinary_ids(self) -> list[int]:
        return [t for t in range(self.vocab_size) if t not in self.special_ids]


@dataclass
class LoadedModel:
    """An HF causal LM ready for the engine, with what the engine and keys need to know."""

    model: Any
    tokenizer: Any | None
    token_space: TokenSpace
    adapter: Adapter
    model_id: str
    identity: dict[str, str]
    dtype_name: str
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.model)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size")
                   else self.model.config.n_embd)

    @property
    def max_positions(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or cfg.n_positions)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise InvalidInput("dtype", ", ".join(DTYPES), dtype)
    return DTYPES[dtype]


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInput("device", "cpu, cuda, cuda:N", device) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device", "cpu (no CUDA device is visible here)", device)
    if dev.type not in ("cpu", "cuda"):
        raise InvalidInput("device", "cpu, cuda, cuda:N", device)
    return dev
