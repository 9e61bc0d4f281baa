"""The actor plan: how many actors a sweep gets on this cluster and what each asks Ray for.

One actor per `gpus_per_actor` GPUs where GPUs exist, else CPU actors when the spec allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from orchestrator.spec import Resources
from tasks.errors import UnisweepError


@dataclass(frozen=True)
class ActorPlan:
    """How many actors and what each asks Ray for."""

    n: int
    options: dict[str, Any]
    device: str  # "gpu" or "cpu"
    threads: int


def actor_plan(res: Resources, cluster: dict[str, float], n_nodes: int = 1,
               override: int | None = None) -> ActorPlan:
    """One actor per `gpus_per_actor` GPUs where GPUs exist, else CPU actors (if allowed).

    Ray leaves an actor asking for a GPU that no node has PENDING forever, so the GPU count
    is checked here first (FACTS.md).
    """
    gpus = float(cluster.get("GPU", 0))
    cpus = float(cluster.get("CPU", 0))
    if gpus >= res.gpus_per_actor:
        n = int(math.floor(gpus / res.gpus_per_actor + 1e-9))
        if res.actors_per_node:
            n = min(n, res.actors_per_node * max(1, n_nodes))
        if res.max_actors:
            n = min(n, res.max_actors)
        if override:
            n = min(n, override)
        return ActorPlan(n, {"num_gpus": res.gpus_per_actor, "num_cpus": 1}, "gpu", 1)
    if not res.cpu_fallback:
        raise UnisweepError(f"the Ray cluster has {gpus:g} GPUs, each actor needs "
                            f"resources.gpus_per_actor = {res.gpus_per_actor:g}, and "
                            "resources.cpu_fallback is false")
    n = override or res.cpu_actors
    if res.max_actors:
        n = min(n, res.max_actors)
    per = res.cpus_per_actor or max(1, int(cpus // max(n, 1)))
    if cpus and per * n > cpus:
        n = max(1, int(cpus // per))
    return ActorPlan(n, {"num_cpus": per}, "cpu", per)
