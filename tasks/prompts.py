"""Prompts: seeded `BOS + s + s` (repeat) and `BOS + s + s'` (control), and text-file windows.

Token ids depend only on (token space, T, seed, prompt id), never on the machine:
numpy's PCG64 stream is platform independent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tasks.errors import InvalidInput, UnisweepError
from tasks.model_handle import LoadedModel, TokenSpace
from tasks.work import UnitWork

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


def text_window(lm: LoadedModel, path: str, T: int, prompt_id: int,
                sha256: str | None = None) -> Prompt:
    """Text prompt `prompt_id`: BOS + the prompt_id-th window of 2T tokens of a UTF-8 file.

    As long as the repeat/control prompts (2T+1 with BOS), so all kinds of a unit share
    batched passes. `sha256`: the file's digest when the sweep was planned (must not change).
    """
    if lm.tokenizer is None:
        raise UnisweepError(f"prompts.kinds: 'text' needs a model with a tokenizer; {lm.model_id} has none")
    with open(path, "rb") as fh:
        data = fh.read()
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise UnisweepError(f"prompts.text_file {path} changed since the sweep was planned")
    ids = lm.tokenizer(data.decode("utf-8"), add_special_tokens=False)["input_ids"]
    need = (prompt_id + 1) * 2 * T
    if len(ids) < need:
        raise UnisweepError(f"prompts.text_file: {len(ids)} tokens, prompt {prompt_id} needs {need} "
                            "(count x 2T)")
    bos = [lm.token_space.bos_token_id] if lm.token_space.bos_token_id is not None else []
    window = bos + list(ids[prompt_id * 2 * T:need])
    return Prompt(prompt_id, "text", 0, T, torch.tensor(window, dtype=torch.int64))


def unit_prompts(lm: LoadedModel, work: UnitWork) -> list[Prompt]:
    """The prompts of one unit: prompt `work.prompt.id` of each kind, in the unit's kind order."""
    p = work.prompt
    out = []
    kinds = tuple(k for k in p.kinds if k != "text")
    if kinds:
        # Prompt k is the same for any count > k (drawn from (seed, k)).
        prompts = make_prompts(lm.token_space, T=p.T, count=p.id + 1, seed=p.seed, kinds=kinds,
                               max_positions=lm.max_positions)
        out = [q for q in prompts if q.id == p.id]
    if "text" in p.kinds:
        if work.run.text_file is None:
            raise UnisweepError("prompts.kinds: 'text' needs prompts.text_file")
        out.append(text_window(lm, work.run.text_file, p.T, p.id, p.text_sha256))
    return out
