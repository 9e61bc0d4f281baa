"""The typed unit of work: JSON round trip and key, cell and row counts against real runs,
config-only model metadata against loaded models, and the one rule for direction files."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.planner import plan
from orchestrator.spec import spec_from_dict
from tasks.directions import load_directions, unit_directions
from tasks.errors import InvalidInput, UnisweepError
from tasks.gguf_header import read_header
from tasks.models import install_alias, load_model, model_info
from tasks.run_unit import run_unit
from tasks.work import UnitWork, unit_key
from tests.fixtures_models import TINY_FAMILIES
from tests.orch_helpers import ROOT, spec_dict


def _units(tmp_path: Path, **over: object) -> list[UnitWork]:
    return [u.work for u in plan(spec_from_dict(spec_dict("w", tmp_path, **over))).units]


def test_json_round_trip_and_key(tmp_path: Path) -> None:
    works = _units(tmp_path, record={"layers": [1, 4], "positions": None})
    assert works
    for w in works:
        params = w.to_json()
        assert UnitWork.from_json(params) == w
        assert w.key() == unit_key(params)
        assert "run" in params and unit_key({**params, "run": {"model": "elsewhere"}}) == w.key()
    # A large eps comes back from PostgreSQL's JSONB as an integer: same unit, same key.
    w = dataclasses.replace(works[0], eps=(1e30,))
    assert UnitWork.from_json({**w.to_json(), "eps": [10**30]}).key() == w.key()
    with pytest.raises(InvalidInput) as ei:
        UnitWork.from_json({k: v for k, v in w.to_json().items() if k != "lp"})
    assert ei.value.field == "params" and "lp" in str(ei.value)


def test_linear_is_a_flag_and_cells_count_it(tmp_path: Path) -> None:
    works = _units(tmp_path, eps=[1e-3, 1e-2], linear=True, cells_per_unit=1000)
    for w in works:
        assert w.linear and w.eps == (1e-3, 1e-2)  # never None among the eps values
        # 2 kinds x 2 directions x 3 positions x (2 eps + linear)
        assert w.n_cells == 2 * 2 * 3 * 3
    assert all(None not in u.params["eps"] for u in plan(spec_from_dict(
        spec_dict("w", tmp_path, eps=[1e-3], linear=True, cells_per_unit=4))).units)


@pytest.mark.parametrize("record", [{"layers": None, "positions": None},
                                    {"layers": [1, 2, 4], "positions": [2, 5, 8]}])
def test_expected_rows_match_a_real_run(tmp_path: Path, record: dict) -> None:
    lm = load_model("tiny:llama", dtype="float32", check=False)
    for w in _units(tmp_path, record=record, cells_per_unit=1000):
        table = run_unit(lm, w, sweep="w")
        assert table.num_rows == w.expected_rows(2 * w.prompt.T + 1) > 0
        assert set(table.column("unit_key").to_pylist()) == {w.key()}
        assert table.column("eps").null_count == table.num_rows // w.n_eps  # linear rows
    other = load_model("tiny:llama", dtype="bfloat16", check=False)
    with pytest.raises(UnisweepError, match="dtype"):
        run_unit(other, w, sweep="w")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_model_info_equals_the_loaded_model(family: str) -> None:
    name = f"tiny:{family}"
    info, lm = model_info(name), load_model(name, dtype="float32", check=False)
    assert (info.n_layers, info.d_model, info.max_positions, info.vocab_size) == (
        lm.n_layers, lm.d_model, lm.max_positions, lm.model.config.vocab_size)
    assert info.identity == {k: v for k, v in lm.identity.items() if k != "dtype"}


def test_model_info_of_a_shape_reads_no_weights() -> None:
    info = model_info("shape:llama-3.2-3b")  # 3.2e9 parameters: only a config is built
    assert (info.n_layers, info.d_model, info.max_positions, info.vocab_size) == (28, 3072, 131072, 128256)
    assert info.identity["not_real_weights"] == "true"


def test_model_info_unknown_name_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as ei:
        model_info(str(tmp_path / "no-such-model"))
    assert ei.value.field == "model"
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(InvalidInput, match="GGUF"):
        model_info(str(bad))


def test_import_engine_does_not_import_the_loader() -> None:
    code = ("import sys, tasks.engine; "
            "print(sorted(m for m in ('gguf', 'accelerate', 'tasks.models', 'tasks.check') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_planning_imports_neither_torch_nor_ray() -> None:
    code = ("import sys, orchestrator.submit, orchestrator.planner, tasks.model_catalog; "
            "print(sorted(m for m in ('torch', 'transformers', 'ray', 'tasks.engine') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_direction_files_must_hold_unit_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(3, 16))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    np.save(tmp_path / "u.npy", rows * (1 + 5e-5))  # inside the tolerance: renormalised
    got = load_directions(tmp_path / "u.npy", 16)
    np.testing.assert_allclose(got.norm(dim=1).numpy(), 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(got.numpy(), rows, rtol=0, atol=1e-12)
    rows[1] *= 2
    np.save(tmp_path / "bad.npy", rows)
    with pytest.raises(InvalidInput, match="row 1 has norm 2") as ei:
        load_directions(tmp_path / "bad.npy", 16)
    assert ei.value.field == "directions.file"


def test_unit_directions_refuse_a_changed_file(tmp_path: Path) -> None:
    rows = np.eye(3, 32)  # tiny:llama's width
    np.save(tmp_path / "u.npy", rows)
    w = _units(tmp_path, directions={"family": "file", "file": str(tmp_path / "u.npy")})[0]
    np.testing.assert_array_equal(unit_directions(w, 32).numpy(), rows)
    np.save(tmp_path / "u.npy", rows[::-1].copy())
    with pytest.raises(UnisweepError, match="changed since the sweep was planned"):
        unit_directions(w, 32)


@pytest.mark.slow
def test_gguf_header_equals_the_gguf_package() -> None:
    from gguf import GGUFReader

    path = install_alias("smollm2-135m")
    mine, reader = read_header(path), GGUFReader(str(path))
    assert mine.keys() == reader.fields.keys()
    for key, field in reader.fields.items():
        if len(field.types) > 1 and field.types[0].name == "ARRAY":
            assert mine[key] == len(field.data), key
        else:
            assert mine[key] == pytest.approx(field.contents()), key


@pytest.mark.slow
def test_model_info_equals_loaded_smollm2(smollm2_f32) -> None:
    info = model_info("smollm2-135m")
    lm = smollm2_f32
    assert (info.n_layers, info.d_model, info.max_positions, info.vocab_size) == (
        lm.n_layers, lm.d_model, lm.max_positions, lm.model.config.vocab_size)
    assert info.identity == {k: v for k, v in lm.identity.items() if k != "dtype"}
