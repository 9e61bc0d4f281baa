"""Seeded prompts: repeated random tokens `BOS + s + s` and controls `BOS + s + s'`.

Token ids depend only on (token space, T, seed, prompt id), never on the machine:
numpy's PCG64 stream is platform independent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tasks.errors import InvalidInput
from tasks.models import TokenSpace

KINDS = ("repeat", "control")


@dataclass(frozen=True)
class Prompt:
    """One prompt of a sweep. `id` pairs a repeat prompt with its control (same first copy)."""

    id: int
    kind: str  # repeat | control | text
    seed: int
    T: int
    input_ids: torch.Tensor  # int64 [n]

    @property
    def n(self) -> int:
        return int(self.input_ids.shape[0])


def _draw(pool: np.ndarray, seed: int, prompt_id: int, stream: int, T: int) -> np.ndarray:
    rng = np.random.default_rng([seed, prompt_id, stream])
    return pool[rng.integers(0, len(pool), size=T)]


def make_prompts(space: TokenSpace, T: int, count: int = 1, seed: int = 0,
                 kinds: Sequence[str] = KINDS, max_positions: int | None = None) -> list[Prompt]:
    """`count` prompt pairs: for each id, a repeat prompt and/or a control with the same copy 1."""
    if not isinstance(T, int) or T < 2:
        raise InvalidInput("T", "an integer >= 2", T)
    if max_positions is not None and 2 * T + 1 > max_positions:
        raise InvalidInput("T", f"at most {(max_positions - 1) // 2} for this model "
                           f"(prompt length 2T+1 must fit its context of {max_positions})", T)
    if not isinstance(count, int) or count < 1:
        raise InvalidInput("count", "an integer >= 1", count)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise InvalidInput("kinds", f"a non-empty subset of {KINDS}", list(kinds))
    pool = np.asarray(space.ordinary_ids(), dtype=np.int64)
    if len(pool) < 2:
        raise InvalidInput("tokenizer", "a vocabulary with at least 2 ordinary tokens", len(pool))
    bos = [space.bos_token_id] if space.bos_token_id is not None else []
    prompts = []
    for pid in range(count):
        s = _draw(pool, seed, pid, 0, T)
        for kind in kinds:
            second = s if kind == "repeat" else _draw(pool, seed, pid, 1, T)
            ids = np.concatenate([np.asarray(bos, dtype=np.int64), s, second])
            prompts.append(Prompt(pid, kind, seed, T, torch.from_numpy(ids)))
    return prompts


def text_prompt(tokenizer, text: str, prompt_id: int = 0) -> Prompt:
    """A real-text prompt (tokenised with BOS); T is half its length, for offset bookkeeping."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.shape[0] < 2:
        raise InvalidInput("text", "a text of at least 2 tokens", text[:40])
    return Prompt(prompt_id, "text", 0, (int(ids.shape[0]) - 1) // 2, ids.to(torch.int64))
