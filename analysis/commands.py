"""CLI commands of the analysis layer: `unisweep query` (read-only SQL) and `unisweep report`.

Both open a sweep from the result database (--db URL, else UNISWEEP_DB, else --out/unisweep.db).
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from tasks.errors import InvalidInput


class Format(str, Enum):
    table = "table"
    csv = "csv"
    parquet = "parquet"
    json = "json"


def _print_table(table, console: Console) -> None:
    t = Table(show_header=True, header_style="bold")
    for name in table.column_names:
        t.add_column(name)
    for row in table.to_pylist():
        t.add_row(*("NULL" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)
                    for v in row.values()))
    console.print(t)
    console.print(f"{table.num_rows} row(s)", style="dim")


def _flat_for_csv(table):
    """CSV has no nested values: list and struct columns become JSON text, one cell each."""
    import pyarrow as pa

    cols = []
    for col in table.columns:
        if pa.types.is_nested(col.type):
            col = pa.array([None if v is None else json.dumps(v, default=str)
                            for v in col.to_pylist()], pa.string())
        cols.append(col)
    return pa.Table.from_arrays(cols, names=table.column_names)


def _check_writable_file(path: Path) -> None:
    """--output of `query`: a file in an existing, writable folder, not a folder itself."""
    if path.is_dir():
        raise InvalidInput("--output", "a file path (not a folder)", str(path))
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidInput("--output", "a file in an existing folder", str(path),
                           detail=f"{parent} is not a folder")
    _probe_write(parent, path)


def _check_writable_dir(path: Path) -> None:
    """--output of `report`: a folder, created here so a bad path fails before any work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput("--output", "a folder that exists or can be created", str(path),
                           detail=exc.strerror or type(exc).__name__) from None
    _probe_write(path, path)


def _probe_write(folder: Path, shown: Path) -> None:
    # Really create a file: permission bits say nothing for root, /proc or a read-only mount.
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".unisweep-probe-"):
            pass
    except OSError as exc:
        raise InvalidInput("--output", "a place this user can write", str(shown),
                           detail=exc.strerror or type(exc).__name__) from None


def query_command(
    sql: str = typer.Argument(..., help="One read-only statement: SELECT, WITH, DESCRIBE, "
                              "SHOW or EXPLAIN over the views responses, units, sweeps."),
    sweep: str = typer.Option(None, "--sweep", "-s", help="Sweep name (default: all sweeps)."),
    db: str = typer.Option(None, "--db", help="Database URL (default: env UNISWEEP_DB, "
                           "else <--out>/unisweep.db)."),
    out: Path = typer.Option(Path("runs"), "--out", help="Output folder holding unisweep.db."),
    fmt: Format = typer.Option(Format.table, "--format", "-f", help="Output format."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the result to this file "
                                "(required for parquet) instead of stdout."),
) -> None:
    """Run SQL on a sweep's responses (chi, offset_class, depth added), units and sweeps."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from analysis.source import load_sweep
    from analysis.views import check_read_only, run_query

    check_read_only(sql)  # before opening anything
    if fmt is Format.parquet and output is None:
        raise InvalidInput("--output", "a file path when --format parquet", None)
    if output is not None:
        _check_writable_file(output)
    data = load_sweep(sweep, db=db, out=out)
    result = run_query(data.con, sql)
    if fmt is Format.parquet:
        pq.write_table(result, output, compression="zstd")
        return
    if fmt is Format.table:
        if output is None:
            _print_table(result, Console())
        else:
            with open(output, "w") as fh:
                _print_table(result, Console(file=fh, width=200))
        return
    if fmt is Format.csv:
        sink = str(output) if output else sys.stdout.buffer
        pacsv.write_csv(_flat_for_csv(result), sink)
        return
    text = json.dumps(result.to_pylist(), default=str, indent=1)
    if output:
        output.write_text(text + "\n")
    else:
        print(text)


def report_command(
    sweep: str = typer.Argument(..., help="Sweep name."),
    output: Path = typer.Option(None, "--output", "-o", help="Folder for the report (created): "
                                "index.html, report.md, figures, CSV and Parquet tables. "
                                "Default: <--out>/reports/<SWEEP>."),
    db: str = typer.Option(None, "--db", help="Database URL (default: env UNISWEEP_DB, "
                           "else <--out>/unisweep.db)."),
    out: Path = typer.Option(Path("runs"), "--out", help="Run folder holding unisweep.db, as "
                             "for every command (not where the report goes: that is -o)."),
    tol: float = typer.Option(0.05, "--tol", help="Plateau tolerance (relative)."),
    threshold: float = typer.Option(2.0, "--threshold", help="Induction score threshold."),
    min_layers: int = typer.Option(3, "--min-layers", help="Consecutive layers the score must "
                                   "stay above the threshold for emergence."),
    layers: str = typer.Option(None, "--layers", help="Comma-separated layers for the chi "
                               "maps and curves (default: quarter depths and emergence)."),
) -> None:
    """Write an HTML + Markdown report of a sweep: findings first, then figures and tables."""
    from analysis.report import build_report
    from analysis.source import load_sweep

    chosen = None
    if layers:
        try:
            chosen = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise InvalidInput("--layers", "comma-separated integers, e.g. 4,8,12",
                               layers) from None
    if not (0 < tol < 1):
        raise InvalidInput("--tol", "a relative tolerance in (0, 1)", tol)
    if min_layers < 1:
        raise InvalidInput("--min-layers", "a whole number of layers >= 1", min_layers)
    if output is None:
        output = out / "reports" / sweep
    _check_writable_dir(output)
    data = load_sweep(sweep, db=db, out=out)
    index = build_report(data, output, tol=tol, threshold=threshold, min_layers=min_layers,
                         layers=chosen)
    Console().print(f"report written: {index}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add this package's commands to the `unisweep` app."""
    app.command("query")(query_command)
    app.command("report")(report_command)
