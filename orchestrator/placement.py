"""The actor plan: how many actors a sweep gets on this cluster and where each goes.

CPU actors when there is no GPU (and the spec allows); GPU actors from each node's real GPU
count (ray.nodes()) and each model's GPUs per actor, through a ledger of free GPUs per node
that books a node (best fit) for every actor the driver starts and takes it back when the
actor goes: Ray leaves an actor that no node can hold PENDING forever, with no error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from orchestrator.spec import Resources
from tasks.errors import UnisweepError

EPS = 1e-9  # fractional GPUs (0.5 = two actors share one) add up without rounding surprises


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


@dataclass(frozen=True)
class Node:
    """One alive Ray node: its id and the whole GPUs it declares."""

    node_id: str
    gpus: int


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster with their GPU counts (0 for CPU nodes)."""
    import ray

    return [Node(n["NodeID"], int(n.get("Resources", {}).get("GPU", 0) + 1e-9))
            for n in ray.nodes() if n.get("Alive")]


def slots_per_node(nodes: list[Node], gpus_per_actor: float,
                   actors_per_node: int | None = None) -> dict[str, int]:
    """How many actors of `gpus_per_actor` GPUs each node holds (all GPUs free)."""
    out = {}
    for n in nodes:
        k = int(n.gpus / gpus_per_actor + EPS)
        out[n.node_id] = min(k, actors_per_node) if actors_per_node else k
    return out


def check_fits(needs: dict[str, float], nodes: list[Node]) -> None:
    """Fail before any work when a model needs more GPUs in one actor than any node has.

    `needs` maps a model name to its GPUs per actor.
    """
    largest = max((n.gpus for n in nodes), default=0)
    for model, need in needs.items():
        if need > largest + EPS:
            raise UnisweepError(
                f"model {model} needs {need:g} GPUs in one actor (gpus_per_actor), but the largest "
                f"node of the Ray cluster has {largest} GPUs: lower gpus_per_actor or add a "
                f"node with {need:g} GPUs")


class GpuLedger:
    """Free GPUs (and actors) per node; `take` picks the node for a new actor, `give` frees it."""

    def __init__(self, nodes: list[Node], actors_per_node: int | None = None) -> None:
        self.free: dict[str, float] = {n.node_id: float(n.gpus) for n in nodes if n.gpus > 0}
        self.actors = dict.fromkeys(self.free, 0)
        self.actors_per_node = actors_per_node

    def fits(self, need: float) -> bool:
        return self._best(need) is not None

    def _best(self, need: float) -> str | None:
        # Best fit: the node with the fewest free GPUs that still holds `need`, so a 1-GPU
        # model fills small nodes first and leaves the big ones to models that need them.
        ok = [(free, node) for node, free in self.free.items()
              if free + EPS >= need and not (self.actors_per_node
                                       and self.actors[node] >= self.actors_per_node)]
        return min(ok)[1] if ok else None

    def take(self, need: float) -> str | None:
        """A node for one actor of `need` GPUs (booked), or None when none has them free."""
        node = self._best(need)
        if node is not None:
            self.free[node] -= need
            self.actors[node] += 1
        return node

    def give(self, node: str | None, need: float) -> None:
        """Free what `take` booked on `node` (an actor finished, died for good or was killed)."""
        if node in self.free:
            self.free[node] += need
            self.actors[node] -= 1


def gpu_actor_options(node: str, need: float) -> dict[str, Any]:
    """Ray options for one GPU actor pinned to `node` (hard affinity: never elsewhere)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"num_gpus": need, "num_cpus": 1,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}
