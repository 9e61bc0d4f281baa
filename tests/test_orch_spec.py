"""Spec validation and the planner: bad specs fail before any compute or write; keys are stable.

No Ray here: these run in seconds.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.model_meta import ModelMeta
from orchestrator.planner import plan, sweep_hash, unit_key
from orchestrator.spec import load_spec, log_lattice, spec_from_dict
from tasks.errors import InvalidInput
from tests.orch_helpers import ROOT, spec_dict

TINY = "tiny:llama"


def _meta(name: str) -> ModelMeta:
    # Planner tests that are not about models: a fixed fake, so keys do not need an engine.
    return ModelMeta(name, name, n_layers=4, d_model=16, max_positions=64, identity={"name": name})


# (what is wrong, change to the valid spec, field the error must name, words it must contain)
BAD_SPECS = [
    ("unknown top key", {"epsilon": [0.1]}, "epsilon", "unknown key"),
    ("unknown nested key", {"prompts": {"T": 4, "count": 2, "sed": 1}}, "prompts.sed", "seed"),
    ("unknown key in eps range", {"eps": {"start": 1e-3, "stop": 1, "per_decad": 2}}, "eps.per_decad", "per_decade"),
    ("unknown key in a model", {"models": [{"name": TINY, "dtyp": "float32"}]}, "models[0].dtyp", "dtype"),
    ("T of the wrong type", {"prompts": {"T": "four", "count": 2}}, "prompts.T", "integer"),
    ("count zero", {"prompts": {"T": 4, "count": 0}}, "prompts.count", "greater than or equal to 1"),
    ("empty eps list without linear", {"eps": [], "linear": False}, "eps", "non-empty"),
    ("head offsets without heads", {"record": {"head_offsets": [5]}}, "record", "record.heads"),
    ("head offset outside the prompt", {"record": {"heads": True, "head_offsets": [9]}},
     "spec", "0..8"),
    ("eps zero", {"eps": [0.0, 1e-2]}, "eps", "> 0"),
    ("eps negative", {"eps": [-1e-3]}, "eps", "> 0"),
    ("eps range reversed", {"eps": {"start": 1.0, "stop": 1e-3}}, "eps", "stop must be >= start"),
    ("eps range start <= 0", {"eps": {"start": 0, "stop": 1}}, "eps.start", "greater than 0"),
    ("empty layer list", {"layers": []}, "layers", "non-empty"),
    ("negative layer", {"layers": [-1]}, "layers", ">= 0"),
    ("layers not a list", {"layers": "first"}, "layers", "'all'"),
    ("empty position list", {"positions": []}, "positions", "non-empty"),
    ("empty position range", {"positions": {"start": 5, "stop": 5}}, "positions", "empty"),
    ("position outside the prompt", {"positions": [1, 9]}, "positions", "0..8"),
    ("unknown dtype", {"dtype": "float8"}, "dtype", "bfloat16"),
    ("unknown direction family", {"directions": {"family": "sideways"}}, "directions.family", "random"),
    ("file family without a file", {"directions": {"family": "file"}}, "directions", ".npy"),
    ("text kind without a file", {"prompts": {"T": 4, "count": 1, "kinds": ["text"]}}, "prompts", "text_file"),
    ("heartbeat >= ttl", {"lease": {"ttl_s": 5, "heartbeat_s": 5}}, "lease", "heartbeat_s must be < ttl_s"),
    ("no models", {"models": []}, "models", "at least 1"),
    ("bad sweep name", {"name": "my sweep!"}, "name", "pattern"),
    ("cells_per_unit zero", {"cells_per_unit": 0}, "cells_per_unit", "greater than or equal to 1"),
    ("gpus per actor zero", {"resources": {"gpus_per_actor": 0}}, "resources.gpus_per_actor", "greater than 0"),
    ("unknown fused_kl mode", {"engine": {"fused_kl": "maybe"}}, "engine.fused_kl", "'auto'"),
]


@pytest.mark.parametrize("why,change,field,words", BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_invalid_spec_names_field(tmp_path: Path, why: str, change: dict, field: str, words: str) -> None:
    d = spec_dict("bad", tmp_path / "out")
    d.update(change)
    with pytest.raises(InvalidInput) as ei:
        spec_from_dict(d)
    assert ei.value.field == field, str(ei.value)
    assert words in str(ei.value), str(ei.value)


def test_valid_spec_and_lattice(tmp_path: Path) -> None:
    s = spec_from_dict(spec_dict("ok", tmp_path, eps={"start": 1e-5, "stop": 1, "per_decade": 2}))
    eps = s.eps_list()
    assert len(eps) == 11 and eps[0] == 1e-5 and eps[-1] == 1.0
    # The lattice gives the same floats for an old value whatever the range around it.
    assert set(log_lattice(1e-3, 1, 2)) <= set(log_lattice(1e-5, 10, 2))
    assert s.position_list() == [1, 2, 3]
    copy1 = spec_from_dict(spec_dict("ok", tmp_path, positions="copy1"))
    assert copy1.position_list() == [1, 2, 3, 4]
    rng = spec_from_dict(spec_dict("ok", tmp_path, positions={"start": 1, "stop": 8, "step": 3}))
    assert rng.position_list() == [1, 4, 7]


def test_load_spec_yaml_errors(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(InvalidInput, match="valid YAML"):
        load_spec(p)
    with pytest.raises(InvalidInput, match="an existing YAML file"):
        load_spec(tmp_path / "missing.yaml")
    p.write_text("- a list\n")
    with pytest.raises(InvalidInput, match="YAML mapping"):
        load_spec(p)


def test_directions_file_checked(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = rng.normal(size=(3, 16))
    good /= np.linalg.norm(good, axis=1, keepdims=True)
    np.save(tmp_path / "u.npy", good)
    np.save(tmp_path / "notunit.npy", good * 2)
    np.save(tmp_path / "wide.npy", np.eye(3, 17))
    base = spec_dict("f", tmp_path)
    ok = spec_from_dict({**base, "directions": {"family": "file", "file": str(tmp_path / "u.npy")}})
    p = plan(ok, meta_fn=_meta)
    assert {u.params["directions"]["count"] for u in p.units} == {3}
    assert all(u.params["directions"]["sha256"] for u in p.units)
    for name, words in (("notunit.npy", "unit rows"), ("wide.npy", "d_model = 16"), ("nope.npy", "readable")):
        s = spec_from_dict({**base, "directions": {"family": "file", "file": str(tmp_path / name)}})
        with pytest.raises(InvalidInput, match=words) as ei:
            plan(s, meta_fn=_meta)
        assert ei.value.field == "directions.file"


def test_model_checks_against_metadata(tmp_path: Path) -> None:
    base = spec_dict("m", tmp_path)
    with pytest.raises(InvalidInput, match=r"0\.\.3") as ei:
        plan(spec_from_dict({**base, "layers": [0, 4]}), meta_fn=_meta)
    assert ei.value.field == "layers"
    with pytest.raises(InvalidInput, match=r"T <= 31") as ei:
        plan(spec_from_dict({**base, "prompts": {"T": 40, "count": 1}, "positions": [1]}), meta_fn=_meta)
    assert ei.value.field == "prompts.T"
    with pytest.raises(InvalidInput) as ei:
        plan(spec_from_dict({**base, "record": {"layers": [5]}}), meta_fn=_meta)
    assert ei.value.field == "record.layers"


def test_plan_keys_deterministic_and_widening(tmp_path: Path) -> None:
    s = spec_from_dict(spec_dict("w", tmp_path, eps={"start": 1e-3, "stop": 1e-1, "per_decade": 1},
                                 cells_per_unit=1000))
    p1 = plan(s, meta_fn=_meta)
    # 2 prompts x 2 layers; 3 positions x (3 eps + linear) x 2 kinds x 2 dirs = 48 cells fit one unit.
    assert len(p1.units) == 4 and sum(u.n_cells for u in p1.units) == p1.total_cells == 4 * 48
    assert [u.key for u in plan(s, meta_fn=_meta).units] == [u.key for u in p1.units]
    assert len({u.key for u in p1.units}) == 4
    for u in p1.units:
        assert u.key == unit_key(u.params)
    existing = [u.params for u in p1.units]
    assert plan(s, existing=existing, meta_fn=_meta).units == []  # same spec again: nothing
    wide = spec_from_dict(spec_dict("w", tmp_path, eps={"start": 1e-5, "stop": 1, "per_decade": 1},
                                    cells_per_unit=1000))
    assert sweep_hash(wide) == sweep_hash(s)  # the database accepts the widened spec
    p2 = plan(wide, existing=existing, meta_fn=_meta)
    new_eps = {e for u in p2.units for e in u.params["eps"]}
    assert new_eps == {1e-5, 1e-4, 1.0}
    assert not any(u.params["linear"] for u in p2.units)  # linear was covered already
    assert {u.key for u in p2.units}.isdisjoint({u.key for u in p1.units})
    assert sum(u.n_cells for u in p2.units) == 2 * 2 * 3 * 3 * 2 * 2
    # Changing what the numbers mean (T) changes the sweep's identity: the db refuses it.
    other = spec_from_dict(spec_dict("w", tmp_path, prompts={"T": 5, "count": 2}))
    assert sweep_hash(other) != sweep_hash(s)


def test_cells_per_unit_chunks(tmp_path: Path) -> None:
    s = spec_from_dict(spec_dict("c", tmp_path, eps=[1e-3, 1e-2, 1e-1], linear=False, cells_per_unit=4))
    p = plan(s, meta_fn=_meta)
    # 4 cells per (eps, position) already (2 kinds x 2 dirs): one eps and one position a unit.
    assert all(len(u.params["eps"]) == 1 and len(u.params["positions"]) == 1 for u in p.units)
    assert len(p.units) == 2 * 2 * 3 * 3


def test_unit_key_same_in_another_process(tmp_path: Path) -> None:
    s = spec_from_dict(spec_dict("k", tmp_path))
    u = plan(s, meta_fn=_meta).units[0]
    code = ("import json,sys; from orchestrator.planner import unit_key; "
            "print(unit_key(json.loads(sys.stdin.read())))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(u.params), text=True,
                         capture_output=True, cwd=ROOT, check=True, env={"PYTHONHASHSEED": "123",
                                                                         "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == u.key


def test_examples_validate() -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        spec = load_spec(path)
        assert spec.name and spec.eps_list()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_cli_rejects_before_any_write(tmp_path: Path, backend: str, capsys: pytest.CaptureFixture) -> None:
    """Bad specs through `unisweep run`: exit 2, one clear line, the database unchanged."""
    from db.store import connect
    from orchestrator.cli import main
    from tests.fixtures_db import make_db_url

    with make_db_url(backend, tmp_path) as url:
        good = spec_dict("cli-ok", tmp_path / "out")
        p = tmp_path / "good.yaml"
        p.write_text(yaml.safe_dump(good))
        with pytest.raises(SystemExit) as ei:
            main(["run", str(p), "--db", url, "--plan-only"])
        assert ei.value.code in (0, None)
        store = connect(url)
        before = store.table_arrow("units").num_rows
        assert before > 0
        model_bad = [({"layers": [0, 99]}, "layers"), ({"prompts": {"T": 50_000, "count": 1}}, "prompts.T"),
                     ({"models": ["/nonexistent/model-folder"]}, "models")]
        for change, field in [*((c, f) for _, c, f, _ in BAD_SPECS[:6]), *model_bad]:
            d = copy.deepcopy(good)
            d.update(change)
            d["name"] = "cli-bad"
            p.write_text(yaml.safe_dump(d))
            capsys.readouterr()
            with pytest.raises(SystemExit) as ei:
                main(["run", str(p), "--db", url])
            err = capsys.readouterr().err
            assert ei.value.code == 2, err
            assert f"invalid {field}" in err and "allowed" in err, (change, err)
            assert "Traceback" not in err
        assert store.table_arrow("units").num_rows == before
        assert [s.name for s in store.list_sweeps()] == ["cli-ok"]
        store.close()
