"""The driver: plan a spec into the database, start one actor per GPU (or CPU actors), watch them.

It restarts dead actors and fails their in-flight units (counted attempts), shows progress
from the database, and on Ctrl-C stops the actors and releases their leases. The database,
not this process, knows what is done: a killed driver loses at most the units in flight.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import store_adapter
from orchestrator.actor import make_actor_class
from orchestrator.model_meta import MetaFn, model_meta
from orchestrator.planner import Plan, plan, sweep_hash
from orchestrator.spec import Resources, SweepSpec
from tasks.errors import InvalidInput, UnisweepError

log = logging.getLogger("unisweep.orchestrator")
PROJECT_ROOT = Path(__file__).absolute().parents[1]  # not resolve(): keep a symlinked checkout
# Never shipped to a cluster: environments, results, caches.
SHIP_EXCLUDES = [".venv", ".git", "runs", "unisweep-out", "**/__pycache__", "*.parquet", "*.db",
                 ".pytest_cache", ".ruff_cache"]


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


# ---- Ray ------------------------------------------------------------------------------------


def init_ray(address: str | None = None, *, num_cpus: int | None = None, ship: bool = True) -> None:
    """Local Ray by default; `address` ("auto" or ray://...) joins a cluster, shipping the project."""
    import ray

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
    check_address(address)
    try:
        with warnings.catch_warnings():  # the failure below says it in one line
            warnings.simplefilter("ignore", UserWarning)
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False,
                     logging_level=logging.WARNING)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
        # No cluster at that address (Ray's client gives up after its retries): the user's
        # environment, so one line. Nothing was leased yet.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnisweepError(f"--address {address}: cannot connect to the Ray cluster ({first})") from None


def check_address(address: str, timeout_s: float = 10.0) -> None:
    """For ray://HOST:PORT, one TCP connect first: Ray's client retries a closed port for
    about a minute before it says so; a refused or unroutable port fails here at once."""
    import socket
    from urllib.parse import urlsplit

    if not address.startswith("ray://"):
        return
    try:
        parts = urlsplit(address)
        host, port = parts.hostname, parts.port or 10001
    except ValueError as exc:
        raise InvalidInput("--address", "auto or ray://HOST[:PORT]", address, detail=str(exc)) from None
    if not host:
        raise InvalidInput("--address", "auto or ray://HOST[:PORT]", address)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UnisweepError(f"--address {address}: cannot connect to the Ray cluster "
                            f"({host}:{port}: {reason})") from None


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


# ---- plan + submit ----------------------------------------------------------------------------


def submit(spec: SweepSpec, db_url: str | None = None, meta_fn: MetaFn = model_meta) -> tuple[Any, Plan, int]:
    """Validate against the models, plan, and add the new units: (store, plan, units added).

    Everything that can be wrong with the spec is raised before the database is touched.
    """
    from db.store import UnitSpec, connect

    base_plan = plan(spec, meta_fn=meta_fn)  # validates every model before any write
    check_output_dir(spec.output)
    store = connect(db_url or spec.database, output_dir=spec.output)
    existing = store_adapter.existing_params(store, spec.name)
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


# ---- execution --------------------------------------------------------------------------------


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
        self.store, self.sweep, self.spec, self.db_url = store, sweep, spec, db_url
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
        import ray

        L = self.spec.lease
        actors = [cls.options(**ap.options).remote(
            self.db_url, self.info.id, self.sweep, g, self.info.output_dir,
            ttl_s=L.ttl_s, heartbeat_s=L.heartbeat_s, max_attempts=L.max_attempts,
            threads=ap.threads) for g in groups]
        ids = ray.get([a.get_worker_id.remote() for a in actors], timeout=600)
        slots = [_Slot(a, g, w) for a, g, w in zip(actors, groups, ids, strict=True)]
        for slot in slots:
            slot.ref = slot.actor.run.remote()
        return slots

    def _fail_in_flight(self, worker_id: str, why: str) -> None:
        # A dead worker's units count as a failed attempt (not a release): a unit that kills
        # its worker every time must end `failed`, not loop forever.
        t = self.store.table_arrow("units", self.sweep)
        rows = [k for k, o, s in zip(t.column("unit_key").to_pylist(),
                                     t.column("lease_owner").to_pylist(),
                                     t.column("status").to_pylist(), strict=True)
                if o == worker_id and s == "leased"]
        for key in rows:
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
        import ray

        t0 = time.perf_counter()
        start_status = self.store.status(self.sweep)
        open_groups = store_adapter.open_by_group(self.store, self.sweep)
        interrupted = False
        progress = _Progress(self.store, self.sweep, enabled=self.progress)
        old_handler = signal.getsignal(signal.SIGTERM)
        if _is_main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)
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
        finally:
            if _is_main_thread():
                signal.signal(signal.SIGTERM, old_handler)
            progress.close()
        st = self.store.status(self.sweep)
        if not interrupted:
            open_units = st.counts["pending"] + st.counts["leased"]
            final = "failed" if st.counts["failed"] else ("done" if open_units == 0 else "stopped")
        else:
            final = "stopped"
        self.store.set_sweep_status(self.sweep, final)
        return RunSummary(self.sweep, st.counts, st.cells_done, st.cells_total,
                          st.cells_done - start_status.cells_done, time.perf_counter() - t0,
                          self.deaths, interrupted, st.failed)

    def _watch(self, ap: ActorPlan, cls: Any, progress: _Progress) -> None:
        import ray
        from ray.exceptions import RayActorError

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
                    g = self._pick_group(store_adapter.open_by_group(self.store, self.sweep))
                    if g is not None:
                        self.slots.append(self._start_actor(g, ap, cls))
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
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        deadline = time.monotonic() + 120
        while not isinstance(exc, ActorDiedError):
            try:
                slot.worker_id = ray.get(slot.actor.get_worker_id.remote(), timeout=60)
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

    def _stop_all(self, grace_s: float = 3.0) -> None:
        """Ctrl-C: stop after the unit in flight if quick, else kill; release every lease."""
        import ray

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
            self.store.release(s.worker_id)
        self.slots.clear()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _Progress:
    """A Rich progress bar fed from the database: cells done, cells/s and ETA of this run."""

    def __init__(self, store: Any, sweep: str, enabled: bool) -> None:
        self.store, self.sweep = store, sweep
        start = store.status(sweep)
        self.start_cells = start.cells_done
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.bar: Any = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("cells  {task.fields[rate]} cells/s  ETA {task.fields[eta]}"),
                TimeElapsedColumn(),
            )
            self.task = self.bar.add_task(sweep, total=start.cells_total,
                                          completed=start.cells_done, rate="-", eta="-")
            self.bar.start()

    def update(self, force: bool = False) -> Any:
        """Refresh from the database at most once a second; returns the SweepStatus read."""
        now = time.perf_counter()
        if not force and now - self.last < 1.0:
            return None
        self.last = now
        st = self.store.status(self.sweep)
        if self.bar is not None:
            rate = (st.cells_done - self.start_cells) / max(now - self.t0, 1e-9)
            left = st.cells_total - st.cells_done
            eta = _fmt_s(left / rate) if rate > 0 else "-"
            self.bar.update(self.task, total=st.cells_total, completed=st.cells_done,
                            rate=f"{rate:.1f}", eta=eta)
        return st

    def close(self) -> None:
        if self.bar is not None:
            self.update(force=True)
            self.bar.stop()


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def load_sweep_spec(store: Any, sweep: str) -> SweepSpec:
    """The spec a sweep was created with (for `resume`), validated again."""
    from orchestrator.spec import spec_from_dict

    info = store.get_sweep(sweep)
    try:
        return spec_from_dict(info.spec)
    except InvalidInput as exc:
        raise UnisweepError(f"sweep {sweep!r}: its stored spec no longer validates: {exc}") from None
