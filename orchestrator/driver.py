"""The driver loop: run a submitted sweep on GPU actors placed per node (or CPU actors), watch them.

Submitting lives in submit.py, the actor plan in placement.py, Ray start-up in ray_session.py,
the progress bar and SIGTERM in progress.py. The loop restarts dead actors and fails their
in-flight units (counted attempts), and on Ctrl-C stops the actors and releases their leases.
The database, not this process, knows what is done: a killed driver loses at most the units
in flight.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from db.retry import Resilient
from orchestrator.actor import make_actor_class
from orchestrator.placement import (
    ActorPlan,
    GpuLedger,
    actor_plan,
    check_fits,
    cluster_nodes,
    gpu_actor_options,
)
from orchestrator.progress import SweepProgress, is_main_thread, raise_interrupt
from orchestrator.ray_session import (
    PROJECT_ROOT,
    SHIP_EXCLUDES,
    check_address,
    init_ray,
    worker_env,
)
from orchestrator.spec import SweepSpec
from orchestrator.submit import check_output_dir, load_sweep_spec, submit
from tasks.errors import UnisweepError

# Re-exported: callers import these from here (the driver's public face).
__all__ = ["PROJECT_ROOT", "SHIP_EXCLUDES", "ActorPlan", "Driver", "RunSummary", "actor_plan",
           "check_address", "check_output_dir", "init_ray", "load_sweep_spec", "submit"]

log = logging.getLogger("unisweep.orchestrator")


@dataclass
class RunSummary:
    sweep: str
    counts: dict[str, int]
    cells_done: int
    cells_total: int
    cells_this_run: int
    seconds: float
    actor_deaths: int = 0
    interrupted: bool = False
    failed: list[Any] = field(default_factory=list)

    @property
    def cells_per_s(self) -> float:
        return self.cells_this_run / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Slot:
    actor: Any
    group: str
    worker_id: str
    ref: Any = None
    deaths: int = 0
    node: str | None = None  # the node a GPU actor is pinned to (booked in the GpuLedger)
    gpus: float = 0.0


class Driver:
    """Runs one sweep's open units on Ray actors until none is left (or Ctrl-C)."""

    def __init__(self, store: Any, sweep: str, spec: SweepSpec, db_url: str, *,
                 address: str | None = None, ship: bool = True, actors: int | None = None,
                 progress: bool = True, poll_s: float = 0.5,
                 max_actor_deaths: int = 5, on_progress: Callable[[Any], None] | None = None) -> None:
        # Every database call rides out an outage (bounded); past it, DatabaseUnavailable.
        store = store if isinstance(store, Resilient) else Resilient(store)
        self.store, self.sweep, self.spec, self.db_url = store, sweep, spec, db_url
        self.worker_ids: set[str] = set()  # every worker this driver started (item: own counts)
        self.address = address
        self.ship = ship
        self.actors_override = actors
        self.progress = progress
        self.poll_s = poll_s
        self.max_actor_deaths = max_actor_deaths
        self.on_progress = on_progress
        self.info = store.get_sweep(sweep)
        self.slots: list[_Slot] = []
        self.deaths = 0
        self.ledger: GpuLedger | None = None  # GPU actors only: free GPUs per node
        self.group_gpus: dict[str, float] = {}
        self._env_ref: Any = None  # ray.put(worker_env(...)), made once per run

    # ---- actors ----

    def _start_actor(self, group: str, ap: ActorPlan, cls: Any) -> _Slot | None:
        """One new actor for `group`, or None when no node has room for it now."""
        placed = self._place(group)
        return self._launch([placed], ap, cls)[0] if placed else None

    def _place(self, group: str) -> tuple[str, str | None, float] | None:
        """(group, node, GPUs) for one new actor, booked in the ledger; None: no room now.
        CPU actors have no node: Ray places them."""
        if self.ledger is None:
            return group, None, 0.0
        need = self.group_gpus[group]
        node = self.ledger.take(need)
        return (group, node, need) if node is not None else None

    def _launch(self, placed: list[tuple[str, str | None, float]], ap: ActorPlan,
                cls: Any) -> list[_Slot]:
        """Start the placed actors (in parallel), each set on its group; a GPU actor pinned
        to its booked node."""
        import ray

        L = self.spec.lease
        if self._env_ref is None:
            self._env_ref = ray.put(worker_env(self.db_url))
        actors = [cls.options(**(gpu_actor_options(node, need) if node else ap.options)).remote(
            None, self.info.id, self.sweep, g, self.info.output_dir,  # the db URL: in the env
            ttl_s=L.ttl_s, heartbeat_s=L.heartbeat_s, max_attempts=L.max_attempts,
            batch=L.batch, threads=ap.threads, gpus=need, fused_kl=self.spec.engine.fused_kl,
            env_ref=[self._env_ref],  # nested: Ray passes the reference, never the value
        ) for g, node, need in placed]
        ids = [_worker_id(a, timeout_s=600) for a in actors]  # they start in parallel
        slots = [_Slot(a, g, w, node=node, gpus=need)
                 for a, (g, node, need), w in zip(actors, placed, ids, strict=True)]
        self.worker_ids.update(ids)
        for slot in slots:
            slot.ref = slot.actor.run.remote()
        return slots

    def _drop(self, slot: _Slot) -> None:
        """Kill a slot's actor for good and give its GPUs back to the ledger."""
        import ray

        ray.kill(slot.actor, no_restart=True)
        self.slots.remove(slot)
        if self.ledger is not None:
            self.ledger.give(slot.node, slot.gpus)

    def _fits(self, group: str) -> bool:
        return self.ledger is None or self.ledger.fits(self.group_gpus[group])

    def _gpu_cap(self) -> int:
        """At most this many GPU actors at once (max_actors, --actors); the ledger decides the rest."""
        caps = [c for c in (self.spec.resources.max_actors, self.actors_override) if c]
        return min(caps) if caps else 100_000

    def _plan_gpus(self, open_groups: dict[Any, dict[str, int]]) -> None:
        """GPU actors: GPUs per actor of each group's model, checked against the largest node
        before any actor starts; then a ledger of each node's real GPU count."""
        models = _group_models(self.store, self.sweep)
        self.group_gpus = {g: self.spec.gpus_per_actor(models[g]) for g in open_groups}
        nodes = cluster_nodes()
        check_fits({models[g]: need for g, need in self.group_gpus.items()}, nodes)
        self.ledger = GpuLedger(nodes, self.spec.resources.actors_per_node)

    def _fail_in_flight(self, worker_id: str, why: str) -> None:
        # A dead worker's units count as a failed attempt (not a release): a unit that kills
        # its worker every time must end `failed`, not loop forever.
        for key in self.store.leased_by(worker_id, self.sweep):
            self.store.fail(key, worker_id, why, self.spec.lease.max_attempts)

    def _pick_group(self, open_groups: dict[Any, dict[str, int]],
                    planned: list[str] = ()) -> str | None:
        # The group with the most open cells per actor already on it, among those whose
        # actor has room on some node now.
        on: dict[str, int] = {}
        for g in [s.group for s in self.slots] + list(planned):
            on[g] = on.get(g, 0) + 1
        best = None
        for g, d in open_groups.items():
            if not self._fits(g):
                continue
            score = d["cells"] / (1 + on.get(g, 0))
            if best is None or score > best[0]:
                best = (score, g)
        return None if best is None else best[1]

    # ---- the loop ----

    def run(self) -> RunSummary:
        t0 = time.perf_counter()
        open_groups = self.store.open_by_group(self.sweep)
        interrupted = False
        progress = SweepProgress(self.store, self.sweep, enabled=self.progress)
        old_handler = signal.getsignal(signal.SIGTERM)
        if is_main_thread():
            signal.signal(signal.SIGTERM, raise_interrupt)
        try:
            if open_groups:
                init_ray(self.address, ship=self.ship)  # only when there is work: Ray costs seconds to start
                nodes = [n for n in ray.nodes() if n.get("Alive")]
                resources = ray.cluster_resources()
                if resources.get("GPU", 0) > 0:
                    # GPU actors: counts from each node's GPUs, not a cluster-wide total; a
                    # model that fits no node fails here, before any unit is leased.
                    ap = ActorPlan(self._gpu_cap(), {}, "gpu", 1)
                    self._plan_gpus(open_groups)
                else:
                    ap = actor_plan(self.spec.resources, resources, len(nodes), self.actors_override)
                self.store.set_sweep_status(self.sweep, "running")
                cls = make_actor_class(max_restarts=2, max_task_retries=0)
                placed: list[tuple[str, str | None, float]] = []
                for _ in range(ap.n):
                    g = self._pick_group(open_groups, [p[0] for p in placed])
                    if g is None:
                        break
                    placed.append(self._place(g))
                self.slots.extend(self._launch(placed, ap, cls))
                self._watch(ap, cls, progress)
        except KeyboardInterrupt:
            interrupted = True
            self._stop_all()
        except UnisweepError:
            # The database stayed down past its budget, or a worker's machine keeps failing
            # (disk full): stop the actors without touching the database; their leases expire.
            self._stop_all(release=False)
            progress.enabled = False
            raise
        finally:
            if is_main_thread():
                signal.signal(signal.SIGTERM, old_handler)
            progress.close()
        st = self.store.status(self.sweep)
        if not interrupted:
            open_units = st.counts["pending"] + st.counts["leased"]
            final = "failed" if st.counts["failed"] else ("done" if open_units == 0 else "stopped")
        else:
            final = "stopped"
        self.store.set_sweep_status(self.sweep, final)
        # What this driver's workers did: another driver on the same sweep counts its own.
        mine = self.store.cells_done_by(self.sweep, sorted(self.worker_ids)) if self.worker_ids else 0
        return RunSummary(self.sweep, st.counts, st.cells_done, st.cells_total,
                          mine, time.perf_counter() - t0, self.deaths, interrupted, st.failed)

    def _watch(self, ap: ActorPlan, cls: Any, progress: SweepProgress) -> None:
        last_reclaim = 0.0
        while any(s.ref is not None for s in self.slots):
            refs = {s.ref: s for s in self.slots if s.ref is not None}
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=self.poll_s)
            for ref in ready:
                slot = refs[ref]
                try:
                    ray.get(ref)
                    # The group is finished: this actor's model is no longer needed. Give the
                    # slot to the group with the most open work (a new actor, a new model).
                    self._drop(slot)
                    g = self._pick_group(self.store.open_by_group(self.sweep))
                    fresh = self._start_actor(g, ap, cls) if g is not None else None
                    if fresh is not None:
                        self.slots.append(fresh)
                except RayTaskError as exc:
                    # run() raised: a machine problem the worker could not ride out.
                    cause = exc.as_instanceof_cause() if hasattr(exc, "as_instanceof_cause") else exc
                    if isinstance(cause, UnisweepError):
                        raise UnisweepError(f"worker {slot.worker_id}: "
                                            f"{str(cause).strip().splitlines()[-1]}") from None
                    raise
                except RayActorError as exc:
                    self.deaths += 1
                    slot.deaths += 1
                    log.warning("actor %s died: %s", slot.worker_id, type(exc).__name__)
                    self._fail_in_flight(slot.worker_id, f"worker died ({type(exc).__name__})")
                    slot.ref = None
                    if slot.deaths > self.max_actor_deaths:
                        log.error("actor for %s died %d times: giving up its slot", slot.group,
                                  slot.deaths)
                        self._drop(slot)
                        continue
                    self._revive(slot, exc, ap, cls)
            now = time.monotonic()
            if now - last_reclaim > max(1.0, self.spec.lease.ttl_s / 2):
                # Units whose holder vanished on every attempt become `failed` here.
                self.store.reclaim_expired(self.sweep, self.spec.lease.max_attempts)
                last_reclaim = now
            st = progress.update()
            if st is not None and self.on_progress is not None:
                self.on_progress(st)

    def _revive(self, slot: _Slot, exc: Exception, ap: ActorPlan, cls: Any) -> None:
        """After a death: wait for Ray's restart of the actor (fresh process, new worker id), or
        replace an actor that has no restarts left by a new one for the same group."""
        if not isinstance(exc, ActorDiedError):
            try:
                slot.worker_id = _worker_id(slot.actor, timeout_s=120)
                self.worker_ids.add(slot.worker_id)
                slot.ref = slot.actor.run.remote()
                return
            except (RayActorError, ray.exceptions.GetTimeoutError):
                pass  # no restart came, or it died for good: replace it below
        # Gone for good: free its resources first, or the new actor may never be scheduled.
        self._drop(slot)
        fresh = self._start_actor(slot.group, ap, cls)
        if fresh is not None:
            fresh.deaths = slot.deaths
            self.slots.append(fresh)

    def _stop_all(self, grace_s: float = 3.0, release: bool = True) -> None:
        """Ctrl-C: stop after the unit in flight if quick, else kill; release every lease
        (release=False when the database is the problem: the leases expire instead)."""
        for s in self.slots:
            try:
                s.actor.stop.remote()
            except Exception:  # noqa: BLE001 (a dead actor needs no stop)
                pass
        refs = [s.ref for s in self.slots if s.ref is not None]
        if refs:
            try:
                ray.wait(refs, num_returns=len(refs), timeout=grace_s)
            except Exception:  # noqa: BLE001
                pass
        for s in self.slots:
            try:
                ray.kill(s.actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
            if release:
                self.store.release(s.worker_id)
        self.slots.clear()


def _group_models(store: Any, sweep: str) -> dict[str | None, str]:
    """group -> the model name its units load (the spec's name: what gpus_per_actor is keyed by)."""
    import json

    t = store.table_arrow("units", sweep).select(["group", "params"])
    out: dict[str | None, str] = {}
    for g, p in zip(t.column("group").to_pylist(), t.column("params").to_pylist(), strict=True):
        if g not in out:
            out[g] = json.loads(p)["run"]["model"]
    return out


def _worker_id(actor: Any, timeout_s: float) -> str:
    """The actor's worker id, waiting out a restart in progress: a worker process killed while
    starting or between units makes Ray answer ActorUnavailableError ("temporarily
    unavailable") until its replacement is up (seen when the fault test killed a worker during
    a driver's start-up: the driver ended in a traceback)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(actor.get_worker_id.remote(),
                           timeout=max(1.0, deadline - time.monotonic()))
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
