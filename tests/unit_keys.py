"""The unit keys of the example specs, recorded once: a changed planner must reproduce them.

`python -m tests.unit_keys --record` writes tests/data/unit_keys.json from the current code
(it was recorded from main before the planner moved to config-only model metadata); the
test in tests/test_unit_keys.py plans the same specs and compares.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from orchestrator.planner import plan
from orchestrator.spec import load_spec, spec_from_dict

ROOT = Path(__file__).absolute().parents[1]
FIXTURE = ROOT / "tests" / "data" / "unit_keys.json"
# Example specs whose models install with the test environment (setup.sh installs SmolLM2).
EXAMPLE_SPECS = ["examples/quickstart.yaml", "examples/campaign/smollm2.yaml",
                 "examples/explicit_directions.yaml", "examples/heads/smollm2.yaml"]
# Specs with Gemma-3-270M, whose 253 MB of weights install on first use (`unisweep models
# install gemma3-270m`), not with setup.sh: recorded (2026-11-27, after issue 14's planner),
# compared only where the weights are installed (the key holds the assembled file's sha256).
GEMMA3_SPECS = ["examples/campaign/gemma3.yaml", "examples/multi_model.yaml",
                "examples/heads/gemma3.yaml"]
# Every other way to name a model without a download: the tiny configs and the shapes that
# fit in memory, in one spec with two dtypes.
SYNTHETIC_SPEC: dict[str, Any] = {
    "name": "keys-synthetic",
    "models": ["tiny:gpt2", "tiny:llama", "tiny:gemma2", "tiny:gemma3", "shape:gpt2-small",
               "shape:gemma-2-2b/4", "shape:llama-3.2-3b/4", "shape:gpt2-xl/4"],
    "dtype": ["float32", "bfloat16"],
    "prompts": {"T": 6, "count": 2, "seed": 3},
    "layers": [0, 2],
    "positions": [1, 3, 5],
    "eps": {"start": 1e-4, "stop": 1e-1, "per_decade": 1},
    "directions": {"family": "random", "count": 3, "seed": 1},
    "linear": True,
    "cells_per_unit": 20,
}


def plan_summary(name: str) -> dict[str, Any]:
    """Units of one spec (an example path, or "synthetic"): count, digest, first keys."""
    spec = spec_from_dict(SYNTHETIC_SPEC) if name == "synthetic" else load_spec(ROOT / name)
    units = plan(spec).units
    lines = "\n".join(f"{u.key} {u.group} {u.n_cells}" for u in units)
    return {"units": len(units), "cells": sum(u.n_cells for u in units),
            "sha256": hashlib.sha256(lines.encode()).hexdigest(),
            "first_keys": [u.key for u in units[:3]]}


def all_names() -> list[str]:
    return [*EXAMPLE_SPECS, *GEMMA3_SPECS, "synthetic"]


def gemma3_installed() -> bool:
    import importlib.util

    from tasks.known_models import ALIASES

    return importlib.util.find_spec(ALIASES["gemma3-270m"]["module"]) is not None


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python -m tests.unit_keys --record")
    FIXTURE.write_text(json.dumps({n: plan_summary(n) for n in all_names()}, indent=1) + "\n")
    print(FIXTURE.read_text())
