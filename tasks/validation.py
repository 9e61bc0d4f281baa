"""Checks of an engine grid against the model, before any compute; and the grid's batching.

Every failure names the argument and what is allowed (tasks.errors.InvalidInput).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from tasks.errors import InvalidInput


@dataclass
class Grid:
    prompts: list
    lps: list[int]
    positions: list[int]
    eps: torch.Tensor  # float64 [E]
    directions: torch.Tensor  # float64 [D, d]
    record_layers: frozenset[int] | None
    record_positions: frozenset[int] | None
    max_rows: int | None  # rows per pass; set from the memory budget before planning
    n_layers: int

    def prompt_groups(self) -> Iterator[list]:
        """Prompts of equal length, in groups small enough that G x (1 + cells) fits max_rows."""
        cells = len(self.eps) * len(self.directions)
        size = max(1, self.max_rows // (1 + cells))
        by_len: dict[int, list] = {}
        for p in self.prompts:
            by_len.setdefault(p.n, []).append(p)
        for same in by_len.values():
            for k in range(0, len(same), size):
                yield same[k:k + size]

    def cell_chunks(self, groups: int) -> Iterator[tuple[slice, slice]]:
        """(eps slice, direction slice) chunks so that groups x (1 + chunk cells) <= max_rows."""
        E, D = len(self.eps), len(self.directions)
        budget = max(1, self.max_rows // groups - 1)  # cells per pass beside the baseline
        if D <= budget:
            step = max(1, budget // D)
            for e0 in range(0, E, step):
                yield slice(e0, min(E, e0 + step)), slice(0, D)
        else:
            for e0 in range(E):
                for d0 in range(0, D, budget):
                    yield slice(e0, e0 + 1), slice(d0, min(D, d0 + budget))

    def direction_chunks(self, groups: int) -> Iterator[slice]:
        D = len(self.directions)
        step = max(1, self.max_rows // groups)
        for d0 in range(0, D, step):
            yield slice(d0, min(D, d0 + step))


def _int_list(name: str, values, lo: int, hi: int, what: str) -> list[int]:
    if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise InvalidInput(name, f"a non-empty list of integers in [{lo}, {hi}] ({what})", values)
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise InvalidInput(name, f"integers in [{lo}, {hi}] ({what})", v)
        out.append(int(v))
    if not out:
        raise InvalidInput(name, f"a non-empty list of integers in [{lo}, {hi}] ({what})", values)
    return sorted(set(out))


def check_grid(lm, prompts: Sequence, lps, positions, eps, directions, record_layers,
               record_positions, max_rows: int | None, memory_budget: int | None = None) -> Grid:
    L = lm.n_layers
    if not prompts:
        raise InvalidInput("prompts", "a non-empty list of prompts", prompts)
    n_min = min(p.n for p in prompts)
    for p in prompts:
        if p.n > lm.max_positions:
            raise InvalidInput("prompts", f"prompts of at most {lm.max_positions} tokens "
                               "(the model's context)", p.n)
    lps_ = _int_list("layer", lps, 0, L - 1, f"the model has {L} blocks")
    pos_ = _int_list("position", positions, 0, n_min - 1, f"the prompt has {n_min} tokens")
    try:
        eps_t = torch.as_tensor(list(eps), dtype=torch.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInput("eps", "a non-empty list of finite numbers > 0", eps) from exc
    if eps_t.numel() == 0 or eps_t.ndim != 1:
        raise InvalidInput("eps", "a non-empty list of finite numbers > 0", list(eps))
    bad = [float(e) for e in eps_t if not (math.isfinite(float(e)) and float(e) > 0)]
    if bad:
        raise InvalidInput("eps", "finite numbers > 0", bad[0])
    dirs = torch.as_tensor(directions, dtype=torch.float64)
    if dirs.ndim != 2 or dirs.shape[1] != lm.d_model or dirs.shape[0] == 0:
        raise InvalidInput("directions", f"a [D, {lm.d_model}] array of unit vectors",
                           tuple(dirs.shape))
    if not torch.allclose(dirs.norm(dim=1), torch.ones(dirs.shape[0], dtype=torch.float64),
                          atol=1e-6):
        raise InvalidInput("directions", "unit-norm rows", "rows with norm != 1")
    rec_l = None if record_layers is None else frozenset(
        _int_list("record_layers", record_layers, 0, L, f"levels 0..{L}"))
    rec_i = None if record_positions is None else frozenset(
        _int_list("record_positions", record_positions, 0, n_min - 1, "prompt positions"))
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int)
                                 or max_rows < 2):
        raise InvalidInput("max_rows", "an integer >= 2", max_rows)
    if memory_budget is not None and (isinstance(memory_budget, bool)
                                      or not isinstance(memory_budget, int) or memory_budget < 1):
        raise InvalidInput("memory_budget", "a positive number of bytes", memory_budget)
    return Grid(list(prompts), lps_, pos_, eps_t, dirs, rec_l, rec_i, max_rows, L)
