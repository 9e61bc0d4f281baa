"""bench/gpu_check.py, the one-command GPU check, run CPU-sized: numbers in its JSON, imports.

The GPU machine has no Ray, DuckDB or Polars (and they are too large to carry as wheels; gguf,
SQLAlchemy, pydantic travel, bench/gpu_prepare.sh): the quick run happens in a subprocess where
importing any of the three fails, so a new top-level import of one would show here first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).absolute().parents[1]
# Runs bench/gpu_check.py with these packages unimportable (as on the GPU machine).
_BLOCKED_RUN = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"ray", "duckdb", "polars"}:
            raise ImportError(f"{name} is not on the GPU machine")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 1 minute of CPU; the shared 2-core machine can be 20x slower
def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUN, str(ROOT / "bench" / "gpu_check.py"), str(out),
         "--device", "cpu", "--quick"],
        cwd=tmp_path, capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["complete"] and res["ok"] and res["parts"] == ["exact", "scale", "naive", "sweep"]
    assert (out / "gpu_check.txt").read_text().count("| yes |") == 9  # 8 exact rows + sweep

    # (a) every tiny family in both dtypes: start-up check passed, every row present, and the
    # engine equal to the naive reference (float64 to the float32 storage of the table).
    exact = {(r["family"], r["dtype"]): r for r in res["exact"]["rows"]}
    assert set(exact) == {(f, d) for f in ("gpt2", "llama", "gemma2", "gemma3")
                          for d in ("float64", "float32")}
    for (_fam, dtype), r in exact.items():
        assert r["startup_ok"] and r["startup_worst"] <= r["startup_tol"]
        assert r["rows"] == r["expected_rows"] > 0 and r["cells_missing"] == 0
        bound = 1e-6 if dtype == "float64" else 1e-3
        assert max(r["errors"][k] for k in ("r", "r_attn", "r_mlp")) < bound
        assert 0 <= r["errors"]["kl"] < (1e-5 if dtype == "float64" else 1e-3)

    # (b, c) the paper-grid bench on a tiny model: every figure measured and consistent.
    (row,) = res["scale"]["rows"]
    s = res["scale"]["settings"]
    assert row["model"] == "tiny:llama" and row["linear"]
    per_pj = (s["eps_count"] + 1) * s["directions"]
    assert row["cells"] == 2 * len(row["lps"]) * row["positions"] * per_pj
    assert row["cells_s"] == pytest.approx(row["cells"] / row["secs"])
    assert row["tokens_s"] > row["cells_s"] > 0 and row["tflops"] > 0 and row["mem_gib"] > 0
    assert row["frac_peak"] is None  # no datasheet peak for a CPU
    assert row["naive_cells_s"] > 0
    assert row["engine_over_naive"] == pytest.approx(row["cells_s"] / row["naive_cells_s"])
    # The projection covers 8 pairs x every position: more than the cells timed here.
    assert row["projected"] > row["secs"]
    assert res["scale"]["projected_total_s"] == pytest.approx(row["projected"])

    # (d) one sweep through UnitRunner: every unit done, and the shards hold exactly the rows
    # the engine alone gives on the same grid.
    w = res["sweep"]
    assert w["units_done"] == w["units"] == w["units_added"] > 0 and not w["errors"]
    assert w["shard_rows"] == w["result_rows"] == w["engine_rows"] > 0
    assert w["cells"] == w["engine_cells"] > 0


def test_gpu_check_bad_arguments_exit_2_before_any_work(tmp_path, capsys):
    from bench.gpu_check import main

    for argv, field in ((["--parts", "exact,speed"], "--parts"),
                        (["--positions", "0"], "--positions"),
                        (["--device", "tpu"], "--device")):
        with pytest.raises(SystemExit) as exc:
            main([str(tmp_path / "out"), "--device", "cpu", *argv])
        assert exc.value.code == 2
        assert field in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
