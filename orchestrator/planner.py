"""The planner: a validated SweepSpec -> work units with deterministic keys, minus what exists.

A cell is one perturbed pass (model, dtype, prompt id, lp, j, eps or linear, all kinds and
directions). The planner subtracts the cells already covered by the sweep's units, then packs
the new cells into units of about `cells_per_unit` cells; a unit's key hashes its content.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from orchestrator.model_meta import MetaFn, ModelMeta, load_directions_file, model_meta
from orchestrator.spec import SweepSpec, canonical_eps
from tasks.errors import InvalidInput
from tasks.layout import METHOD_VERSION

# Key fields that locate a cell inside a unit's signature; everything else is the signature.
_CELL_FIELDS = ("positions", "eps", "linear")
# Run-time hints that do not change the numbers (where files are), never part of the key.
_RUN = "run"
# Units one plan may add: beyond this the queue, not the compute, becomes the bottleneck,
# and a typo (cells_per_unit: 1 on a paper-scale grid) should fail in a second, not in an hour.
MAX_UNITS = 1_000_000


@dataclass(frozen=True)
class PlannedUnit:
    """One unit of work: what the db stores (key, group, params, n_cells)."""

    key: str
    group: str  # "<model_id>|<dtype>": actors are pinned to one group (one loaded model)
    params: dict[str, Any]
    n_cells: int


@dataclass(frozen=True)
class Plan:
    """The units a spec adds to its sweep, with the metadata used to build them."""

    sweep: str
    spec: dict[str, Any]
    spec_hash: str
    units: list[PlannedUnit]
    metas: dict[str, ModelMeta]
    total_cells: int  # cells of the whole spec, including those already covered


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: the same bytes on every machine."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unit_key(params: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of everything that determines the unit's numbers."""
    return sha256_hex(canonical_json({k: v for k, v in params.items() if k != _RUN}).encode())


def spec_hash(spec: SweepSpec) -> str:
    """Hash of the whole spec (grid extents and execution settings included)."""
    return sha256_hex(canonical_json(spec.model_dump(mode="json")).encode())


# What defines the measured quantities of a sweep. A sweep may grow (more models, dtypes,
# prompts, layers, positions, eps; linear on) and change how it runs, but never these.
_IDENTITY_FIELDS = ("name", "directions", "record")
_PROMPT_IDENTITY = ("kinds", "T", "seed", "text_file")


def stored_spec(spec: SweepSpec) -> dict[str, Any]:
    """The spec as the database keeps it: a password in `database` is masked (the sweeps
    table is readable by `query`; the URL belongs in UNISWEEP_DB or ~/.pgpass)."""
    from db.urls import mask_url

    d = spec.model_dump(mode="json")
    if d.get("database"):
        d["database"] = mask_url(d["database"])
    return d


def sweep_hash(spec: SweepSpec) -> str:
    """The hash the database holds as the sweep's spec_hash: a widened spec keeps it."""
    d = spec.model_dump(mode="json")
    ident = {k: d[k] for k in _IDENTITY_FIELDS}
    ident["prompts"] = {k: d["prompts"][k] for k in _PROMPT_IDENTITY}
    ident["method_version"] = METHOD_VERSION
    return sha256_hex(canonical_json(ident).encode())


def _file_sha256(path: str, field: str) -> str:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError as exc:
        raise InvalidInput(field, "a readable file", got=path, detail=str(exc)) from None


def validate_models(spec: SweepSpec, meta_fn: MetaFn = model_meta) -> dict[str, ModelMeta]:
    """Checks that need each model's config (depth, width, context); no weights, no compute."""
    metas: dict[str, ModelMeta] = {}
    names = list(dict.fromkeys(name for name, _ in spec.model_dtypes()))
    for i, name in enumerate(names):
        try:
            meta = meta_fn(name)
        except InvalidInput as exc:
            raise InvalidInput(f"models[{i}]", exc.allowed, got=name, detail=str(exc)) from None
        metas[name] = meta
        L = meta.n_layers
        if spec.layers != "all" and max(spec.layers) >= L:
            raise InvalidInput("layers", f"perturbation layers 0..{L - 1} for model {name} "
                               f"({L} blocks)", got=spec.layers)
        if spec.record.layers is not None and max(spec.record.layers) > L:
            raise InvalidInput("record.layers", f"levels 0..{L} for model {name} (l = {L} is the "
                               "last block's output)", got=spec.record.layers)
        n = 2 * spec.prompts.T + 1
        if n > meta.max_positions:
            raise InvalidInput("prompts.T", f"T <= {(meta.max_positions - 1) // 2} for model {name} "
                               f"(context {meta.max_positions}, prompt length 2T+1)",
                               got=spec.prompts.T)
        if spec.directions.family == "file":
            load_directions_file(spec.directions.file, meta.d_model, spec.directions.count)
    return metas


def _signature_parts(spec: SweepSpec, meta: ModelMeta, dtype: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(key fields shared by all units of a (model, dtype), run-time hints)."""
    d = spec.directions
    if d.family == "file":
        n_dirs = int(load_directions_file(d.file, meta.d_model, d.count).shape[0])
        directions = {"family": "file", "count": n_dirs, "sha256": _file_sha256(d.file, "directions.file")}
    else:
        directions = {"family": d.family, "count": d.count or 4, "seed": d.seed}
    p = spec.prompts
    prompt: dict[str, Any] = {"kinds": list(p.kinds), "T": p.T, "seed": p.seed}
    if p.text_file:
        prompt["text_sha256"] = _file_sha256(p.text_file, "prompts.text_file")
    shared = {
        "method_version": METHOD_VERSION,
        "model": meta.identity or {"name": meta.model_id},
        "dtype": dtype,
        "prompt": prompt,
        "directions": directions,
        "record": {"layers": spec.record.layers, "positions": spec.record.positions},
    }
    run = {"model": meta.name, "model_id": meta.model_id, "n_layers": meta.n_layers,
           "directions_file": d.file, "text_file": p.text_file}
    return shared, run


def _signature(params: dict[str, Any]) -> str:
    return canonical_json({k: v for k, v in params.items() if k not in _CELL_FIELDS and k != _RUN})


def _covered(existing: Iterable[dict[str, Any]]) -> dict[str, set[tuple[int, float | None]]]:
    """signature -> {(j, eps or None for linear)} already in the sweep's units."""
    cov: dict[str, set[tuple[int, float | None]]] = defaultdict(set)
    for params in existing:
        sig = _signature(params)
        # float(): PostgreSQL's JSONB hands 1e30 back as the integer 10**30.
        values: list[float | None] = [canonical_eps(float(e)) for e in params["eps"]]
        values += [None] if params.get("linear") else []
        for j in params["positions"]:
            cov[sig].update((j, e) for e in values)
    return cov


def _pack(eps_values: tuple[float | None, ...], positions: list[int], per_eps_pos: int,
          cells_per_unit: int) -> list[tuple[list[int], tuple[float | None, ...]]]:
    """Split (positions x eps_values) into chunks of about cells_per_unit cells.

    The eps axis is kept whole when it fits (one batched pass per position covers all eps);
    otherwise it is cut into fixed-size runs, then positions fill the unit.
    """
    e_chunk = max(1, min(len(eps_values), cells_per_unit // per_eps_pos))
    out = []
    for e0 in range(0, len(eps_values), e_chunk):
        chunk = eps_values[e0:e0 + e_chunk]
        p_chunk = max(1, cells_per_unit // (per_eps_pos * len(chunk)))
        for p0 in range(0, len(positions), p_chunk):
            out.append((positions[p0:p0 + p_chunk], chunk))
    return out


def _n_packs(n_eps: int, n_pos: int, per_eps_pos: int, cells_per_unit: int) -> int:
    """How many chunks _pack makes of (n_pos positions x n_eps values), without making them."""
    e_chunk = max(1, min(n_eps, cells_per_unit // per_eps_pos))
    full, rest = divmod(n_eps, e_chunk)
    total = 0
    for chunk, times in ((e_chunk, full), (rest, 1 if rest else 0)):
        if times:
            p_chunk = max(1, cells_per_unit // (per_eps_pos * chunk))
            total += times * -(-n_pos // p_chunk)
    return total


def check_unit_count(spec: SweepSpec, metas: dict[str, ModelMeta]) -> int:
    """Units of the whole grid (before subtracting what exists); InvalidInput past MAX_UNITS."""
    n_eps = len(spec.eps_list()) + (1 if spec.linear else 0)
    n_pos = len(spec.position_list())
    total = 0
    for name, _ in spec.model_dtypes():
        d = spec.directions
        n_dirs = d.count or 4
        if d.family == "file":
            n_dirs = int(load_directions_file(d.file, metas[name].d_model, d.count).shape[0])
        per_eps_pos = len(spec.prompts.kinds) * n_dirs
        n_lp = len(spec.layer_list(metas[name].n_layers))
        total += spec.prompts.count * n_lp * _n_packs(n_eps, n_pos, per_eps_pos, spec.cells_per_unit)
    if total > MAX_UNITS:
        raise InvalidInput("cells_per_unit", f"a grid of at most {MAX_UNITS} units: raise "
                           "cells_per_unit or split the sweep", got=spec.cells_per_unit,
                           detail=f"this grid makes {total} units")
    return total


def plan(spec: SweepSpec, existing: Iterable[dict[str, Any]] = (), meta_fn: MetaFn = model_meta,
         metas: dict[str, ModelMeta] | None = None) -> Plan:
    """Units for `spec` that the cells of `existing` unit params do not cover yet.

    Same spec twice -> no unit; a wider grid (eps, positions, layers, prompts, models) ->
    units for the new cells only; the old units keep their keys.
    """
    metas = metas if metas is not None else validate_models(spec, meta_fn)
    check_unit_count(spec, metas)
    covered = _covered(existing)
    eps_all: list[float | None] = ([None] if spec.linear else []) + list(spec.eps_list())
    positions = spec.position_list()
    units: list[PlannedUnit] = []
    total = 0
    for name, dtype in spec.model_dtypes():
        meta = metas[name]
        shared, run = _signature_parts(spec, meta, dtype)
        per_eps_pos = len(spec.prompts.kinds) * shared["directions"]["count"]
        group = f"{meta.model_id}|{dtype}"
        for pid in range(spec.prompts.count):
            for lp in spec.layer_list(meta.n_layers):
                base = dict(shared, prompt=dict(shared["prompt"], id=pid), lp=lp)
                cov = covered.get(_signature(base), set())
                total += per_eps_pos * len(positions) * len(eps_all)
                # New cells grouped by their set of new eps values (usually one set for all j).
                by_eps: dict[tuple[float | None, ...], list[int]] = defaultdict(list)
                for j in positions:
                    new = tuple(e for e in eps_all if (j, e) not in cov)
                    if new:
                        by_eps[new].append(j)
                for eps_values, js in by_eps.items():
                    for pos_chunk, eps_chunk in _pack(eps_values, js, per_eps_pos, spec.cells_per_unit):
                        params = dict(base, positions=pos_chunk,
                                      eps=[e for e in eps_chunk if e is not None],
                                      linear=None in eps_chunk, run=run)
                        units.append(PlannedUnit(
                            key=unit_key(params), group=group, params=params,
                            n_cells=per_eps_pos * len(pos_chunk) * len(eps_chunk)))
    return Plan(sweep=spec.name, spec=stored_spec(spec), spec_hash=spec_hash(spec),
                units=units, metas=metas, total_cells=total)
