"""The driver waits out an actor restart instead of failing: Ray answers ActorUnavailableError
while a killed worker process is being replaced (seen in the fault-injection test when a
worker was killed during a driver's start-up, which then ended in a traceback). Ray's answers
are stood in for here; tests/test_faults_sweep.py kills real workers."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorUnavailableError

from orchestrator import driver


class _Actor:
    """Just the remote method _worker_id calls."""

    class get_worker_id:  # noqa: N801 (Ray's actor-method shape: actor.method.remote())
        @staticmethod
        def remote() -> str:
            return "ref"


def _answers(monkeypatch, unavailable: int, clock: list[float]) -> list[float]:
    """ray.get raises ActorUnavailableError `unavailable` times, then gives the worker id;
    each try costs one second of a fake clock. Returns the timeouts it was asked with."""
    asked: list[float] = []

    def get(ref, timeout=None):
        assert ref == "ref"
        asked.append(timeout)
        clock[0] += 1.0
        if len(asked) <= unavailable:
            raise ActorUnavailableError("The actor is temporarily unavailable", None)
        return "worker-2"

    monkeypatch.setattr(driver.ray, "get", get)
    monkeypatch.setattr(driver.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(driver.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    return asked


def test_worker_id_waits_out_a_restart(monkeypatch):
    clock = [100.0]
    asked = _answers(monkeypatch, unavailable=3, clock=clock)
    assert driver._worker_id(_Actor(), timeout_s=60) == "worker-2"
    assert len(asked) == 4
    # Each try is bounded by what is left of the deadline.
    assert asked[0] == 60 and all(b < a for a, b in zip(asked, asked[1:]))


def test_worker_id_gives_up_at_its_deadline(monkeypatch):
    clock = [0.0]
    asked = _answers(monkeypatch, unavailable=10**6, clock=clock)
    with pytest.raises(ActorUnavailableError):
        driver._worker_id(_Actor(), timeout_s=10)
    assert 5 <= len(asked) <= 10 and clock[0] <= 12
