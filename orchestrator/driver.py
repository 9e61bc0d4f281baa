"""The driver loop: run a submitted sweep on one actor per GPU (or CPU actors) and watch them.

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

from orchestrator.actor import make_actor_class
from orchestrator.placement import ActorPlan, actor_plan
from orchestrator.progress import SweepProgress, is_main_thread, raise_interrupt
from orchestrator.ray_session import PROJECT_ROOT, SHIP_EXCLUDES, check_address, init_ray
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


class Driver:
    """Runs one sweep's open units on Ray actors until none is left (or Ctrl-C)."""

    def __init__(self, store: Any, sweep: str, spec: SweepSpec, db_url: str, *,
                 address: str | None = None, ship: bool = True, actors: int | None = None,
                 progress: bool = True, poll_s: float = 0.5,
                 max_actor_deaths: int = 5, on_progress: Callable[[Any], None] | None = None) -> None:
        from db.retry import Resilient

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

    # ---- actors ----

    def _start_actor(self, group: str, ap: ActorPlan, cls: Any) -> _Slot:
        return self._start_actors([group], ap, cls)[0]

    def _start_actors(self, groups: list[str], ap: ActorPlan, cls: Any) -> list[_Slot]:
        """Start one actor per entry of `groups` (in parallel) and set each on its group."""
        L = self.spec.lease
        actors = [cls.options(**ap.options).remote(
            self.db_url, self.info.id, self.sweep, g, self.info.output_dir,
            ttl_s=L.ttl_s, heartbeat_s=L.heartbeat_s, max_attempts=L.max_attempts,
            threads=ap.threads, fused_kl=self.spec.engine.fused_kl) for g in groups]
        ids = ray.get([a.get_worker_id.remote() for a in actors], timeout=600)
        slots = [_Slot(a, g, w) for a, g, w in zip(actors, groups, ids, strict=True)]
        self.worker_ids.update(ids)
        for slot in slots:
            slot.ref = slot.actor.run.remote()
        return slots

    def _fail_in_flight(self, worker_id: str, why: str) -> None:
        # A dead worker's units count as a failed attempt (not a release): a unit that kills
        # its worker every time must end `failed`, not loop forever.
        for key in self.store.leased_by(worker_id, self.sweep):
            self.store.fail(key, worker_id, why, self.spec.lease.max_attempts)

    def _pick_group(self, open_groups: dict[Any, dict[str, int]],
                    planned: list[str] = ()) -> str | None:
        # The group with the most open cells per actor already on it.
        on: dict[str, int] = {}
        for g in [s.group for s in self.slots] + list(planned):
            on[g] = on.get(g, 0) + 1
        best = None
        for g, d in open_groups.items():
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
                self.store.set_sweep_status(self.sweep, "running")
                nodes = [n for n in ray.nodes() if n.get("Alive")]
                ap = actor_plan(self.spec.resources, ray.cluster_resources(), len(nodes),
                                self.actors_override)
                cls = make_actor_class(max_restarts=2, max_task_retries=0)
                groups: list[str] = []
                for _ in range(ap.n):
                    g = self._pick_group(open_groups, groups)
                    if g is None:
                        break
                    groups.append(g)
                self.slots.extend(self._start_actors(groups, ap, cls))
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
                    ray.kill(slot.actor, no_restart=True)
                    self.slots.remove(slot)
                    g = self._pick_group(self.store.open_by_group(self.sweep))
                    if g is not None:
                        self.slots.append(self._start_actor(g, ap, cls))
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
                        ray.kill(slot.actor, no_restart=True)
                        self.slots.remove(slot)
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
        deadline = time.monotonic() + 120
        while not isinstance(exc, ActorDiedError):
            try:
                slot.worker_id = ray.get(slot.actor.get_worker_id.remote(), timeout=60)
                self.worker_ids.add(slot.worker_id)
                slot.ref = slot.actor.run.remote()
                return
            except ActorUnavailableError as again:  # still restarting
                if time.monotonic() > deadline:
                    exc = again
                    break
                time.sleep(0.3)
            except (RayActorError, ray.exceptions.GetTimeoutError) as again:
                exc = again
                break
        # Gone for good: free its resources first, or the new actor may never be scheduled.
        ray.kill(slot.actor, no_restart=True)
        self.slots.remove(slot)
        fresh = self._start_actor(slot.group, ap, cls)
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
