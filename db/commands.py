"""CLI commands of the result database: `db upgrade`, `status`, `verify`, `gc`.

The database is `--db URL`, else env UNISWEEP_DB, else `--out DIR`/unisweep.db (default runs/).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:  # SQLAlchemy and Alembic load on use: `unisweep --help` stays instant
    from db.store import Store

console = Console()

DbOpt = typer.Option(None, "--db", help="Database URL (sqlite:///FILE or postgresql://...); default: env UNISWEEP_DB, else OUT/unisweep.db.")
OutOpt = typer.Option("runs", "--out", help="Run folder holding unisweep.db when no --db / UNISWEEP_DB is given.")


def _open(db: str | None, out: str) -> Store:
    # Reading commands never create a database: a wrong path is an error, not an empty run.
    from db.store import connect

    return connect(db, output_dir=out, create=False)


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def _summary(error: str | None) -> str:
    """One line for a table: the worker tag and the last line (a traceback's exception)."""
    lines = [ln for ln in (error or "").strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    tag = re.match(r"^\[[^\]]*\] ", lines[0])
    last = lines[-1].strip()
    return f"{tag.group(0) if tag and len(lines) > 1 else ''}{last}"


def db_upgrade(db: str | None = DbOpt, out: str = OutOpt) -> None:
    """Create or upgrade the database schema to the newest revision."""
    from db.migrate import head_revision
    from db.store import connect

    with connect(db, output_dir=out) as store:
        before, after = store.revisions
    if before == after:
        console.print(f"database {store.url} already at revision {after} (head {head_revision()})")
    else:
        console.print(f"database {store.url} upgraded {before or '<empty>'} -> {after}")


def status(sweep: str = typer.Argument(..., help="Sweep name."), db: str | None = DbOpt, out: str = OutOpt) -> None:
    """Progress of a sweep: units by status, cells/s, ETA and the failed units with their errors."""
    with _open(db, out) as store:
        st = store.status(sweep)
        # Existence and size only (a stat per shard): cheap enough for every status call.
        lost = store.lost_shards(sweep)
    table = Table(title=f"sweep {st.sweep}")
    for col in ("pending", "leased", "done", "failed", "total"):
        table.add_column(col, justify="right")
    c = st.counts
    table.add_row(str(c["pending"]), str(c["leased"]), str(c["done"]), str(c["failed"]), str(st.units_total))
    console.print(table)
    rate = f"{st.cells_per_s:.2f}" if st.cells_per_s is not None else "-"
    pct = 100.0 * st.cells_done / st.cells_total if st.cells_total else 0.0
    console.print(
        f"cells {st.cells_done}/{st.cells_total} ({pct:.1f}%)  cells/s {rate}  ETA {_fmt_s(st.eta_s)}"
        f"  compute {_fmt_s(st.compute_s)}"
        + (f"  expired leases {st.expired_leases}" if st.expired_leases else "")
    )
    if lost:
        console.print(f"{len(lost)} done units have a missing or changed shard (first: "
                      f"{escape(lost[0].key)}: {escape(lost[0].reason)}); `unisweep resume "
                      f"{escape(st.sweep)}` recomputes them")
    if st.failed:
        ft = Table(title="failed units")
        ft.add_column("unit")
        ft.add_column("attempts", justify="right")
        ft.add_column("error")
        for f in st.failed:
            ft.add_row(escape(f.key), str(f.attempts), escape(_summary(f.error)))
        console.print(ft)


def sweeps(db: str | None = DbOpt, out: str = OutOpt) -> None:
    """The sweeps in a database: name, status, units done/total, cells done/total, created."""
    with _open(db, out) as store:
        rows = [(info, store.status(info.id)) for info in store.list_sweeps()]
        url = store.url
    if not rows:
        console.print(f"no sweeps in {url}", highlight=False)
        return
    table = Table()
    for col, right in (("sweep", False), ("status", False), ("units done", True),
                       ("failed", True), ("cells done", True), ("created (UTC)", False)):
        table.add_column(col, justify="right" if right else "left", no_wrap=True)
    for info, st in rows:
        table.add_row(escape(info.name), info.status, f"{st.counts['done']}/{st.units_total}",
                      str(st.counts["failed"]), f"{st.cells_done}/{st.cells_total}",
                      f"{info.created_at:%Y-%m-%d %H:%M}")
    console.print(table)
    console.print(f"{len(rows)} sweep(s) in {escape(url)}", style="dim", highlight=False)


def verify(
    sweep: str = typer.Argument(..., help="Sweep name."),
    db: str | None = DbOpt,
    out: str = OutOpt,
    quick: bool = typer.Option(False, "--quick", help="Skip the sha256 (existence, size and row count only)."),
) -> None:
    """Check every done unit's shard (exists, size, rows, sha256); exit 1 listing the bad ones."""
    with _open(db, out) as store:
        rep = store.verify(sweep, quick=quick)
    if rep.ok:
        console.print(f"sweep {rep.sweep}: {rep.checked} shards verified, all match")
        return
    table = Table(title=f"sweep {rep.sweep}: {len(rep.problems)} of {rep.checked} shards do not match")
    table.add_column("unit")
    table.add_column("path", overflow="fold")
    table.add_column("problem", overflow="fold")
    for p in rep.problems:
        table.add_row(escape(p.key), escape(p.path or "-"), escape(p.reason))
    console.print(table)
    raise typer.Exit(1)


def gc(
    sweep: str = typer.Argument(..., help="Sweep name."),
    db: str | None = DbOpt,
    out: str = OutOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed, remove nothing."),
    in_flight: bool = typer.Option(False, "--include-in-flight", help="Also remove files of units under a live lease (only when no worker runs)."),
) -> None:
    """Remove files in the sweep's shard folder that belong to no done unit (torn, temporary, superseded)."""
    with _open(db, out) as store:
        paths = store.gc(sweep, include_in_flight=in_flight, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for p in paths:
        console.print(f"{verb} {escape(str(p))}")
    console.print(f"sweep {sweep}: {verb} {len(paths)} orphan file(s)")


def register(app: typer.Typer) -> None:
    """Add this package's commands to the `unisweep` app."""
    db_app = typer.Typer(help="Result database administration.", no_args_is_help=True)
    db_app.command("upgrade")(db_upgrade)
    app.add_typer(db_app, name="db")
    app.command("sweeps")(sweeps)
    app.command("status")(status)
    app.command("verify")(verify)
    app.command("gc")(gc)
