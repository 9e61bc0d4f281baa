"""The fast engine equals the naive hook-per-cell reference on tiny GPT2/Llama/Gemma configs.

Float64, every eps, every level and position at or after the perturbation; plus causality,
zero-gives-zero, and the exact linear response against finite differences.
"""

from __future__ import annotations

import pytest
import torch

from tasks.engine import clean_pass, compute_responses, linear_group, perturb_group
from tasks.models import load_model
from tasks.prompts import make_prompts
from tests.fixtures_models import clean_setup, rel_error
from tests.reference import naive_cell

EPS = torch.tensor([1e-5, 1e-3, 1e-1, 0.7], dtype=torch.float64)



@pytest.fixture(scope="module")
def setup(tiny_f64):
    _, ids, clean, dirs = clean_setup(tiny_f64)
    return tiny_f64, ids, clean, dirs


@pytest.mark.parametrize("lp,j", [(0, 0), (0, 5), (2, 9), (3, 16)])
def test_engine_equals_naive_reference_float64(setup, lp, j):
    lm, ids, clean, dirs = setup
    res = perturb_group(lm, clean, lp, j, EPS, dirs)
    for g in range(ids.shape[0]):
        for e in range(len(EPS)):
            for d in range(len(dirs)):
                r, r_attn, r_mlp, kl = naive_cell(lm, ids[g], lp, j, float(EPS[e]), dirs[d])
                c = e * len(dirs) + d
                i0 = res.i0  # the pass may start a few clean positions before j
                assert torch.count_nonzero(res.r[g, c, :, : j - i0]) == 0
                assert rel_error(res.r[g, c, :, j - i0:], r[lp:, j:]) < 1e-9
                assert rel_error(res.r_attn[g, c, :, j - i0:], r_attn[lp:, j:]) < 1e-9
                assert rel_error(res.r_mlp[g, c, :, j - i0:], r_mlp[lp:, j:]) < 1e-9
                if EPS[e] >= 1e-3:
                    # The reference's textbook KL loses digits to cancellation below that.
                    assert rel_error(res.kl[g, c, j - i0:], kl[j:]) < 1e-5


def test_causality_zero_before_position_and_layer(setup):
    lm, ids, clean, dirs = setup
    lp, j = 2, 6
    # The reference (one full HF forward per cell): nothing leaks backwards in layers or
    # positions, exactly, because the computation before (lp, j) is the clean one.
    r, r_attn, r_mlp, _ = naive_cell(lm, ids[0], lp, j, 0.3, dirs[0])
    assert torch.count_nonzero(r[:lp]) == 0 and torch.count_nonzero(r[:, :j]) == 0
    assert torch.count_nonzero(r_attn[:lp]) == 0 and torch.count_nonzero(r_mlp[:, :j]) == 0
    # (Responses further right may be zero inside a sliding window: Gemma's tiny window is 8.)
    assert r[lp, j] > 0 and torch.all(r[lp + 1:, j:j + 4] > 0)
    # The engine without prefix reuse computes every level and position. In float32 every
    # row of a batch rounds alike (float64 GEMMs do not on ragged lengths), so the
    # baseline row cancels exactly and the zeros are exact.
    lm32 = load_model(lm.model_id, dtype="float32")
    clean32 = clean_pass(lm32, ids, range(lm32.n_layers))
    full = perturb_group(lm32, clean32, lp, j, EPS.float().double(), dirs, reuse_prefix=False)
    assert full.l0 == 0 and full.i0 == 0
    assert torch.count_nonzero(full.r[:, :, :lp]) == 0
    assert torch.count_nonzero(full.r[:, :, :, :j]) == 0
    assert torch.count_nonzero(full.r_attn[:, :, :lp]) == 0
    assert torch.count_nonzero(full.r_mlp[:, :, :, :j]) == 0
    assert torch.count_nonzero(full.kl[:, :, :j]) == 0
    assert torch.all(full.r[:, :, lp, j] > 0)
    # At the perturbed site itself R = eps, up to float32 rounding of x + delta (which is
    # relatively largest at the smallest eps).
    site = full.r[0, :, lp, j].view(len(EPS), -1)[:, 0].double()
    assert float(((site - EPS) / EPS).abs().max()) < 2e-3


def test_zero_perturbation_gives_exactly_zero(setup):
    lm, ids, clean, dirs = setup
    res = perturb_group(lm, clean, 1, 4, torch.tensor([1e-300], dtype=torch.float64), dirs)
    # 1e-300 * ||x|| vanishes when added: the same-path baseline makes the response exactly 0.
    assert torch.count_nonzero(res.r) == 0 and torch.count_nonzero(res.kl) == 0


def test_prefix_reuse_equals_full_pass(setup):
    lm, ids, clean, dirs = setup
    lp, j = 1, 7
    fast = perturb_group(lm, clean, lp, j, EPS, dirs)
    full = perturb_group(lm, clean, lp, j, EPS, dirs, reuse_prefix=False)
    assert rel_error(fast.r, full.r[:, :, lp:, fast.i0:]) < 1e-9


def test_linear_response_is_the_small_eps_limit(setup):
    lm, ids, clean, dirs = setup
    lp, j = 1, 3
    lin = linear_group(lm, clean, lp, j, dirs)
    k = j - lin.i0  # first computed position that can respond
    fin = perturb_group(lm, clean, lp, j, torch.tensor([1e-6], dtype=torch.float64), dirs)
    assert fin.i0 == lin.i0
    chi = fin.r[..., k:] / 1e-6
    # Finite differences at eps = 1e-6 carry O(eps) curvature: 1e-4 is ample and tight.
    assert rel_error(chi, lin.r[..., k:]) < 1e-4
    assert rel_error(fin.r_attn[..., k:] / 1e-6, lin.r_attn[..., k:]) < 1e-4
    assert rel_error(fin.r_mlp[..., k:] / 1e-6, lin.r_mlp[..., k:]) < 1e-4
    # KL / eps^2 -> 1/2 Var_p(dz) of the logit tangent.
    fin2 = perturb_group(lm, clean, lp, j, torch.tensor([1e-4], dtype=torch.float64), dirs)
    assert rel_error(fin2.kl[..., k:] / 1e-8, lin.kl[..., k:]) < 1e-2


def test_table_layout_and_record_filters(setup):
    lm, ids, clean, dirs = setup
    prompts = make_prompts(lm.token_space, T=8, count=1, seed=3)
    L = lm.n_layers
    tab = compute_responses(lm, prompts, lps=[1], positions=[2, 5], eps=[1e-3, 1e-1],
                            directions=dirs, linear=True)
    # rows: 2 prompts x 2 positions x (2 eps x 2 dirs + 2 linear) x levels 1..L x i >= j
    n = 17
    per_j = {2: n - 2, 5: n - 5}
    expected = sum(2 * 6 * L * per_j[j] for j in per_j)
    assert tab.num_rows == expected
    cols = tab.to_pydict()
    assert min(cols["l"]) == 1 and max(cols["l"]) == L
    assert all(i >= j for i, j in zip(cols["i"], cols["j"]))
    assert sum(e is None for e in cols["eps"]) == 2 * 2 * 2 * L * 0 + sum(
        2 * 2 * L * per_j[j] for j in per_j)
    assert all((k is None) == (lv != L) for k, lv in zip(cols["kl"], cols["l"]))
    assert all((a is None) == (lv == L) for a, lv in zip(cols["r_attn"], cols["l"]))
    small = compute_responses(lm, prompts, lps=[1], positions=[2], eps=[1e-3],
                              directions=dirs[:1], record_layers=[L], record_positions=[10, 11])
    assert small.num_rows == 2 * 1 * 2 and set(small.column("l").to_pylist()) == {L}
