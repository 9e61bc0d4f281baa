"""A sweep submitted as a Ray job, exactly as the README's cluster section does it.

A real head (`ray start --head`, token authentication on, dashboard on 127.0.0.1), a client
in another process with only RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, `runtime_env={"working_dir": <checkout>}` and
`unisweep run SPEC --address auto` as the entrypoint: polled to SUCCEEDED, rows counted.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.orch_helpers import ROOT, check_complete, spec_dict, write_spec
from tests.ray_head import RayHead, start_head

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOKEN = secrets.token_hex(16)

# What a user runs on their own machine (README): the jobs SDK, the checkout as working_dir.
CLIENT = r"""
import json, sys, time
from ray.job_submission import JobSubmissionClient, JobStatus
url, root, entrypoint = sys.argv[1:4]
client = JobSubmissionClient(url)
deadline = time.monotonic() + 120
while True:
    try:
        job = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": root})
        break
    except RuntimeError as exc:  # the head's agent is still starting
        if "No available agent" not in str(exc) or time.monotonic() > deadline:
            raise
        time.sleep(2)
deadline = time.monotonic() + 420
while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                     JobStatus.STOPPED):
    if time.monotonic() > deadline:
        break
    time.sleep(1)
print(json.dumps({"status": str(status), "logs": client.get_job_logs(job)[-4000:]}))
"""


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    tmp = tmp_path_factory.mktemp("head")
    # Token authentication as a security-minded head has it: a token in the head's HOME.
    token_file = tmp / "home" / ".ray" / "auth_token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text(TOKEN)
    h = start_head(tmp, num_cpus=2, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN})
    yield h
    h.stop()


def _client(head: RayHead, tmp: Path, entrypoint: str, token: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp / "client-home")  # the client's own HOME: no token file there
    if token is not None:  # as the README says: both variables on the submitting machine
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([sys.executable, "-c", CLIENT, head.dashboard_url, str(ROOT), entrypoint],
                          env=env, cwd=tmp, capture_output=True, text=True, timeout=600)


def test_sweep_as_a_ray_job(head: RayHead, tmp_path: Path) -> None:
    from db.store import connect
    from orchestrator.planner import plan
    from orchestrator.spec import load_spec

    db_url = f"sqlite:///{tmp_path / 'u.db'}"
    spec = write_spec(tmp_path / "s.yaml", spec_dict("job", tmp_path / "out",
                                                      resources={"cpus_per_actor": 1}))
    entrypoint = f"unisweep run {spec} --address auto --db {db_url} --no-progress"

    # Without the token the head refuses the submission (what the README tells users to fix).
    denied = _client(head, tmp_path, entrypoint, token=None)
    assert denied.returncode != 0
    assert "authentication" in (denied.stderr + denied.stdout).lower()

    res = _client(head, tmp_path, entrypoint, token=TOKEN)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["status"] == "SUCCEEDED", out["logs"]
    assert "Failed to merge" not in out["logs"]
    assert "12 done, 0 failed" in out["logs"]

    store = connect(db_url)
    got = check_complete(store, "job", {u.key for u in plan(load_spec(spec)).units})
    assert got["units"] == 12 and got["rows"] > 0
    store.close()
