"""The Ray session: start local Ray, join a cluster (shipping this checkout), or join the
cluster of the Ray job we run in (shipping nothing: the job's runtime env is already set).

What is shipped (the project folder minus environments, results and caches) and which of the
driver's environment variables its actors get (worker_env) are decided here.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tasks.errors import InvalidInput, UnisweepError

PROJECT_ROOT = Path(__file__).absolute().parents[1]  # not resolve(): keep a symlinked checkout
# Never shipped to a cluster: environments, results, caches.
SHIP_EXCLUDES = [".venv", ".git", "runs", "unisweep-out", "**/__pycache__", "*.parquet", "*.db",
                 ".pytest_cache", ".ruff_cache"]
_WATCHDOG: Any = None  # the local Ray session's watchdog process (kept referenced)


# Set by Ray's job supervisor in the environment of a job's entrypoint: the job's runtime env.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

# Secrets and settings the actors need, read from the driver's environment. They travel as a
# Ray object (ray.put) that each actor reads into its environment first: not as a runtime
# env, whose env_vars Ray's runtime_env_agent.log prints in clear on every node, and not as
# an argument value that could end up in a task spec or an error message.
WORKER_ENV_VARS = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
    "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
)


def worker_env(db_url: str) -> dict[str, str]:
    """The environment every actor gets: the database URL and the driver's WORKER_ENV_VARS."""
    from db.urls import ENV_VAR

    env = {k: os.environ[k] for k in WORKER_ENV_VARS if os.environ.get(k)}
    env[ENV_VAR] = db_url
    return env


def in_ray_job() -> bool:
    """True inside `ray job submit ... -- unisweep run ...` (the job's runtime env is set)."""
    return RAY_JOB_ENV in os.environ


def init_ray(address: str | None = None, *, num_cpus: int | None = None, ship: bool = True) -> None:
    """Local Ray by default; `address` ("auto" or ray://...) joins a cluster, shipping the project.

    Inside a Ray job the job's runtime env (its working_dir) already reaches every actor:
    join the job's cluster and ship nothing more (a second working_dir is a conflict).
    """
    import ray  # imported on use: Ray costs seconds to import

    if ray.is_initialized():
        return
    if in_ray_job():
        ray.init(address=address or "auto", log_to_driver=False, logging_level=logging.WARNING)
        return
    if address is None:
        # Local workers inherit the environment: put this checkout first on their path.
        pp = os.environ.get("PYTHONPATH", "")
        if str(PROJECT_ROOT) not in pp.split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), pp) if p)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
        # A SIGKILLed driver would leave Ray's agents alive for a minute (ray_watchdog).
        global _WATCHDOG
        from orchestrator.ray_watchdog import start_watchdog

        _WATCHDOG = start_watchdog()
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
