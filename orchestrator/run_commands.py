"""`unisweep run SPEC` (plan + execute) and `unisweep resume SWEEP`: the orchestrator's commands.

Both print a Rich progress bar fed from the database and exit 0 when every unit is done,
1 when some units failed, 130 on Ctrl-C (leases released).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()
# The commands import their machinery when they run (function-local imports below): the CLI
# starts without torch or Ray, and `run --plan-only` never imports the driver.

_ADDRESS_HELP = "Ray cluster: 'auto' (the cluster this node belongs to) or ray://HOST:10001; local Ray if omitted"
_DB_HELP = "Database URL (sqlite:///PATH or postgresql://...); default: spec's database, env UNISWEEP_DB, <output>/unisweep.db"


def db_flags(db: str | None, out: str | Path | None) -> str:
    """The flags another command (resume, status, report) needs to find the same database:
    `--db URL` when one was named (password masked: put it back in), nothing when env
    UNISWEEP_DB names it, else `--out DIR` (omitted for the default runs/)."""
    import os
    import shlex

    from db.urls import DEFAULT_OUT, ENV_VAR, mask_url

    if db:
        return f" --db {shlex.quote(mask_url(db))}"
    if os.environ.get(ENV_VAR):
        return ""
    folder = str(out) if out is not None else DEFAULT_OUT
    return "" if Path(folder) == Path(DEFAULT_OUT) else f" --out {shlex.quote(folder)}"


def _finish(summary: object, flags: str = "") -> None:
    from orchestrator.driver import RunSummary

    assert isinstance(summary, RunSummary)
    c = summary.counts
    console.print(
        f"sweep [bold]{summary.sweep}[/]: {c['done']} done, {c['failed']} failed, "
        f"{c['pending'] + c['leased']} open units; {summary.cells_done}/{summary.cells_total} cells; "
        f"this run {summary.cells_this_run} cells in {summary.seconds:.1f} s "
        f"({summary.cells_per_s:.1f} cells/s)"
        + (f"; {summary.actor_deaths} actor deaths" if summary.actor_deaths else ""),
        highlight=False, soft_wrap=True,  # a command to copy must stay on one line
    )
    for f in summary.failed[:5]:
        first = (f.error or "").strip().splitlines()[0] if f.error else ""
        console.print(f"  failed {f.key[:12]} after {f.attempts} attempts: {first}", highlight=False, soft_wrap=True)
    if summary.interrupted:
        console.print("interrupted: leases released; continue with `unisweep resume "
                      f"{summary.sweep}{flags}`", highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    if c["pending"] + c["leased"]:
        console.print(f"{c['pending'] + c['leased']} units still open (actors lost?): "
                      f"`unisweep resume {summary.sweep}{flags}`", highlight=False, soft_wrap=True)
    if c["failed"] or c["pending"] + c["leased"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `run` and `resume` to the `unisweep` app."""

    @app.command("run")
    def run_cmd(
        spec: Path = typer.Argument(..., help="Sweep spec (YAML); see examples/"),
        address: str | None = typer.Option(None, "--address", help=_ADDRESS_HELP),
        db: str | None = typer.Option(None, "--db", help=_DB_HELP),
        actors: int | None = typer.Option(None, "--actors", min=1, help="Cap the number of actors"),
        plan_only: bool = typer.Option(False, "--plan-only", help="Add the units to the database, run nothing"),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar"),
        ship: bool = typer.Option(True, "--ship/--no-ship", help="With --address: send this checkout to the workers (Ray runtime env)"),
    ) -> None:
        """Plan SPEC into the database (adding only new units) and run them on Ray actors."""
        # Imported per command: --plan-only never needs Ray, the actor or the engine.
        from db.storage import preflight
        from orchestrator.ray_session import check_address
        from orchestrator.spec import load_spec
        from orchestrator.submit import submit

        sweep_spec = load_spec(spec)
        preflight(sweep_spec.output)  # a bad bucket or credentials: exit 2 before any write
        if address and not plan_only:
            check_address(address)  # before anything is written
        _warn_password(sweep_spec)
        store, the_plan, added = submit(sweep_spec, db)
        console.print(f"sweep [bold]{sweep_spec.name}[/]: {len(the_plan.units)} units planned, "
                      f"{added} new, in {store.url}", highlight=False, soft_wrap=True)
        if plan_only:
            return
        from orchestrator.driver import Driver

        summary = Driver(store, sweep_spec.name, sweep_spec, _store_url(store),
                         address=address, ship=ship, actors=actors, progress=progress).run()
        _finish(summary, db_flags(db or sweep_spec.database, sweep_spec.output))

    @app.command("resume")
    def resume_cmd(
        sweep: str = typer.Argument(..., help="Sweep name"),
        address: str | None = typer.Option(None, "--address", help=_ADDRESS_HELP),
        db: str | None = typer.Option(None, "--db", help=_DB_HELP),
        out: Path | None = typer.Option(None, "--out", help="Output folder holding unisweep.db (SQLite default)"),
        actors: int | None = typer.Option(None, "--actors", min=1, help="Cap the number of actors"),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar"),
        ship: bool = typer.Option(True, "--ship/--no-ship", help="With --address: send this checkout to the workers (Ray runtime env)"),
    ) -> None:
        """Run the open units of SWEEP (pending, or leased by a worker that stopped)."""
        from db.storage import preflight
        from db.store import connect
        from orchestrator.driver import Driver, load_sweep_spec

        store = connect(db, output_dir=out, create=False)
        sweep_spec = load_sweep_spec(store, sweep)
        preflight(store.get_sweep(sweep).output_dir)
        _requeue_lost_shards(store, sweep, checksum=False)
        summary = Driver(store, sweep, sweep_spec, _store_url(store),
                         address=address, ship=ship, actors=actors, progress=progress).run()
        _finish(summary, db_flags(db, out))

    @app.command("retry")
    def retry_cmd(
        sweep: str = typer.Argument(..., help="Sweep name"),
        failed: bool = typer.Option(False, "--failed", help="Requeue every failed unit"),
        unit: list[str] = typer.Option(None, "--unit", help="Requeue this failed unit (repeatable)"),
        bad_shards: bool = typer.Option(False, "--bad-shards", help="Recompute done units whose shard is missing or changed (reads every shard)"),
        no_run: bool = typer.Option(False, "--no-run", help="Only requeue; run later with `resume`"),
        address: str | None = typer.Option(None, "--address", help=_ADDRESS_HELP),
        db: str | None = typer.Option(None, "--db", help=_DB_HELP),
        out: Path | None = typer.Option(None, "--out", help="Output folder holding unisweep.db (SQLite default)"),
        actors: int | None = typer.Option(None, "--actors", min=1, help="Cap the number of actors"),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar"),
        ship: bool = typer.Option(True, "--ship/--no-ship", help="With --address: send this checkout to the workers (Ray runtime env)"),
    ) -> None:
        """Give failed units (or units whose shard went bad) a fresh start, then run them."""
        from db.store import connect
        from orchestrator.driver import Driver, load_sweep_spec
        from tasks.errors import InvalidInput

        if not (failed or unit or bad_shards):
            raise InvalidInput("retry", "--failed, --unit KEY or --bad-shards", None)
        store = connect(db, output_dir=out, create=False)
        sweep_spec = load_sweep_spec(store, sweep)
        if unit:
            known = {f.key for f in store.status(sweep).failed}
            missing = [k for k in unit if k not in known]
            if missing:
                raise InvalidInput("--unit", "keys of failed units of this sweep (see "
                                   "`unisweep status`)", missing[0])
        n = store.requeue(sweep, failed=failed, keys=list(unit) if unit else None) if (failed or unit) else 0
        n += _requeue_lost_shards(store, sweep, checksum=True) if bad_shards else 0
        console.print(f"sweep [bold]{sweep}[/]: {n} units requeued with fresh attempts",
                      highlight=False)
        if no_run:
            return
        summary = Driver(store, sweep, sweep_spec, _store_url(store),
                         address=address, ship=ship, actors=actors, progress=progress).run()
        _finish(summary)


def _requeue_lost_shards(store: object, sweep: str, *, checksum: bool) -> int:
    """Done units whose shard is missing (or, with checksum, changed) go back to pending."""
    problems = (store.verify(sweep).problems if checksum  # type: ignore[attr-defined]
                else store.lost_shards(sweep))  # type: ignore[attr-defined]
    bad = [p.key for p in problems]
    if not bad:
        return 0
    n = store.requeue(sweep, failed=False, done_keys=bad)  # type: ignore[attr-defined]
    console.print(f"{n} done units had a missing or changed shard: recomputing them",
                  highlight=False)
    return n


def _store_url(store: object) -> str:
    """The URL actors connect with: the one the driver's store was opened with, password
    included (store.url masks it; the spec in the database holds only the masked form)."""
    return store.engine.url.render_as_string(hide_password=False)  # type: ignore[attr-defined]


def _warn_password(spec: object) -> None:
    from sqlalchemy.engine import make_url

    url = getattr(spec, "database", None)
    try:
        has_password = bool(url and make_url(url).password)
    except Exception:  # noqa: BLE001 (a malformed URL is reported by connect)
        has_password = False
    if has_password:
        console.print("warning: the spec's `database:` holds a password; it is stored masked. "
                      "Put the URL in UNISWEEP_DB and the password in ~/.pgpass instead.",
                      highlight=False, style="yellow")
