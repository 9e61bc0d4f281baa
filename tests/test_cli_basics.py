"""What a researcher expects of the `unisweep` command line: --version, shell completion,
`sweeps`, `models list` at once and aligned, the resume hint's flags, no plotting backend
forced by importing the analysis API."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from db.shards import ShardInfo
from db.store import UnitSpec, connect
from orchestrator.cli import app
from orchestrator.run_commands import db_flags

ROOT = Path(__file__).resolve().parents[1]


UNISWEEP = Path(sys.executable).parent / "unisweep"  # the installed entry point, as users run it


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "UNISWEEP_DB"}
    return subprocess.run([str(UNISWEEP), *args], cwd=ROOT,
                          env={**base, "COLUMNS": "120", **(env or {})},
                          capture_output=True, text=True, timeout=120)


def test_version():
    from importlib.metadata import version

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"unisweep {version('unisweep')}"


def test_shell_completion_script_and_completions():
    # The script `unisweep --install-completion` writes for bash (it detects the user's shell
    # from the parent processes, which a test cannot fake; the environment variable is the
    # same mechanism without the detection).
    res = _cli(env={"_UNISWEEP_COMPLETE": "source_bash"})
    assert res.returncode == 0 and "_UNISWEEP_COMPLETE=complete_bash" in res.stdout
    # What bash asks for when the user presses tab after `unisweep sta`.
    done = _cli(env={"_UNISWEEP_COMPLETE": "complete_bash", "COMP_WORDS": "unisweep sta",
                     "COMP_CWORD": "1"})
    assert done.stdout.split() == ["status"]


def test_models_list_is_fast_and_aligned():
    t0 = time.perf_counter()
    res = _cli("models", "list")
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["name", "weights", "source"]
    names = [ln.split()[0] for ln in lines[1:]]
    assert names[:2] == ["smollm2-135m", "gemma3-270m"] and "shape:gpt2-xl/4" in names
    # Every row's second and third column start where the header's do.
    col2, col3 = lines[0].index("weights"), lines[0].index("source")
    for ln in lines[1:]:
        assert ln[col2 - 2:col2] == "  " and ln[col2] != " ", ln
        assert ln[col3 - 2:col3] == "  " and ln[col3] != " ", ln
    assert "Q4_1 GGUF de-quantised" in res.stdout
    # Nothing heavy is imported (torch, transformers, SQLAlchemy): the interpreter start
    # dominates. Under 1 s on an idle machine; generous here for a loaded one.
    assert elapsed < 5, elapsed
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from orchestrator.cli import app; "
         "from orchestrator.probe_command import models_list; models_list(); "
         "print(sorted(m for m in ('torch', 'transformers', 'sqlalchemy', 'alembic') "
         "if m in sys.modules))"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert probe.stdout.splitlines()[-1] == "[]", probe.stdout + probe.stderr


def test_sweeps_lists_name_status_units_cells(tmp_path):
    out = tmp_path / "runs"
    with connect(None, output_dir=out) as store:
        store.create_sweep("alpha", {"name": "alpha"}, "h1", str(out))
        store.add_units("alpha", [UnitSpec(f"a{k}", None, {}, 4) for k in range(3)])
        store.create_sweep("beta", {"name": "beta"}, "h2", str(out))
        store.add_units("beta", [UnitSpec("b0", None, {}, 10)])
        [unit] = store.lease("w", 1, 30, sweep_id="alpha")
        assert store.complete(unit.key, "w", ShardInfo("/x.parquet", 1, 1, "a" * 64), 1.0) == "done"
    res = _cli("sweeps", "--out", str(out))
    assert res.returncode == 0, res.stderr
    rows = [ln.replace("│", " ").split() for ln in res.stdout.splitlines() if "│" in ln]
    assert [r[:6] for r in rows] == [["alpha", "created", "1/3", "0", "4/12", rows[0][5]],
                                     ["beta", "created", "0/1", "0", "0/10", rows[1][5]]]
    assert "2 sweep(s) in sqlite:///" in res.stdout
    # A folder without a database is an error naming it, not an empty listing.
    bad = _cli("sweeps", "--out", str(tmp_path / "nothing"))
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def test_resume_hint_names_the_database_flags(monkeypatch):
    monkeypatch.delenv("UNISWEEP_DB", raising=False)
    assert db_flags(None, "runs") == ""  # the default every command uses
    assert db_flags(None, None) == ""
    assert db_flags(None, "/data/my runs") == " --out '/data/my runs'"
    assert db_flags("sqlite:////tmp/x.db", "ignored") == " --db sqlite:////tmp/x.db"
    # A password is never printed: the user puts it back in.
    assert db_flags("postgresql://al:s3cret@h/db", None) == " --db 'postgresql://al:***@h/db'"
    monkeypatch.setenv("UNISWEEP_DB", "postgresql://al:s3cret@h/db")
    assert db_flags(None, "/data/runs") == ""  # the same environment finds it again


def test_interrupted_run_prints_the_exact_resume_command(capsys):
    import typer

    from orchestrator.driver import RunSummary
    from orchestrator.run_commands import _finish

    summary = RunSummary(sweep="qs", counts={"pending": 2, "leased": 0, "done": 2, "failed": 0},
                         cells_done=80, cells_total=160, cells_this_run=80, seconds=10.0,
                         interrupted=True)
    with pytest.raises(typer.Exit) as exc:
        _finish(summary, " --out /data/runs")
    assert exc.value.exit_code == 130
    assert "`unisweep resume qs --out /data/runs`" in capsys.readouterr().out


def test_importing_the_analysis_api_leaves_the_backend_alone():
    code = ("import matplotlib, sys; matplotlib.use('svg'); import analysis.api; "
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items()
                                           if k != "MPLBACKEND"})
    assert res.stdout.split() == ["svg", "False"], res.stdout + res.stderr
