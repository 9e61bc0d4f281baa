"""The `unisweep` command line: one Typer app; each package registers its own commands.

User errors (UnisweepError) and the machine's (OSError: disk full, no permission) are printed
as one clear line and exit 2, never a traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from tasks.errors import UnisweepError

app = typer.Typer(
    name="unisweep",
    help="Perturbation sweeps of LLM residual streams: run, resume, query, report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
)
err_console = Console(stderr=True, soft_wrap=True)  # one line per error, whatever the width


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("unisweep")
        except PackageNotFoundError:  # running from a checkout that was never installed
            v = "unknown (not installed)"
        typer.echo(f"unisweep {v}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Perturbation sweeps of LLM residual streams: run, resume, query, report."""


def _register_commands() -> None:
    # Each area owns its commands in its own module, so they can change independently.
    from analysis import commands as analysis_commands
    from db import commands as db_commands
    from orchestrator import probe_command, run_commands

    probe_command.register(app)
    run_commands.register(app)
    db_commands.register(app)
    analysis_commands.register(app)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning user errors into a message and exit code 2."""
    try:
        app(args=argv, standalone_mode=True)
    except UnisweepError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except OSError as exc:
        # The machine's state (full disk, no permission, a vanished file), never a bug
        # worth a traceback: what failed and where, in one line.
        where = f": {exc.filename}" if exc.filename else ""
        err_console.print(f"[bold red]error:[/] {escape(exc.strerror or str(exc))}{escape(where)}",
                          highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
