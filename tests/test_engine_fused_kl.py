"""The fused-KL switch (tasks.kl, spec `engine.fused_kl`): the engine's float64 results with
the compiled kernel on equal the eager ones to 1e-9 on tiny configs; the gate refuses an
inaccurate or failing kernel, records its verdict per torch version and CPU, and the engine
stays eager then; auto switches on only after enough eager KL work.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tasks import kl as klmod
from tasks.directions import random_directions
from tasks.engine import clean_pass, perturb_group
from tasks.kl import kl_from_logit_change, set_fused_kl_mode, use_fused_kl
from tasks.models import load_model
from tasks.prompts import make_prompts
from tests.reference import naive_cell

EPS = torch.tensor([1e-5, 1e-3, 1e-1, 0.7], dtype=torch.float64)


@pytest.fixture(autouse=True)
def _eager_after(tmp_path, monkeypatch):
    """Each test gets its own gate cache and leaves the process eager."""
    monkeypatch.setenv("UNISWEEP_CACHE", str(tmp_path / "cache"))
    yield
    set_fused_kl_mode("off")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_engine_with_fused_kl_equals_eager_and_reference_float64(family):
    lm = load_model(f"tiny:{family}", dtype="float64")
    prompts = make_prompts(lm.token_space, T=8, count=1, seed=3)
    ids = torch.stack([p.input_ids for p in prompts])
    clean = clean_pass(lm, ids, range(lm.n_layers))
    dirs = random_directions(lm.d_model, 2, seed=1)
    cases = [(0, 0), (1, 5), (lm.n_layers - 1, 9)]
    eager = [perturb_group(lm, clean, lp, j, EPS, dirs) for lp, j in cases]
    if not set_fused_kl_mode("on"):
        pytest.skip("torch.compile unavailable here (the gate logged why)")
    assert klmod._fused is not None
    for (lp, j), want in zip(cases, eager):
        got = perturb_group(lm, clean, lp, j, EPS, dirs)
        assert torch.equal(got.r, want.r)  # R does not go through the KL
        assert _rel(got.kl, want.kl) < 1e-9
        i0 = got.i0
        assert torch.count_nonzero(got.kl[..., : j - i0]) == 0  # clean positions: exactly 0
        for e in (1, 2, 3):  # the textbook KL of the reference cancels below 1e-3
            r, _, _, kl = naive_cell(lm, ids[0], lp, j, float(EPS[e]), dirs[0])
            assert _rel(got.kl[0, e * len(dirs), j - i0:], kl[j:]) < 1e-5
    # The gate's verdict is on disk: a second process would compile without re-checking.
    record = klmod._read_gate(klmod.gate_cache_path(), klmod._gate_key(
        (torch.float32, torch.float64), "cpu"))
    assert record["passed"] is True and record["gate_s"] > 0


def _inaccurate(fn, **_kw):
    """A stand-in for torch.compile returning the textbook KL, which cancels at small eps."""
    def kernel(p, dz):
        logp = torch.log(p)
        logq = torch.log_softmax(logp + dz, -1)
        return (logq.exp() * (logq - logp)).sum(-1), torch.zeros(dz.shape[:-1], dtype=dz.dtype)
    return kernel


def test_gate_refuses_an_inaccurate_kernel_and_remembers(monkeypatch, caplog):
    monkeypatch.setattr(klmod.torch, "compile", _inaccurate)
    with caplog.at_level(logging.WARNING, logger="tasks.kl"):
        assert use_fused_kl(True) is False
    assert klmod._fused is None
    lines = [r.getMessage() for r in caplog.records if r.name == "tasks.kl"]
    assert len(lines) == 1 and "fused KL off" in lines[0] and "exceeds" in lines[0]
    # Remembered: the next process does not even compile.
    def no_compile(*_a, **_k):
        raise AssertionError("compiled again although the cache says the gate failed")
    monkeypatch.setattr(klmod.torch, "compile", no_compile)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tasks.kl"):
        assert set_fused_kl_mode("on") is False
    assert "cached" in caplog.records[-1].getMessage()
    # And the engine's KL is the eager one: exact at small eps in float64.
    errors = klmod.kl_accuracy_errors(kl_from_logit_change, torch.float64)
    assert max(errors.values()) < 1e-9


def test_gate_falls_back_when_compile_fails(monkeypatch, caplog):
    def broken(fn, **_kw):
        def kernel(p, dz):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return kernel
    monkeypatch.setattr(klmod.torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="tasks.kl"):
        assert set_fused_kl_mode("on") is False
    msg = caplog.records[-1].getMessage()
    assert "torch.compile failed (RuntimeError: no C++ compiler found)" in msg
    assert "second line" not in msg  # one log line


def test_kernel_failing_at_first_use_falls_back_to_eager(caplog):
    def fails(p, dz):
        raise RuntimeError("inductor: compilation error")
    klmod._fused = fails
    gen = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(3, 50, generator=gen, dtype=torch.float64), -1)
    dz = torch.randn(2, 3, 50, generator=gen, dtype=torch.float64) * 1e-3
    with caplog.at_level(logging.WARNING, logger="tasks.kl"):
        got = kl_from_logit_change(p, dz)
    assert klmod._fused is None and "first use" in caplog.records[-1].getMessage()
    assert torch.equal(got, klmod._kl_small(p, dz)[0])


def test_auto_switches_on_after_enough_eager_work(monkeypatch):
    # The uncompiled fusable formula stands in for the compiled one: the switch, not inductor.
    monkeypatch.setattr(klmod.torch, "compile", lambda fn, **_kw: fn)
    monkeypatch.setattr(klmod, "AUTO_AFTER_ELEMENTS", 1000)
    monkeypatch.setattr(klmod, "has_compiler", lambda device="cpu": True)
    assert set_fused_kl_mode("auto") is False
    p = torch.softmax(torch.randn(2, 100, dtype=torch.float64), -1)
    dz = torch.randn(2, 2, 100, dtype=torch.float64) * 1e-2
    kl_from_logit_change(p, dz)  # 400 elements: still eager
    assert klmod._fused is None
    kl_from_logit_change(p, dz)
    kl_from_logit_change(p, dz)  # 1200: switched on (the gate passed)
    assert klmod._fused.compiled is klmod._kl_small_fusable
    assert torch.allclose(kl_from_logit_change(p, dz), klmod._kl_small(p, dz)[0], rtol=1e-9)


def test_auto_stays_eager_without_a_compiler(monkeypatch):
    monkeypatch.setattr(klmod, "AUTO_AFTER_ELEMENTS", 10)
    monkeypatch.setattr(klmod.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert set_fused_kl_mode("auto") is False
    p = torch.softmax(torch.randn(2, 100, dtype=torch.float64), -1)
    kl_from_logit_change(p, torch.randn(2, 100, dtype=torch.float64))
    assert klmod._fused is None and klmod._mode == "off"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="fused_kl must be one of auto, on, off"):
        set_fused_kl_mode("maybe")


def test_each_vocabulary_is_checked_at_first_use(monkeypatch, caplog):
    """The gate runs at 400 tokens; a kernel that is right there but wrong at the model's
    vocabulary is caught at its first use there, and the KL stays eager (and exact)."""
    def right_only_at_400(p, dz):
        kl, G = klmod._kl_small(p, dz)
        return (kl if dz.shape[-1] == 400 else kl * 1.01), G
    monkeypatch.setattr(klmod.torch, "compile", lambda fn, **_kw: right_only_at_400)
    assert use_fused_kl(True, cache=False) is True
    gen = torch.Generator().manual_seed(6)
    p = torch.softmax(torch.randn(3, 400, generator=gen, dtype=torch.float64), -1)
    dz = torch.randn(2, 3, 400, generator=gen, dtype=torch.float64) * 1e-3
    assert _rel(kl_from_logit_change(p, dz), klmod._kl_small(p, dz)[0]) < 1e-12
    assert klmod._fused is not None  # 400: checked by the gate, used
    p = torch.softmax(torch.randn(3, 1000, generator=gen, dtype=torch.float64), -1)
    dz = torch.randn(2, 3, 1000, generator=gen, dtype=torch.float64) * 1e-3
    with caplog.at_level(logging.WARNING, logger="tasks.kl"):
        got = kl_from_logit_change(p, dz)
    assert klmod._fused is None
    msg = caplog.records[-1].getMessage()
    assert "first use" in msg and "inaccurate at vocabulary 1000" in msg
    assert torch.equal(got, klmod._kl_small(p, dz)[0])


@pytest.mark.slow
def test_compiled_kernel_at_a_real_vocabulary_every_row_shape():
    """The real compiled kernel, vocabulary static and rows dynamic: one, several, cells and
    positions of one or more, float32 and float64, against the eager float64 formula."""
    if not use_fused_kl(True, cache=False):
        pytest.skip("torch.compile unavailable here (the gate logged why)")
    gen = torch.Generator().manual_seed(7)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        z0 = torch.randn(5, 6000, generator=gen, dtype=torch.float64) * 3
        for cells, s in ((1, 1), (1, 5), (3, 1), (4, 5), (2, 3)):
            p64 = torch.softmax(z0[:s], -1)
            dz = torch.randn(cells, s, 6000, generator=gen, dtype=torch.float64) * 1e-3
            got = kl_from_logit_change(p64.to(dtype), dz.to(dtype))
            assert klmod._fused is not None, (dtype, cells, s)
            assert got.shape == (cells, s) and got.dtype == dtype
            assert _rel(got.double(), klmod._kl_small(p64, dz)[0]) < tol, (dtype, cells, s)
    assert {(torch.float32, 6000), (torch.float64, 6000)} <= klmod._fused.checked
