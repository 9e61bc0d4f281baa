"""README.md runs as written: every ```bash and ```console block is executed, in order, in a
fresh copy of the checkout, and each console command's output is compared in shape.

Conventions (README authors): ```console blocks hold `$ command` lines, each followed by its
output; a command continues on the next lines while its quotes are open or a line ends in a
backslash; `[exit N]` as an output line says the command exits N (default 0); `...` stands for
lines or text left out. ```bash blocks run as one script and must exit 0. A block that cannot
run in a test (cloud credentials, the install itself) is ```text with a comment saying why;
every other fence needs an info string, so nothing that looks like a command escapes the test.

Shape: numbers, run-time paths and column widths may differ; every expected output line,
so normalised, must appear in the real output, in order. The quickstart sweep the README
runs is shared by all blocks and by the emergence check on its data at the end.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXECUTED = {"bash", "console"}
LABELLED = EXECUTED | {"text", "yaml", "python", "sql", "toml", "json", "ini"}


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    info: str
    body: list[str]


@dataclass
class Step:
    command: str
    expected: list[str]
    exit_code: int


def readme_blocks(text: str) -> list[Block]:
    """Fenced blocks in order; an unclosed fence is an error."""
    blocks, open_at, info, body = [], None, "", []
    for k, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^```\s*([\w+-]*)\s*$", line)
        if m and open_at is None:
            open_at, info, body = k, m.group(1), []
        elif line.startswith("```") and open_at is not None:
            blocks.append(Block(open_at, info, body))
            open_at = None
        elif open_at is not None:
            body.append(line)
    assert open_at is None, f"README.md: fence opened at line {open_at} is never closed"
    return blocks


def _complete(command: str) -> bool:
    if command.endswith("\\"):
        return False
    try:
        shlex.split(command, comments=True)
    except ValueError:  # an open quote: the command goes on
        return False
    return True


def console_steps(body: list[str]) -> list[Step]:
    steps: list[Step] = []
    k = 0
    while k < len(body):
        line = body[k]
        if not line.startswith("$ "):
            assert not steps or True
            if steps:
                steps[-1].expected.append(line)
            k += 1
            continue
        command = line[2:]
        while not _complete(command) and k + 1 < len(body):
            k += 1
            command += "\n" + body[k]
        steps.append(Step(command, [], 0))
        k += 1
    for st in steps:
        codes = [ln for ln in st.expected if re.fullmatch(r"\[exit \d+\]", ln.strip())]
        if codes:
            st.exit_code = int(codes[-1].strip()[6:-1])
            st.expected = [ln for ln in st.expected if ln not in codes]
    return steps


_DURATION = re.compile(r"\b\d+(h\d+m\d+s|m\d+s|s)\b")  # 1h02m03s, 6m19s, 0s
_NUM = re.compile(r"(?<![A-Za-z_])[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
_RULE = re.compile(r"([─━═┄┅╌╍-])\1+")


def normalise(line: str) -> str:
    """A line's shape: numbers -> #, runs of rule characters and spaces -> one."""
    s = _NUM.sub("#", _DURATION.sub("#", line.rstrip()))
    s = _RULE.sub(r"\1", s)
    s = re.sub(r"#(\s*#)+", "#", s)  # 4.3e-05 / 0:01:06 / 2026-11-27 11:55 -> one number
    return re.sub(r"\s+", " ", s).strip()


def _pattern(expected: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in normalise(expected).split("...")]
    return re.compile(".*".join(parts))


def shape_mismatch(expected: list[str], actual: str) -> str | None:
    """None when every non-empty expected line (bar `...`) matches an actual line, in order."""
    lines = [normalise(ln) for ln in actual.splitlines()]
    pos = 0
    for exp in expected:
        if not exp.strip() or exp.strip() == "...":
            continue
        pat = _pattern(exp)
        while pos < len(lines) and not pat.fullmatch(lines[pos]):
            pos += 1
        if pos == len(lines):
            return f"expected line not found (in order): {exp!r} ~ {normalise(exp)!r}"
        pos += 1
    return None


@pytest.fixture(scope="module")
def workspace():
    """A fresh checkout: the repository's tracked and unignored files, no runs/, no reports.

    Its own temporary folder, not pytest's tmp_path: pytest prunes old basetemp folders when
    another session starts, which would pull a long README run from under its feet."""
    root = Path(tempfile.mkdtemp(prefix="unisweep-readme-"))
    try:
        yield _copy_checkout(root / "unisweep")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _copy_checkout(ws: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (ws / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, ws / rel)
    return ws


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNISWEEP_DB")}
    venv_bin = str(Path(sys.executable).parent)
    env.update(PATH=f"{venv_bin}:{env.get('PATH', '')}", COLUMNS="100", TERM="dumb",
               NO_COLOR="1", PYTHONUNBUFFERED="1")
    env.pop("FORCE_COLOR", None)
    return env


BLOCKS = readme_blocks(README.read_text())
RECORD = os.environ.get("UNISWEEP_README_RECORD")  # a file: write every real output there


def test_every_fence_is_labelled():
    """Cheap, so not `slow`: helpers running `-m "not slow"` learn of an unlabelled fence."""
    bad = [b.line for b in BLOCKS if b.info not in LABELLED]
    assert not bad, (f"README.md fences at lines {bad} need an info string: console or bash "
                     "(executed by this test), or text/yaml/python/sql (not executed)")
    for b in BLOCKS:
        if b.info == "text" and any(ln.startswith("$ ") for ln in b.body):
            assert any(ln.lstrip().startswith("#") for ln in b.body), (
                f"README.md line {b.line}: a ```text block of commands says why it is not run")


@pytest.mark.slow  # the README runs the quickstart sweep on real weights
@pytest.mark.timeout(3600)  # ~2 min idle; a machine shared by many jobs can take 10x that
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.info in EXECUTED],
                         ids=lambda b: f"line{b.line}-{b.info}")
def test_readme_block(block: Block, workspace: Path):
    if block.info == "bash":
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(block.body)],
                             cwd=workspace, env=_env(), capture_output=True, text=True,
                             timeout=1800)
        assert res.returncode == 0, f"README.md line {block.line}:\n{res.stdout}\n{res.stderr}"
        return
    steps = console_steps(block.body)
    assert steps, f"README.md line {block.line}: a console block without `$ ` commands"
    for st in steps:
        # stdout and stderr in one stream, in the order a terminal shows them.
        res = subprocess.run(["bash", "-c", st.command], cwd=workspace, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=1800)
        out = res.stdout
        if RECORD:
            with open(RECORD, "a") as fh:
                fh.write(f"\n### line {block.line} [exit {res.returncode}]\n$ {st.command}\n"
                         f"{out}")
        where = f"README.md line {block.line}: $ {st.command}"
        assert res.returncode == st.exit_code, f"{where}\nexit {res.returncode}\n{out}"
        problem = shape_mismatch(st.expected, out)
        assert problem is None, f"{where}\n{problem}\n--- real output ---\n{out}"


@pytest.mark.slow
def test_quickstart_emergence(workspace: Path):
    """The emergence rule on the quickstart's SmolLM2 data: stripes emerge early and stay."""
    import polars as pl

    from analysis.api import emergence, load_sweep

    if not (workspace / "runs" / "unisweep.db").is_file():
        pytest.skip("the README blocks did not run the quickstart (run the whole module)")
    em = emergence(load_sweep("quickstart", out=workspace / "runs")).filter(
        pl.col("eps").is_null()).sort("lp")
    rows = {r["lp"]: r for r in em.iter_rows(named=True)}
    assert set(rows) == {0, 15}
    # Measured: lp 0 crosses 2 at layer 4 and stays above for 24 layers, peaks 4.85 at l 10
    # (depth 0.33) and falls back under 2 near the output: the old rule found no emergence.
    lp0 = rows[0]
    assert (lp0["emergence_status"], lp0["emergence_layer"]) == ("sustained", 4)
    assert lp0["peak_layer"] == 10 and lp0["peak_score"] == pytest.approx(4.85, abs=0.05)
    assert 4 <= lp0["half_rise_layer"] <= 6
    lp15 = rows[15]
    assert (lp15["emergence_status"], lp15["emergence_layer"]) == ("sustained", 18)
    assert lp15["peak_layer"] == 19


def test_shape_comparison_accepts_other_numbers_and_refuses_other_words():
    expected = ["┏━━━━┳━━━━━━━━━━━━━┓", "┃ l  ┃ prompt_kind ┃", "│ 15 │ control     │",
                "...", "cells 160/160 (100.0%)  cells/s 2.48  ETA 0s  compute 1m00s",
                "in sqlite:////.../runs/unisweep.db"]
    actual = ("noise first\n┏━━━━━┳━━━━━━━━━━━━━┓\n┃ l   ┃ prompt_kind ┃\n│ 150 │ control     │\n"
              "│ 151 │ repeat      │\ncells 40/160 (25.0%)  cells/s 0.27  ETA 4m13s  compute "
              "6m19s\nin sqlite:////tmp/x/runs/unisweep.db\n")
    assert shape_mismatch(expected, actual) is None
    assert "control" in shape_mismatch(["│ 15 │ controls │"], actual)
    # Order counts: a line found only before the previous match is missing.
    assert shape_mismatch(["│ 1 │ repeat │", "│ 1 │ control │"], actual) is not None
    steps = console_steps(['$ unisweep query "SELECT 1', '    FROM t" --format csv', '"1"',
                           '$ false', '[exit 1]'])
    assert [(s.command.count("\n"), s.expected, s.exit_code) for s in steps] == [
        (1, ['"1"'], 0), (0, [], 1)]
