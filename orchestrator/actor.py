"""The worker: one process that owns one loaded model and runs units pulled from the database.

`UnitRunner` is a plain class (testable without Ray); `SweepActor` is the same as a Ray actor.
Per unit: lease -> compute_responses -> UNIT_FIELDS columns -> NaN/inf check -> shard -> complete.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import traceback
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from orchestrator import store_adapter
from tasks.errors import UnisweepError, is_environment_error
from tasks.layout import SHARD_SCHEMA

# Float columns that carry responses: a NaN or inf in any of them is never data.
RESPONSE_COLUMNS = ("r", "r_attn", "r_mlp", "kl")
# Seconds each unit sleeps before computing (tests kill workers mid-unit with it); unset: 0.
FAULT_DELAY_ENV = "UNISWEEP_FAULT_DELAY_S"


# Consecutive units failed by the machine (disk full, read-only) before a worker gives up.
ENV_ERRORS_BEFORE_STOP = 3
ENV_BACKOFF_S = 2.0  # wait after the k-th such failure: ENV_BACKOFF_S * 2**(k-1), at most 30 s


class WorkerEnvironmentError(UnisweepError):
    """A worker stopped because its machine keeps failing units (disk full, no permission)."""


class NonFiniteResponse(UnisweepError):
    """The engine returned NaN or inf (for example float16/bfloat16 overflow)."""


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def check_finite(table: pa.Table) -> None:
    """Raise NonFiniteResponse naming the columns and row counts with NaN or inf."""
    bad = []
    for name in RESPONSE_COLUMNS:
        if name not in table.column_names:
            continue
        col = table.column(name)
        finite = pc.is_finite(col)  # null stays null (r_attn at l = L is NULL by design)
        n_bad = int(pc.sum(pc.invert(finite.fill_null(True))).as_py() or 0)
        if n_bad:
            bad.append(f"{name}: {n_bad} of {len(col)} rows")
    if bad:
        raise NonFiniteResponse("non-finite response (NaN or inf; in float16/bfloat16 usually an "
                                "overflow) in " + "; ".join(bad))


def add_unit_columns(table: pa.Table, *, sweep: str, unit_key: str, model: str, dtype: str,
                     T: int, n_layers: int) -> pa.Table:
    """Prefix the engine's columns with the UNIT_FIELDS, in SHARD_SCHEMA order and types."""
    n = table.num_rows
    consts = {"sweep": sweep, "unit_key": unit_key, "model": model, "dtype": dtype, "T": T,
              "n_layers": n_layers}
    cols = []
    for f in SHARD_SCHEMA:
        if f.name in consts:
            cols.append(pa.array([consts[f.name]] * n, type=f.type))
        else:
            cols.append(table.column(f.name).cast(f.type))
    return pa.Table.from_arrays(cols, schema=SHARD_SCHEMA)


class UnitRunner:
    """Runs the units of one group (one model + dtype) of one sweep until none is left."""

    def __init__(self, db_url: str | None, sweep_id: Any, sweep: str, group: str, output_dir: str,
                 *, ttl_s: float = 60.0, heartbeat_s: float = 10.0, max_attempts: int = 3,
                 device: str | None = None, threads: int | None = None,
                 idle_poll_s: float = 0.5) -> None:
        self.db_url, self.sweep_id, self.sweep, self.group = db_url, sweep_id, sweep, group
        self.output_dir = output_dir
        self.ttl_s, self.heartbeat_s, self.max_attempts = ttl_s, heartbeat_s, max_attempts
        self.idle_poll_s = idle_poll_s
        self.threads = threads
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
            import ray

            return ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 (not in a Ray worker)
            return None

    def _get_store(self) -> Any:
        if self._store is None:
            from db.retry import connect_resilient

            # Every call rides out a database outage (bounded); past it, run() stops.
            self._store = connect_resilient(self.db_url)
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

    def _model(self, params: dict[str, Any]) -> Any:
        if self._lm is None:
            import torch

            from tasks.models import load_model

            if self.threads:
                torch.set_num_threads(self.threads)  # the CPUs Ray gave this actor, no more
            self._lm = load_model(params["run"]["model"], dtype=params["dtype"], device=self.device)
            store = self._get_store()
            store.register_worker(self.worker_id, socket.gethostname(), self.device,
                                  params["run"]["model_id"])
        return self._lm

    # ---- one unit ----

    def compute_unit(self, key: str, params: dict[str, Any]) -> pa.Table:
        """The shard table of one unit (no database, no file): engine + unit columns + checks."""
        from tasks.engine import compute_responses

        lm = self._model(params)
        # Fault injection for the kill tests: make a unit last long enough to be killed in.
        delay = float(os.environ.get(FAULT_DELAY_ENV, "0") or 0)
        if delay > 0:
            time.sleep(delay)
        prompts = _prompts(lm, params)
        dirs = _directions(lm, params)
        table = compute_responses(
            lm, prompts, lps=[params["lp"]], positions=list(params["positions"]),
            # float(): PostgreSQL's JSONB hands a large eps (1e30) back as an integer.
            eps=[float(e) for e in params["eps"]], directions=dirs, linear=bool(params["linear"]),
            record_layers=params["record"]["layers"], record_positions=params["record"]["positions"],
        )
        check_finite(table)
        return add_unit_columns(table, sweep=self.sweep, unit_key=key, model=lm.model_id,
                                dtype=params["dtype"], T=params["prompt"]["T"],
                                n_layers=lm.n_layers)

    def _run_one(self, unit: Any) -> str:
        from db.shards import write_shard

        store = self._get_store()
        t0 = time.perf_counter()
        try:
            table = self.compute_unit(unit.key, unit.params)
            info = write_shard(table, self.output_dir, self.sweep, unit.key)
        except Exception as exc:  # noqa: BLE001 (any failure of a unit is recorded, the sweep goes on)
            msg = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, UnisweepError):
                msg += "\n" + "".join(traceback.format_exc(limit=-3))
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
        return str(store.complete(unit.key, self.worker_id, info, time.perf_counter() - t0))

    # ---- the loop ----

    def run(self, max_units: int | None = None) -> dict[str, Any]:
        """Lease and run units of this group until the group is finished (or stop/max_units).

        Returns counts by outcome. When nothing is leasable but other workers still hold
        leases, it waits: their leases may expire (a dead worker) and come back here.
        Raises WorkerEnvironmentError (one line, picklable for Ray) when the database stays
        unreachable past its outage budget or the machine keeps failing units.
        """
        from db.session import DatabaseError

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
            leased = store.lease(self.worker_id, 1, self.ttl_s, sweep_id=self.sweep_id,
                                 group=self.group)
            if not leased:
                if store_adapter.group_finished(store, self.sweep, self.group):
                    break
                self._stop.wait(self.idle_poll_s)
                continue
            unit = leased[0]
            with self._lock:
                self._current = [unit.key]
            outcome = self._run_one(unit)
            with self._lock:
                self._current = []
            counts["units"] += 1
            counts[outcome] = counts.get(outcome, 0) + 1
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
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _prompts(lm: Any, params: dict[str, Any]) -> list[Any]:
    from tasks.prompts import make_prompts

    p = params["prompt"]
    out = []
    kinds = [k for k in p["kinds"] if k != "text"]
    if kinds:
        # Prompt k is the same for any count > k (tasks.prompts draws it from (seed, k)).
        prompts = make_prompts(lm.token_space, T=p["T"], count=p["id"] + 1, seed=p["seed"],
                               kinds=tuple(kinds), max_positions=lm.max_positions)
        out = [q for q in prompts if q.id == p["id"]]
    if "text" in p["kinds"]:
        out.append(text_window(lm, params["run"]["text_file"], p["T"], p["id"], p.get("text_sha256")))
    return out


def text_window(lm: Any, path: str, T: int, pid: int, sha256: str | None = None) -> Any:
    """Text prompt `pid`: BOS + the pid-th window of 2T tokens of the file (same length as
    the repeat/control prompts, so all kinds of a unit share batched passes)."""
    import torch

    from tasks.prompts import Prompt

    if lm.tokenizer is None:
        raise UnisweepError(f"prompts.kinds: 'text' needs a model with a tokenizer; {lm.model_id} has none")
    with open(path, "rb") as fh:
        data = fh.read()
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise UnisweepError(f"prompts.text_file {path} changed since the sweep was planned")
    ids = lm.tokenizer(data.decode("utf-8"), add_special_tokens=False)["input_ids"]
    need = (pid + 1) * 2 * T
    if len(ids) < need:
        raise UnisweepError(f"prompts.text_file: {len(ids)} tokens, prompt {pid} needs {need} "
                            f"(count x 2T)")
    bos = [lm.token_space.bos_token_id] if lm.token_space.bos_token_id is not None else []
    window = bos + list(ids[pid * 2 * T:need])
    return Prompt(pid, "text", 0, T, torch.tensor(window, dtype=torch.int64))


def _directions(lm: Any, params: dict[str, Any]) -> Any:
    d = params["directions"]
    if d["family"] == "file":
        from tasks.directions import load_directions

        path = params["run"]["directions_file"]
        with open(path, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        if digest != d["sha256"]:
            raise UnisweepError(f"directions file {path} changed since the sweep was planned "
                                f"(sha256 {digest[:12]} != {d['sha256'][:12]})")
        return load_directions(path, lm.d_model)
    from tasks.directions import random_directions

    return random_directions(lm.d_model, count=d["count"], seed=d["seed"])


def make_actor_class(**options: Any) -> Any:
    """UnitRunner as a Ray actor class; two threads so stop() and ping() answer during run()."""
    import ray

    return ray.remote(max_concurrency=3, **options)(UnitRunner)
