"""The clean pass cut at the last pass start (tasks.engine.clean_pass(prefix=)): every block on
the positions the suffix passes take from the cache, only the blocks below the deepest lp
beyond; its cache and residuals equal the full clean pass's in float64, and the engine's
results with it equal the naive reference (tests/test_engine_exact.py runs the full grid)."""

from __future__ import annotations

import pytest
import torch

from tasks import engine
from tasks.directions import random_directions
from tasks.engine import clean_pass, compute_responses
from tasks.prompts import make_prompts


@pytest.fixture(scope="module")
def setup(tiny_f64):
    lm = tiny_f64
    prompts = make_prompts(lm.token_space, T=8, count=1, seed=3)  # n = 17
    ids = torch.stack([p.input_ids for p in prompts])
    return lm, prompts, ids


@pytest.mark.parametrize("prefix", [0, 1, 6, 16])
def test_cut_clean_pass_equals_full(setup, prefix):
    lm, _, ids = setup
    levels = [0, lm.n_layers // 2]
    full = clean_pass(lm, ids, levels)
    cut = clean_pass(lm, ids, levels, prefix)
    for lvl in levels:
        assert cut.resid[lvl].shape == full.resid[lvl].shape
        assert torch.allclose(cut.resid[lvl], full.resid[lvl], rtol=0, atol=1e-12)
    for b, (k, v) in enumerate(zip(cut.keys, cut.values)):
        assert torch.allclose(k[:, :, :prefix], full.keys[b][:, :, :prefix], rtol=0, atol=1e-12)
        assert torch.allclose(v[:, :, :prefix], full.values[b][:, :, :prefix], rtol=0, atol=1e-12)
        # Blocks at or above the deepest level did not run past the prefix.
        want = ids.shape[1] if b < max(levels) else prefix
        assert k.shape[2] == want, (b, k.shape)


def test_engine_cuts_its_clean_pass_and_keeps_results(setup, monkeypatch):
    lm, prompts, _ = setup
    dirs = random_directions(lm.d_model, 1, seed=2)
    seen = []
    real = engine.clean_pass

    def spy(lm_, ids_, levels, prefix=None):
        seen.append(prefix)
        return real(lm_, ids_, levels, prefix)

    args = (lm, prompts, [0], [1, 9], [1e-3, 0.5], dirs)
    monkeypatch.setattr(engine, "clean_pass", spy)
    cut = compute_responses(*args)
    assert seen and all(p is not None and p < prompts[0].n for p in seen)
    monkeypatch.setattr(engine, "clean_pass", lambda lm_, ids_, levels, prefix=None:
                        real(lm_, ids_, levels))
    full = compute_responses(*args)
    for col in ("r", "r_attn", "r_mlp", "kl"):
        a = torch.tensor(cut.column(col).to_numpy(zero_copy_only=False))
        b = torch.tensor(full.column(col).to_numpy(zero_copy_only=False))
        ok = ~torch.isnan(b)
        assert torch.equal(torch.isnan(a), ~ok)
        assert torch.allclose(a[ok], b[ok], rtol=1e-9, atol=1e-15), col
