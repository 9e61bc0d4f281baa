"""What the user sees while a sweep runs, and how they stop it: the progress bar and SIGTERM.

The bar is fed from the database (cells done, cells/s, ETA of this run), never from actors.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def raise_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM handler: stop the way Ctrl-C does (actors stopped, leases released)."""
    raise KeyboardInterrupt


def is_main_thread() -> bool:
    """Signal handlers can only be installed from the main thread."""
    return threading.current_thread() is threading.main_thread()


class SweepProgress:
    """A Rich progress bar fed from the database: cells done, cells/s and ETA of this run."""

    def __init__(self, store: Any, sweep: str, enabled: bool) -> None:
        self.store, self.sweep = store, sweep
        self.enabled = True
        start = store.status(sweep)
        self.start_cells = start.cells_done
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.bar: Any = None
        if enabled:
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
            eta = fmt_s(left / rate) if rate > 0 else "-"
            self.bar.update(self.task, total=st.cells_total, completed=st.cells_done,
                            rate=f"{rate:.1f}", eta=eta)
        return st

    def close(self) -> None:
        if self.bar is not None:
            if self.enabled:  # off after a database outage: no last read
                self.update(force=True)
            self.bar.stop()


def fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
