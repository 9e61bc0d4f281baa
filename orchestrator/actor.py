"""The worker: one process that owns one loaded model and runs units pulled from the database.

`UnitRunner` is a plain class (testable without Ray); `SweepActor` is the same as a Ray actor.
Per lease: up to `batch` units of the group -> tasks.run_unit.run_units (the science; units
that differ only in lp and positions share one engine call, so their positions share passes)
-> per unit: shard -> complete (or fail), so each unit is still done exactly once on its own.
Heartbeats cover every unit held meanwhile.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
import uuid
from typing import Any

import pyarrow as pa
import torch

from db.retry import Resilient
from db.session import DatabaseError
from db.shards import write_shard
from db.store import connect
from tasks.errors import UnisweepError, is_environment_error
from tasks.kl import set_fused_kl_mode
from tasks.models import load_model
from tasks.run_unit import run_unit, run_unit_tables, run_units
from tasks.work import UnitWork

# Consecutive units failed by the machine (disk full, read-only) before a worker gives up.
ENV_ERRORS_BEFORE_STOP = 3
ENV_BACKOFF_S = 2.0  # wait after the k-th such failure: ENV_BACKOFF_S * 2**(k-1), at most 30 s


class WorkerEnvironmentError(UnisweepError):
    """A worker stopped because its machine keeps failing units (disk full, no permission)."""


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class UnitRunner:
    """Runs the units of one group (one model + dtype) of one sweep until none is left."""

    def __init__(self, db_url: str | None, sweep_id: Any, sweep: str, group: str, output_dir: str,
                 *, ttl_s: float = 60.0, heartbeat_s: float = 10.0, max_attempts: int = 3,
                 device: str | None = None, threads: int | None = None,
                 idle_poll_s: float = 0.5, gpus: float = 0.0, env_ref: Any = None,
                 batch: int = 1, fused_kl: str = "off") -> None:
        # env_ref: [ObjectRef of {name: value}] from the driver (database URL, HF_TOKEN, AWS_*),
        # set into this process's environment before the database, the hub or the object
        # store is touched; a one-element list so that Ray hands over the reference only.
        if env_ref:
            import ray

            os.environ.update(ray.get(env_ref[0]))
        self.db_url, self.sweep_id, self.sweep, self.group = db_url, sweep_id, sweep, group
        self.output_dir = output_dir
        self.ttl_s, self.heartbeat_s, self.max_attempts = ttl_s, heartbeat_s, max_attempts
        self.idle_poll_s = idle_poll_s
        self.batch = max(1, int(batch))  # units per lease (spec lease.batch)
        self.threads = threads
        self.gpus = gpus  # GPUs Ray gave this actor: more than one spreads the model over them
        self.fused_kl = fused_kl  # the spec's engine.fused_kl, applied when the model loads
        self.device = device or _default_device()
        self.worker_id = new_worker_id()
        self._store: Any = None
        self._lm: Any = None
        self._current: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._hb: threading.Thread | None = None
        self._env_errors: list[str] = []  # consecutive environment failures (disk full, ...)

    # ---- plumbing ----

    def get_worker_id(self) -> str:
        return self.worker_id

    def node_id(self) -> str | None:
        """The Ray node this worker runs on (None outside Ray)."""
        try:
            import ray  # only inside a Ray worker, where it is imported already

            return ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 (not in a Ray worker)
            return None

    def _get_store(self) -> Any:
        if self._store is None:
            # Every call rides out a database outage (bounded); past it, run() stops.
            self._store = Resilient(Resilient(None).run(connect, self.db_url))
        return self._store

    def _heartbeat_loop(self) -> None:
        # Keeps this worker's leases alive while a (long) unit computes; a dead process stops
        # heartbeating and its leases expire, which is how other workers reclaim them.
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                keys = list(self._current)
            try:
                store = self._get_store()
                if keys:
                    store.heartbeat(self.worker_id, keys, self.ttl_s)
                store.worker_heartbeat(self.worker_id)
            except Exception:  # noqa: BLE001 (a missed beat is retried; the lease TTL covers it)
                pass

    def stop(self) -> str:
        """Ask run() to return after the unit in progress (Ctrl-C path)."""
        self._stop.set()
        return self.worker_id

    # ---- the model ----

    def _model(self, work: UnitWork) -> Any:
        if self._lm is None:
            if self.threads:
                torch.set_num_threads(self.threads)  # the CPUs Ray gave this actor, no more
            self._lm = load_model(work.run.model, dtype=work.dtype, device=self.device,
                                  gpus=max(1, int(self.gpus)))
            set_fused_kl_mode(self.fused_kl, self._lm.device)
            store = self._get_store()
            store.register_worker(self.worker_id, socket.gethostname(), self.device, work.run.model_id)
        return self._lm

    # ---- one unit ----

    def compute_unit(self, key: str, params: dict[str, Any]) -> pa.Table:
        """The shard table of one unit (no database, no file): tasks.run_unit on this model."""
        work = UnitWork.from_json(params)
        return run_unit(self._model(work), work, sweep=self.sweep, unit_key=key)

    def compute_unit_tables(self, key: str, params: dict[str, Any]) -> tuple[pa.Table, pa.Table | None]:
        """compute_unit's table and, when the unit records heads, its head_responses table."""
        work = UnitWork.from_json(params)
        return run_unit_tables(self._model(work), work, sweep=self.sweep, unit_key=key)

    def compute_units_tables(self, units: list[Any]) -> list[Any]:
        """compute_unit_tables of each leased unit, in order: (table, head table) or the
        exception that stopped it. Several units go through tasks.run_units (shared engine
        calls, one unit at a time if a merged call fails); one goes through
        compute_unit_tables. This is what the run loop calls for every lease."""
        if len(units) == 1:
            try:
                return [self.compute_unit_tables(units[0].key, units[0].params)]
            except Exception as exc:  # noqa: BLE001 (recorded against the unit)
                return [exc]
        try:
            works = [UnitWork.from_json(u.params) for u in units]
            lm = self._model(works[0])
        except Exception as exc:  # noqa: BLE001 (bad params, a model that will not load)
            return [exc] * len(units)
        return run_units(lm, works, sweep=self.sweep, unit_keys=[u.key for u in units])

    def _finish_one(self, unit: Any, result: Any, compute_s: float) -> str:
        """Write one unit's shard and complete it, or record its failure; the outcome."""
        store = self._get_store()
        t0 = time.perf_counter()
        try:
            if isinstance(result, BaseException):
                raise result
            table, head_table = result
            info = write_shard(table, self.output_dir, self.sweep, unit.key, heads=head_table)
        except Exception as exc:  # noqa: BLE001 (any failure of a unit is recorded, the sweep goes on)
            msg = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, UnisweepError):
                msg += "\n" + "".join(traceback.format_exception(exc, limit=-3))
            # A full or read-only disk is the machine's fault: the unit keeps its attempts
            # and this worker backs off (run()); a NaN or a bad input uses one.
            environment = is_environment_error(exc)
            outcome = store.fail(unit.key, self.worker_id, msg, self.max_attempts,
                                 environment=environment)
            if environment:
                self._env_errors.append(msg.splitlines()[0])
                return "environment"
            return str(outcome)
        self._env_errors.clear()
        return str(store.complete(unit.key, self.worker_id, info,
                                  compute_s + time.perf_counter() - t0))

    def _run_batch(self, units: list[Any], counts: dict[str, Any]) -> str | None:
        """Compute the leased units together, then finish each; the last outcome. After an
        environment failure the units not yet written go back (their attempts returned)."""
        t0 = time.perf_counter()
        results = self.compute_units_tables(units)
        # compute_s per unit: the shared compute split by cells (what the unit cost).
        cells = [max(1, int(u.n_cells or 0)) for u in units]
        share = (time.perf_counter() - t0) / sum(cells)
        outcome = None
        for n, (unit, result) in enumerate(zip(units, results, strict=True)):
            outcome = self._finish_one(unit, result, share * cells[n])
            with self._lock:
                self._current = [k for k in self._current if k != unit.key]
            counts["units"] += 1
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome == "environment" and n + 1 < len(units):
                self._get_store().release(self.worker_id)
                break
        return outcome

    # ---- the loop ----

    def run(self, max_units: int | None = None) -> dict[str, Any]:
        """Lease and run units of this group until the group is finished (or stop/max_units).

        Returns counts by outcome. When nothing is leasable but other workers still hold
        leases, it waits: their leases may expire (a dead worker) and come back here.
        Raises WorkerEnvironmentError (one line, picklable for Ray) when the database stays
        unreachable past its outage budget or the machine keeps failing units.
        """
        try:
            return self._run(max_units)
        except DatabaseError as exc:
            raise WorkerEnvironmentError(str(exc)) from None

    def _run(self, max_units: int | None = None) -> dict[str, Any]:
        self._stop.clear()
        if self._hb is None or not self._hb.is_alive():
            self._hb = threading.Thread(target=self._heartbeat_loop, daemon=True)
            self._hb.start()
        store = self._get_store()
        counts: dict[str, Any] = {"worker_id": self.worker_id, "units": 0}
        while not self._stop.is_set() and (max_units is None or counts["units"] < max_units):
            want = self.batch if max_units is None else min(self.batch, max_units - counts["units"])
            leased = store.lease(self.worker_id, want, self.ttl_s, sweep_id=self.sweep_id,
                                 group=self.group)
            if not leased:
                if store.group_finished(self.sweep_id, self.group):
                    break
                self._stop.wait(self.idle_poll_s)
                continue
            if len(leased) > 1 and any(u.attempts > 1 for u in leased):
                # A retried unit may be one that kills its worker: it runs alone, so that a
                # crash costs no other unit an attempt. Give the lease back (attempts
                # restored) and take the next unit on its own.
                store.release(self.worker_id)
                leased = store.lease(self.worker_id, 1, self.ttl_s, sweep_id=self.sweep_id,
                                     group=self.group)
                if not leased:
                    continue
            with self._lock:
                self._current = [u.key for u in leased]
            outcome = self._run_batch(leased, counts)
            with self._lock:
                self._current = []
            if outcome == "environment":
                if len(self._env_errors) >= ENV_ERRORS_BEFORE_STOP:
                    # The same machine problem every time: stop and say it, leaving the
                    # units pending with their attempts for `unisweep resume` once fixed.
                    raise WorkerEnvironmentError(
                        f"{len(self._env_errors)} units in a row failed on this machine: "
                        f"{self._env_errors[-1]}")
                self._stop.wait(min(30.0, ENV_BACKOFF_S * 2 ** (len(self._env_errors) - 1)))
        return counts


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_actor_class(**options: Any) -> Any:
    """UnitRunner as a Ray actor class; two threads so stop() and ping() answer during run()."""
    import ray  # imported on use: the worker side never needs it at import time

    return ray.remote(max_concurrency=3, **options)(UnitRunner)
