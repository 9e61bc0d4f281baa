"""Every hostile or broken input of docs/RELIABILITY.md through the real CLI, in one process.

Prints one Markdown row per input (exit code, lines on stderr, characters, traceback or not,
seconds) and the totals. A throwaway SQLite database and folder under a temporary directory.

    python bench/bad_inputs.py > bench/results/bad_inputs.txt
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.cli import main  # noqa: E402


def run(*argv: str) -> tuple[int, str, str, float]:
    # A text stream with a .buffer, as sys.stdout has (CSV output writes bytes to it).
    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()
    t0 = time.perf_counter()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as exc:
            code = int(exc.code or 0)
        except BaseException as exc:  # noqa: BLE001 (what would have been a traceback)
            import traceback

            err.write("Traceback (most recent call last):\n" + "".join(traceback.format_exception(exc)))
            code = 1
    out.flush()
    return code, out.buffer.getvalue().decode(), err.getvalue(), time.perf_counter() - t0


def spec(out: Path, **over: object) -> dict:
    d = {"name": "bad", "models": ["tiny:llama"], "prompts": {"T": 4, "count": 1},
         "layers": [0], "positions": [1, 2], "eps": [0.001, 0.01], "output": str(out)}
    d.update(over)
    return d


def alias_bomb() -> str:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    prev = "a"
    for name in "bcdefghi":
        text += f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]\n"
        prev = name
    return text + 'name: bomb\nmodels: ["tiny:llama"]\nprompts: {T: 4, count: 1}\nlayers: [0]\neps: *i\n'


def main_() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="unisweep-bad-"))
    os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")
    db = f"sqlite:///{tmp / 'u.db'}"
    out = tmp / "out"
    good = tmp / "good.yaml"
    good.write_text(yaml.safe_dump(spec(out)))
    base = good.read_text()
    afile = tmp / "afile"
    afile.write_text("x")

    def f(name: str, text: str | bytes) -> str:
        p = tmp / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(p)

    cases = [
        ("spec: not UTF-8", ("run", f("latin1.yaml", b"name: caf\xe9\n" + base.encode()), "--db", db)),
        ("spec: YAML alias bomb (422 bytes)", ("run", f("bomb.yaml", alias_bomb()), "--db", db)),
        ("spec: 2 MB file", ("run", f("big.yaml", base + "# " + "x" * (2 << 20) + "\n"), "--db", db)),
        ("spec: eps list of 20,000", ("run", f("long.yaml", yaml.safe_dump(spec(out, eps=[1e-3 * (1 + i) for i in range(20_000)]))), "--db", db)),
        ("spec: eps lattice of 60,001", ("run", f("lat.yaml", yaml.safe_dump(spec(out, eps={"start": 1e-300, "stop": 1e300, "per_decade": 100}))), "--db", db)),
        ("spec: 10^9-unit grid (cells_per_unit 1)", ("run", f("huge.yaml", yaml.safe_dump(spec(out, prompts={"T": 500, "count": 1000}, positions="all", layers=[0, 1], eps={"start": 1e-6, "stop": 1, "per_decade": 10}, cells_per_unit=1))), "--db", db)),
        ("spec: duplicate key", ("run", f("dup.yaml", base + "name: again\n"), "--db", db)),
        ("spec: eps: [true]", ("run", f("booleps.yaml", yaml.safe_dump(spec(out, eps=[True]))), "--db", db)),
        ("spec: T: true", ("run", f("boolT.yaml", yaml.safe_dump(spec(out, prompts={"T": True, "count": 1}))), "--db", db)),
        ("spec: output is an existing file", ("run", f("outfile.yaml", yaml.safe_dump(spec(afile))), "--db", db)),
        ("spec: database under a file", ("run", f("dbfile.yaml", yaml.safe_dump(spec(out, database=f"sqlite:///{afile}/u.db"))))),
        ("--db port 54x2", ("status", "bad", "--db", "postgresql://me:s3cret@127.0.0.1:54x2/db")),
        ("--db port 99999", ("status", "bad", "--db", "postgresql://me:s3cret@127.0.0.1:99999/db")),
        ("--db server refusing", ("status", "bad", "--db", "postgresql://me:s3cret@127.0.0.1:1/db")),
        ("--address ray://127.0.0.1:1 (refused)", ("run", str(good), "--db", db, "--address", "ray://127.0.0.1:1")),
        ("--address ray://host:70000", ("run", str(good), "--db", db, "--address", "ray://127.0.0.1:70000")),
    ]
    code, o, e, _ = run("run", str(good), "--db", db, "--plan-only")
    assert code == 0, o + e
    cases += [
        ("query: EXPLAIN ANALYZE COPY ... TO file", ("query", f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp}/leak.csv'", "--db", db)),
        ("query: EXPLAIN ANALYZE CREATE TABLE", ("query", "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1", "--db", db)),
        ("query: two statements", ("query", "SELECT 1; SELECT 2", "--db", db)),
        ("query: COPY", ("query", f"COPY (SELECT 1) TO '{tmp}/x.csv'", "--db", db)),
        ("query: SET", ("query", "SET threads = 1", "--db", db)),
        ("query: syntax error", ("query", "SELEC 1", "--db", db)),
        ("query: -o /proc/x.csv", ("query", "SELECT 1", "-o", "/proc/x.csv", "-f", "csv", "--db", db)),
        ("query: -o in a missing folder", ("query", "SELECT 1", "-o", str(tmp / "no/x.parquet"), "-f", "parquet", "--db", db)),
        ("report: -o /proc/report", ("report", "bad", "-o", "/proc/report", "--db", db)),
        ("report: -o under a file", ("report", "bad", "-o", str(afile / "r"), "--db", db)),
        ("status: unknown sweep", ("status", "nope", "--db", db)),
        ("retry: no selector", ("retry", "bad", "--db", db)),
        ("retry: --unit not failed", ("retry", "bad", "--unit", "abc", "--db", db, "--no-run")),
    ]
    ok_cases = [
        ("query: PIVOT (allowed)", ("query", "PIVOT (SELECT 1 AS k, 2 AS v) ON k USING sum(v)", "--db", db)),
        ("query: CSV of a list column (allowed)", ("query", "SELECT [1, 2] AS l", "-f", "csv", "--db", db)),
        ("query: EXPLAIN ANALYZE SELECT (allowed)", ("query", "EXPLAIN ANALYZE SELECT 1", "--db", db)),
    ]
    print("| input | exit | stderr lines | stderr chars | traceback | s |")
    print("|---|---|---|---|---|---|")
    tracebacks = 0
    for name, argv in cases + ok_cases:
        code, o, e, s = run(*argv)
        lines = [ln for ln in e.splitlines() if ln.strip()]
        tb = "Traceback" in o + e
        tracebacks += tb
        print(f"| {name} | {code} | {len(lines)} | {len(e)} | {'yes' if tb else 'no'} | {s:.2f} |")
        if "s3cret" in o + e:
            print(f"PASSWORD LEAKED in {name}")
    print(f"\n{len(cases)} bad inputs refused, {len(ok_cases)} legitimate ones run; "
          f"tracebacks shown: {tracebacks}; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_())
