"""A real Ray head for the cluster tests, as `ray start --head --block` makes it on a cluster.

Own HOME (Ray 2.60 writes ~/.ray/auth_token there), own temp dir, every port chosen free
(other Ray sessions may run on this machine), dashboard on 127.0.0.1; stopped by killing
the process group it was started in (never `ray stop`, which stops every Ray on the host).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).absolute().parents[1]
START_TIMEOUT_S = 180.0


@dataclass
class RayHead:
    proc: subprocess.Popen
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]  # HOME, PATH, ... a client of this head runs with
    log: Path

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        # Processes that left the group (setsid) but belong to this head's session folder.
        _kill_leftovers(self.env["UNISWEEP_TEST_RAY_TMP"])


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def start_head(tmp: Path, num_cpus: int = 2, env: dict[str, str] | None = None) -> RayHead:
    """Start a head node with the dashboard (job server) on 127.0.0.1; wait until jobs are accepted."""
    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    ray_tmp = Path("/tmp") / f"ush{os.getpid()}_{time.monotonic_ns() % 10**6}"  # short: socket paths
    gcs, dash, agent_http, agent_grpc, rt_agent, metrics, node_mgr, obj_mgr, client = _free_ports(9)
    e = dict(os.environ)
    e.update(env or {})
    e["HOME"] = str(home)
    e["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), e.get("PATH", "")])
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH", "")) if p)
    e["RAY_USAGE_STATS_ENABLED"] = "0"
    e["UNISWEEP_TEST_RAY_TMP"] = str(ray_tmp)
    log = tmp / "ray-head.log"
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
           f"--port={gcs}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_agent}",
           f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", f"--ray-client-server-port={client}",
           f"--num-cpus={num_cpus}", f"--temp-dir={ray_tmp}", "--disable-usage-stats"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=e, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=tmp)
    head = RayHead(proc, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", e, log)
    try:
        _wait_for_jobs_api(head)
    except BaseException:
        head.stop()
        raise
    return head


def _wait_for_jobs_api(head: RayHead) -> None:
    # The dashboard answers before its agent can take jobs: ask the jobs API itself.
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            raise RuntimeError(f"ray start exited {head.proc.returncode}: {head.log.read_text()[-2000:]}")
        token = head.env.get("RAY_AUTH_TOKEN")
        req = urllib.request.Request(f"{head.dashboard_url}/api/version",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=3) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"Ray head not up in {START_TIMEOUT_S:.0f} s: {head.log.read_text()[-2000:]}")


def _kill_leftovers(ray_tmp: str) -> None:
    # Only processes whose command line names this head's own temp folder.
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ray_tmp in cmdline:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
