"""Hub names, folders and revisions offline: a local HF cache built by the test, training
checkpoints as a sweep axis, and unknown names failing in under 2 s without network retries."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch

from analysis.synthetic import SyntheticSpec, write_synthetic_sweep
from analysis.views import open_sweep
from orchestrator.spec import spec_from_dict
from tasks.errors import InvalidInput
from tasks.models import load_model
from tasks.tiny import tiny_config

REPO = "acme/tiny-neox"
REVISIONS = {"step1": 1, "step2": 2}  # revision -> init seed of its random checkpoint


def _checkpoint(seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("gpt_neox"))


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A local HF hub cache: models--acme--tiny-neox with one snapshot per revision."""
    root = tmp_path_factory.mktemp("hub")
    repo = root / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    commits = {}
    for rev, seed in REVISIONS.items():
        commit = hashlib.sha1(rev.encode()).hexdigest()
        _checkpoint(seed).save_pretrained(repo / "snapshots" / commit)
        (repo / "refs" / rev).write_text(commit)
        commits[rev] = commit
    return root, commits


@pytest.fixture
def offline(monkeypatch, hub_cache):
    root, commits = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return commits


def _same_weights(model, seed: int) -> bool:
    ref = _checkpoint(seed).state_dict()
    return all(torch.equal(p.detach().float(), ref[k].float()) for k, p in model.state_dict().items()
               if k in ref)


def test_revisions_load_from_the_local_hub_cache_offline(offline):
    a = load_model(f"{REPO}@step1")  # runs the start-up check
    b = load_model(f"{REPO}@step2")
    assert a.identity == {"name": REPO, "revision": offline["step1"], "revision_name": "step1",
                          "dtype": "float32"}
    assert b.identity["revision"] == offline["step2"] and a.model_id == f"{REPO}@step1"
    assert _same_weights(a.model, 1) and _same_weights(b.model, 2)
    assert not _same_weights(a.model, 2)
    # No tokenizer in a bare checkpoint: the config's special ids make the token space.
    assert a.tokenizer is None and a.token_space.special_ids == frozenset({0, 1, 2})


def test_a_folder_per_revision(tmp_path):
    for rev, seed in REVISIONS.items():
        _checkpoint(seed).save_pretrained(tmp_path / "pythia" / rev)
    a = load_model(f"{tmp_path / 'pythia'}@step1", check=False)
    b = load_model(f"{tmp_path / 'pythia'}@step2", check=False)
    assert _same_weights(a.model, 1) and _same_weights(b.model, 2)
    assert a.identity["revision_name"] == "step1" and b.identity["revision_name"] == "step2"
    with pytest.raises(InvalidInput, match="subfolder 'step9' holding config.json"):
        load_model(f"{tmp_path / 'pythia'}@step9")


def test_spec_revisions_plan_one_model_identity_per_revision(offline, tmp_path):
    from orchestrator.model_meta import model_meta
    from orchestrator.planner import plan

    model_meta.cache_clear()
    spec = spec_from_dict({
        "name": "ckpts", "models": [{"name": REPO, "revisions": ["step1", "step2"]}],
        "dtype": "float32", "prompts": {"T": 4, "count": 1}, "layers": [0],
        "positions": [1], "eps": [1e-2], "directions": {"count": 1},
        "output": str(tmp_path / "out")})
    assert spec.model_dtypes() == [(f"{REPO}@step1", "float32"), (f"{REPO}@step2", "float32")]
    p = plan(spec)
    by_model: dict[str, set] = {}
    for u in p.units:
        by_model.setdefault(u.group, set()).add(u.key)
    assert set(by_model) == {f"{REPO}@step1|float32", f"{REPO}@step2|float32"}
    keys1, keys2 = by_model.values()
    assert keys1 and keys2 and not keys1 & keys2
    revisions = {meta.identity["revision"] for meta in p.metas.values()}
    assert revisions == {offline["step1"], offline["step2"]}


@pytest.mark.parametrize("bad", [
    {"revisions": []}, {"revisions": ["a", "a"]}, {"revisions": ["x@y"]}, {"revisions": [""]}])
def test_bad_revisions_are_refused(bad, tmp_path):
    with pytest.raises(InvalidInput, match="models"):
        spec_from_dict({"name": "s", "models": [{"name": REPO, **bad}], "prompts": {"T": 4, "count": 1},
                        "layers": [0], "positions": [1], "eps": [1e-2],
                        "output": str(tmp_path / "out")})


def test_analysis_groups_by_revision(tmp_path):
    spec = SyntheticSpec(models=((f"{REPO}@step1", 4), (f"{REPO}@step2", 4), ("synth-b", 4)),
                         n_prompts=1, lps=(0,), positions=(1, 2))
    con = open_sweep(write_synthetic_sweep(spec, tmp_path))
    rows = con.execute("SELECT model_name, revision, count(*) FROM responses "
                       "GROUP BY ALL ORDER BY revision NULLS LAST").fetchall()
    assert [(m, r) for m, r, _ in rows] == [(REPO, "step1"), (REPO, "step2"), ("synth-b", None)]
    assert rows[0][2] == rows[1][2] == rows[2][2] > 0


# ---------------------------------------------------------------------------------------------
# Unknown names fail fast (issue 15, item 10: 34-37 s of network retries before).


def _timed_refusal(name: str, match: str) -> float:
    from transformers import AutoModelForCausalLM  # noqa: F401  (imports are not the point)

    t0 = time.perf_counter()
    with pytest.raises(InvalidInput, match=match):
        load_model(name)
    return time.perf_counter() - t0


def test_unknown_name_fails_in_under_2s_offline(offline):
    assert _timed_refusal("acme/no-such-model", r"not in the local HF cache.*HF_HUB_OFFLINE") < 2.0
    # A cached repo at a revision it does not hold is unknown too.
    assert _timed_refusal(f"{REPO}@step9", r"at revision 'step9'.*HF_HUB_OFFLINE") < 2.0


def test_unknown_name_fails_in_under_2s_when_the_hub_is_unreachable(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    assert _timed_refusal("acme/no-such-model", r"not in the local HF cache.*unreachable") < 2.0


def test_planning_an_unknown_name_fails_fast_naming_models(offline):
    from orchestrator.model_meta import model_meta

    model_meta.cache_clear()
    t0 = time.perf_counter()
    with pytest.raises(InvalidInput, match="invalid models.*acme/nothing-here"):
        model_meta("acme/nothing-here")
    assert time.perf_counter() - t0 < 2.0


def test_a_file_that_is_not_a_model_is_refused(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    with pytest.raises(InvalidInput, match="a file that is not a .gguf"):
        load_model(str(f))
    assert Path(f).exists()
