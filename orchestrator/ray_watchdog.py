"""A watchdog for the local Ray session a driver starts: when the driver dies, so does Ray.

After a driver is SIGKILLed, Ray's GCS and raylet exit within about two seconds, but the
dashboard and runtime-env agents first try to report the raylet's unexpected death to the
(dead) GCS with a fixed 60 s timeout, and live that long. The watchdog is a small process
holding the read end of a pipe from the driver: the driver's death closes it (no polling),
and the watchdog then ends the processes of that one session that are still there.

    python -m orchestrator.ray_watchdog   (started by start_watchdog(), never by hand)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SCAN_S = 2.0  # how often the session's processes are listed while the driver lives
GRACE_S = 2.0  # Ray's own cleanup gets this long before the watchdog steps in


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every process below `root` (Linux /proc)."""
    parent_of: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                parent_of[int(entry.name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in parent_of.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, int] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out[child] = parent_of[child][1]
                todo.append(child)
    return out


def _end(procs: dict[int, int]) -> int:
    """SIGTERM, then SIGKILL, the processes of `procs` that are still the same processes."""

    def alive() -> list[int]:
        return [p for p, start in procs.items() if (_stat(p) or (0, -1))[1] == start]

    ended = 0
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 1.0)):
        left = alive()
        for pid in left:
            try:
                os.kill(pid, sig)
                ended += sig == signal.SIGTERM
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    return ended


def watch(driver_pid: int) -> None:
    """Run in the watchdog process: list the driver's session until stdin closes, then end it."""
    seen: dict[int, int] = {}
    closed = threading.Event()

    def wait_eof() -> None:
        try:
            while sys.stdin.buffer.read(1):
                pass
        finally:
            closed.set()

    threading.Thread(target=wait_eof, daemon=True).start()
    while not closed.wait(SCAN_S):
        seen.update(descendants(driver_pid))
    seen.pop(os.getpid(), None)
    time.sleep(GRACE_S)
    _end(seen)


def start_watchdog() -> subprocess.Popen | None:
    """Start the watchdog for this process's local Ray session (Linux only; else None).

    The pipe's write end stays open in this process only (close_fds), so the watchdog sees
    end-of-file exactly when the driver exits, however it exits.
    """
    if not Path("/proc/self/stat").exists():
        return None
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.ray_watchdog", str(os.getpid())],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )
    return proc


if __name__ == "__main__":
    watch(int(sys.argv[1]))
