"""The planner: a validated SweepSpec -> work units (tasks.work.UnitWork) minus what exists.

A cell is one perturbed pass (model, dtype, prompt id, lp, j, one eps value or the linear
response, all kinds and directions). The planner subtracts the cells already covered by the
sweep's units, then packs the new cells into units of about `cells_per_unit` cells; a unit's
key hashes its content (UnitWork.key).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from db.urls import mask_url
from orchestrator.model_meta import MetaFn, ModelMeta, model_meta
from orchestrator.spec import SweepSpec, canonical_eps
from tasks.direction_file import read_direction_file
from tasks.errors import InvalidInput
from tasks.layout import METHOD_VERSION
from tasks.work import (
    RunHints,
    UnitWork,
    WorkDirections,
    WorkPrompt,
    canonical_json,
    file_sha256,
    sha256_hex,
    unit_key,
)

__all__ = ["Plan", "PlannedUnit", "canonical_json", "plan", "spec_hash", "sweep_hash", "unit_key"]

# Units one plan may add: beyond this the queue, not the compute, becomes the bottleneck,
# and a typo (cells_per_unit: 1 on a paper-scale grid) should fail in a second, not in an hour.
MAX_UNITS = 1_000_000


@dataclass(frozen=True)
class PlannedUnit:
    """One unit of work and what the db stores of it (key, group, params, n_cells)."""

    work: UnitWork
    group: str  # "<model_id>|<dtype>": actors are pinned to one group (one loaded model)

    @property
    def key(self) -> str:
        return self.work.key()

    @property
    def params(self) -> dict[str, Any]:
        return self.work.to_json()

    @property
    def n_cells(self) -> int:
        return self.work.n_cells


@dataclass(frozen=True)
class Plan:
    """The units a spec adds to its sweep, with the metadata used to build them."""

    sweep: str
    spec: dict[str, Any]
    spec_hash: str
    units: list[PlannedUnit]
    metas: dict[str, ModelMeta]
    total_cells: int  # cells of the whole spec, including those already covered


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
            read_direction_file(spec.directions.file, meta.d_model, spec.directions.count)
    return metas


def _template(spec: SweepSpec, meta: ModelMeta, dtype: str) -> UnitWork:
    """The fields shared by every unit of a (model, dtype); prompt id, lp, cells to fill in."""
    d = spec.directions
    if d.family == "file":
        n_dirs = int(read_direction_file(d.file, meta.d_model, d.count).shape[0])
        directions = WorkDirections("file", n_dirs, sha256=file_sha256(d.file, "directions.file"))
    else:
        directions = WorkDirections(d.family, d.count or 4, seed=d.seed)
    p = spec.prompts
    text_sha = file_sha256(p.text_file, "prompts.text_file") if p.text_file else None
    identity = meta.identity or {"name": meta.model_id}
    return UnitWork(
        method_version=METHOD_VERSION,
        model=tuple(sorted(identity.items())),
        dtype=dtype,
        prompt=WorkPrompt(tuple(p.kinds), p.T, p.seed, 0, text_sha),
        directions=directions,
        record_layers=None if spec.record.layers is None else tuple(spec.record.layers),
        record_positions=None if spec.record.positions is None else tuple(spec.record.positions),
        lp=0, positions=(), eps=(), linear=False,
        run=RunHints(meta.name, meta.model_id, meta.n_layers, d.file, p.text_file),
    )


def _signature(work: UnitWork) -> UnitWork:
    """What two units must share for their cells to be comparable: all but cells and hints."""
    return replace(work, positions=(), eps=(), linear=False, run=RunHints("", "", 0))


@dataclass
class _Covered:
    """Cells of one signature already in the sweep: (j, eps) pairs and linear positions."""

    eps: set[tuple[int, float]]
    linear: set[int]


def _covered(existing: Iterable[dict[str, Any]]) -> dict[UnitWork, _Covered]:
    cov: dict[UnitWork, _Covered] = defaultdict(lambda: _Covered(set(), set()))
    for params in existing:
        work = UnitWork.from_json(params)
        c = cov[_signature(work)]
        for j in work.positions:
            c.eps.update((j, canonical_eps(e)) for e in work.eps)
            if work.linear:
                c.linear.add(j)
    return cov


def _pack(linear: bool, eps_values: tuple[float, ...], positions: list[int], per_eps_pos: int,
          cells_per_unit: int) -> list[tuple[list[int], bool, tuple[float, ...]]]:
    """Split positions x (linear, then eps values) into chunks of about cells_per_unit cells.

    The strength axis (linear response first, then eps) is kept whole when it fits (one
    batched pass per position covers it); otherwise it is cut into fixed-size runs, then
    positions fill the unit. Returns (positions, linear, eps values) per chunk.
    """
    n_axis = int(linear) + len(eps_values)
    e_chunk = max(1, min(n_axis, cells_per_unit // per_eps_pos))
    out = []
    for a in range(0, n_axis, e_chunk):
        b = min(a + e_chunk, n_axis)
        chunk_linear = linear and a == 0
        chunk_eps = eps_values[max(a - int(linear), 0):b - int(linear)]
        p_chunk = max(1, cells_per_unit // (per_eps_pos * (b - a)))
        for p0 in range(0, len(positions), p_chunk):
            out.append((positions[p0:p0 + p_chunk], chunk_linear, chunk_eps))
    return out


def _n_packs(n_axis: int, n_pos: int, per_eps_pos: int, cells_per_unit: int) -> int:
    """How many chunks _pack makes of (n_pos positions x n_axis strengths), without making them."""
    e_chunk = max(1, min(n_axis, cells_per_unit // per_eps_pos))
    full, rest = divmod(n_axis, e_chunk)
    total = 0
    for chunk, times in ((e_chunk, full), (rest, 1 if rest else 0)):
        if times:
            p_chunk = max(1, cells_per_unit // (per_eps_pos * chunk))
            total += times * -(-n_pos // p_chunk)
    return total


def check_unit_count(spec: SweepSpec, metas: dict[str, ModelMeta]) -> int:
    """Units of the whole grid (before subtracting what exists); InvalidInput past MAX_UNITS."""
    n_axis = len(spec.eps_list()) + (1 if spec.linear else 0)
    n_pos = len(spec.position_list())
    total = 0
    for name, _ in spec.model_dtypes():
        d = spec.directions
        n_dirs = d.count or 4
        if d.family == "file":
            n_dirs = int(read_direction_file(d.file, metas[name].d_model, d.count).shape[0])
        per_eps_pos = len(spec.prompts.kinds) * n_dirs
        n_lp = len(spec.layer_list(metas[name].n_layers))
        total += spec.prompts.count * n_lp * _n_packs(n_axis, n_pos, per_eps_pos, spec.cells_per_unit)
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
    eps_all = tuple(spec.eps_list())
    positions = spec.position_list()
    units: list[PlannedUnit] = []
    total = 0
    for name, dtype in spec.model_dtypes():
        meta = metas[name]
        template = _template(spec, meta, dtype)
        per_eps_pos = len(spec.prompts.kinds) * template.directions.count
        group = f"{meta.model_id}|{dtype}"
        for pid in range(spec.prompts.count):
            for lp in spec.layer_list(meta.n_layers):
                base = replace(template, prompt=replace(template.prompt, id=pid), lp=lp)
                cov = covered.get(_signature(base), _Covered(set(), set()))
                total += per_eps_pos * len(positions) * (len(eps_all) + int(spec.linear))
                # New cells grouped by their new (linear, eps values) (usually one set for all j).
                by_new: dict[tuple[bool, tuple[float, ...]], list[int]] = defaultdict(list)
                for j in positions:
                    new_linear = spec.linear and j not in cov.linear
                    new_eps = tuple(e for e in eps_all if (j, e) not in cov.eps)
                    if new_linear or new_eps:
                        by_new[(new_linear, new_eps)].append(j)
                for (linear, eps_values), js in by_new.items():
                    for pos_chunk, chunk_linear, chunk_eps in _pack(linear, eps_values, js, per_eps_pos,
                                                                    spec.cells_per_unit):
                        work = replace(base, positions=tuple(pos_chunk), eps=chunk_eps,
                                       linear=chunk_linear)
                        units.append(PlannedUnit(work, group))
    return Plan(sweep=spec.name, spec=stored_spec(spec), spec_hash=spec_hash(spec),
                units=units, metas=metas, total_cells=total)
