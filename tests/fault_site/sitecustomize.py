"""Test-only fault injection in Ray workers and subprocess drivers; never on a user's path.

tests/orch_helpers.start_ray puts this folder on PYTHONPATH, and Python imports
`sitecustomize` at start-up in every process. With UNISWEEP_TEST_UNIT_DELAY_S set, each unit a
worker runs sleeps that long first, so a test can kill the worker in the middle of a unit.
The patch is applied when orchestrator.actor is imported (an import hook), so processes that
never run units import nothing more.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time
from typing import Any

UNIT_DELAY_ENV = "UNISWEEP_TEST_UNIT_DELAY_S"


def _patch(module: Any, delay_s: float) -> None:
    # compute_units_tables is what the worker's run loop calls for every lease (one or
    # several units): delay_s per unit it holds.
    original = module.UnitRunner.compute_units_tables

    def slow_compute_units_tables(self: Any, units: list[Any]) -> Any:
        time.sleep(delay_s * len(units))
        return original(self, units)

    module.UnitRunner.compute_units_tables = slow_compute_units_tables


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "orchestrator.actor":
            return None
        sys.meta_path.remove(self)  # once per process; and the lookup below must not recurse
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            _patch(module, self.delay_s)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


_delay = float(os.environ.get(UNIT_DELAY_ENV, "0") or 0)
if _delay > 0:
    sys.meta_path.insert(0, _PatchOnImport(_delay))
