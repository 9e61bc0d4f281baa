"""Read-only questions the orchestrator asks the database, answered through db.store's public API.

Kept apart so that a faster Store method (e.g. per-group counts) can replace them in one place.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

OPEN = ("pending", "leased")


def _units(store: Any, sweep: int | str, columns: list[str]) -> Any:
    return store.table_arrow("units", sweep).select(columns)


def existing_params(store: Any, sweep: str) -> list[dict[str, Any]]:
    """The params of every unit already in the sweep (the planner subtracts their cells)."""
    try:
        store.get_sweep(sweep)
    except Exception:  # noqa: BLE001 (a sweep that does not exist has no units)
        return []
    return [json.loads(p) for p in _units(store, sweep, ["params"]).column("params").to_pylist()]


def open_by_group(store: Any, sweep: int | str) -> dict[str | None, dict[str, int]]:
    """group -> {"units": open units, "cells": their cells} for pending and leased units."""
    t = _units(store, sweep, ["group", "status", "n_cells"])
    t = t.filter(pc.is_in(t.column("status"), value_set=pa.array(OPEN)))
    out: dict[str | None, dict[str, int]] = {}
    for g, n in zip(t.column("group").to_pylist(), t.column("n_cells").to_pylist(), strict=True):
        d = out.setdefault(g, {"units": 0, "cells": 0})
        d["units"] += 1
        d["cells"] += int(n)
    return out


def group_finished(store: Any, sweep: int | str, group: str | None) -> bool:
    """True when no unit of the group is pending or leased (all done or failed)."""
    return group not in open_by_group(store, sweep)
