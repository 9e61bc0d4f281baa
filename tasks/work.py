"""The unit of work: a frozen, typed UnitWork (what one shard computes) and its key.

The planner builds UnitWork, the database stores `to_json()` as the unit's params, the
worker reads it back with `from_json()`. "Linear" has one encoding: the `linear` flag here
(eps values are the finite ones), eps NULL in the result rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tasks.errors import InvalidInput


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: the same bytes on every machine."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str, field: str) -> str:
    """sha256 of an input file (directions, text), InvalidInput naming `field` if unreadable."""
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError as exc:
        raise InvalidInput(field, "a readable file", got=path, detail=str(exc)) from None


def unit_key(params: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of a unit's params without its run-time hints."""
    return sha256_hex(canonical_json({k: v for k, v in params.items() if k != "run"}).encode())


def _ints(values: Any) -> tuple[int, ...] | None:
    return None if values is None else tuple(int(v) for v in values)


@dataclass(frozen=True)
class WorkPrompt:
    """Prompt `id` of the sweep's prompt set (kinds, T, seed; a text file by its sha256)."""

    kinds: tuple[str, ...]
    T: int
    seed: int
    id: int
    text_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kinds": list(self.kinds), "T": self.T, "seed": self.seed, "id": self.id}
        if self.text_sha256 is not None:
            d["text_sha256"] = self.text_sha256
        return d


@dataclass(frozen=True)
class WorkDirections:
    """The directions u: `random` (count, seed) or `file` (count, the file's sha256)."""

    family: str
    count: int
    seed: int | None = None
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.family == "file":
            return {"family": "file", "count": self.count, "sha256": self.sha256}
        return {"family": self.family, "count": self.count, "seed": self.seed}


@dataclass(frozen=True)
class RunHints:
    """Where the inputs are and what the model is called: never part of the key."""

    model: str  # the name to load (alias, path, hub name, tiny:*, shape:*)
    model_id: str  # the shards' `model` column
    n_layers: int
    directions_file: str | None = None
    text_file: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "model_id": self.model_id, "n_layers": self.n_layers,
                "directions_file": self.directions_file, "text_file": self.text_file}


@dataclass(frozen=True)
class UnitWork:
    """One unit: a model and dtype, one prompt id, one layer lp, some positions j, and the
    eps values (plus the linear response when `linear`) for every kind and direction."""

    method_version: str
    model: tuple[tuple[str, str], ...]  # the model's identity, sorted (name, revision/sha256...)
    dtype: str
    prompt: WorkPrompt
    directions: WorkDirections
    record_layers: tuple[int, ...] | None  # None: every level l >= lp
    record_positions: tuple[int, ...] | None  # None: every position i >= j
    lp: int
    positions: tuple[int, ...]
    eps: tuple[float, ...]  # finite eps values; the linear response is the flag below
    linear: bool
    run: RunHints

    def to_json(self) -> dict[str, Any]:
        """The params stored in the database; key() hashes all of it but `run`."""
        return {
            "method_version": self.method_version,
            "model": dict(self.model),
            "dtype": self.dtype,
            "prompt": self.prompt.to_json(),
            "directions": self.directions.to_json(),
            "record": {"layers": None if self.record_layers is None else list(self.record_layers),
                       "positions": None if self.record_positions is None else list(self.record_positions)},
            "lp": self.lp,
            "positions": list(self.positions),
            "eps": list(self.eps),
            "linear": self.linear,
            "run": self.run.to_json(),
        }

    @classmethod
    def from_json(cls, params: dict[str, Any]) -> UnitWork:
        """A unit's params as stored; InvalidInput naming the field when one is missing."""
        try:
            p, d, rec, run = params["prompt"], params["directions"], params["record"], params["run"]
            return cls(
                method_version=str(params["method_version"]),
                model=tuple(sorted((str(k), str(v)) for k, v in params["model"].items())),
                dtype=str(params["dtype"]),
                prompt=WorkPrompt(tuple(p["kinds"]), int(p["T"]), int(p["seed"]), int(p["id"]),
                                  p.get("text_sha256")),
                directions=WorkDirections(str(d["family"]), int(d["count"]), d.get("seed"),
                                          d.get("sha256")),
                record_layers=_ints(rec["layers"]),
                record_positions=_ints(rec["positions"]),
                lp=int(params["lp"]),
                positions=_ints(params["positions"]) or (),
                # float(): PostgreSQL's JSONB hands a large eps (1e30) back as an integer.
                eps=tuple(float(e) for e in params["eps"]),
                linear=bool(params["linear"]),
                run=RunHints(str(run["model"]), str(run["model_id"]), int(run["n_layers"]),
                             run.get("directions_file"), run.get("text_file")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput("params", "a unit's params as the planner wrote them",
                               detail=f"{type(exc).__name__}: {exc}") from None

    def key(self) -> str:
        """sha256 over the canonical JSON of everything that determines the unit's numbers."""
        return unit_key(self.to_json())

    @property
    def n_eps(self) -> int:
        """Perturbation strengths per position: the eps values, plus one for the linear response."""
        return len(self.eps) + int(self.linear)

    @property
    def n_cells(self) -> int:
        """Perturbed passes: kinds x directions x positions x (eps values + linear)."""
        return len(self.prompt.kinds) * self.directions.count * len(self.positions) * self.n_eps

    def expected_rows(self, prompt_len: int) -> int:
        """Rows of the unit's shard for prompts of `prompt_len` tokens: per cell, the recorded
        levels l in lp..L and positions i in j..prompt_len-1."""
        levels = range(self.lp, self.run.n_layers + 1)
        n_levels = len(levels) if self.record_layers is None else len(set(self.record_layers) & set(levels))
        rows = 0
        for j in self.positions:
            pos = range(j, prompt_len)
            n_pos = len(pos) if self.record_positions is None else len(set(self.record_positions) & set(pos))
            rows += n_levels * n_pos
        return rows * len(self.prompt.kinds) * self.directions.count * self.n_eps
