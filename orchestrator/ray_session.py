"""The Ray session: start local Ray or join a cluster, shipping this checkout to its workers.

What is shipped (the project folder minus environments, results and caches) is decided here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).absolute().parents[1]  # not resolve(): keep a symlinked checkout
# Never shipped to a cluster: environments, results, caches.
SHIP_EXCLUDES = [".venv", ".git", "runs", "unisweep-out", "**/__pycache__", "*.parquet", "*.db",
                 ".pytest_cache", ".ruff_cache"]


def init_ray(address: str | None = None, *, num_cpus: int | None = None, ship: bool = True) -> None:
    """Local Ray by default; `address` ("auto" or ray://...) joins a cluster, shipping the project."""
    import ray  # imported on use: Ray costs seconds to import

    if ray.is_initialized():
        return
    if address is None:
        # Local workers inherit the environment: put this checkout first on their path.
        pp = os.environ.get("PYTHONPATH", "")
        if str(PROJECT_ROOT) not in pp.split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), pp) if p)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
        return
    runtime_env = {"working_dir": str(PROJECT_ROOT), "excludes": SHIP_EXCLUDES} if ship else None
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=False,
             logging_level=logging.WARNING)
