"""Submitting a sweep: validate the spec against its models, plan it, add the new units.

Also reads a stored sweep's spec back (for `resume`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from db.store import UnitSpec, connect
from orchestrator.model_meta import MetaFn, model_meta
from orchestrator.planner import Plan, plan, sweep_hash
from orchestrator.spec import SweepSpec, spec_from_dict
from tasks.errors import InvalidInput, UnisweepError


def submit(spec: SweepSpec, db_url: str | None = None, meta_fn: MetaFn = model_meta) -> tuple[Any, Plan, int]:
    """Validate against the models, plan, and add the new units: (store, plan, units added).

    Everything that can be wrong with the spec is raised before the database is touched.
    """
    base_plan = plan(spec, meta_fn=meta_fn)  # validates every model before any write
    check_output_dir(spec.output)
    store = connect(db_url or spec.database, output_dir=spec.output)
    try:
        existing = store.unit_params(spec.name)
    except InvalidInput:  # a new sweep has no units
        existing = []
    the_plan = plan(spec, existing=existing, metas=base_plan.metas) if existing else base_plan
    store.create_sweep(spec.name, the_plan.spec, sweep_hash(spec), spec.output)
    added = store.add_units(spec.name, [UnitSpec(u.key, u.group, u.params, u.n_cells)
                                        for u in the_plan.units])
    return store, the_plan, added


def check_output_dir(output: str) -> None:
    """`output` must be a folder this process can create and write (shards go there)."""
    if "://" in output:
        return  # object storage: checked by its own client
    path = Path(output).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InvalidInput("output", "a folder for the shards (created if missing)", output,
                           detail=f"{probe} is an existing file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InvalidInput("output", "a folder this user can write", output,
                           detail=f"{probe} is not writable")


def load_sweep_spec(store: Any, sweep: str) -> SweepSpec:
    """The spec a sweep was created with (for `resume`), validated again."""
    info = store.get_sweep(sweep)
    try:
        return spec_from_dict(info.spec)
    except InvalidInput as exc:
        raise UnisweepError(f"sweep {sweep!r}: its stored spec no longer validates: {exc}") from None
