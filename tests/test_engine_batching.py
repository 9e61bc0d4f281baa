"""Cross-position batching and the memory budget on tiny GPT2/Llama/Gemma configs.

Several positions j in one pass (starting at the smallest j, one shared baseline) give the
per-position passes' numbers in float64 to 1e-9 and the naive reference's; exact zeros
before j and at a vanishing eps; the planner never exceeds the rows it is given; a budget
too small for one pass fails before any compute, naming the budget that would fit.
"""

from __future__ import annotations

import pytest
import torch

from tasks import engine
from tasks.batching import SAFETY, RowModel, pack_positions, rows_per_pass
from tasks.engine import (
    clean_pass,
    compute_responses,
    linear_group,
    linear_sites,
    perturb_group,
    perturb_sites,
    suffix_start,
)
from tasks.errors import InvalidInput
from tasks.models import load_model
from tests.fixtures_models import clean_setup, rel_error
from tests.reference import naive_cell

EPS = torch.tensor([1e-5, 1e-2, 0.7], dtype=torch.float64)
SITES = [2, 5, 9, 14]



@pytest.fixture(scope="module")
def setup(tiny_f64):
    return (tiny_f64, *clean_setup(tiny_f64))


def test_batched_positions_equal_per_position_passes_and_the_reference(setup):
    lm, _prompts, ids, clean, dirs = setup
    lp = 1
    batched = perturb_sites(lm, clean, lp, SITES, EPS, dirs)
    assert [r.j for r in batched] == SITES
    start = batched[0].i0
    assert start == suffix_start(SITES[0], ids.shape[1], lm.dtype)
    for res in batched:
        j = res.j
        single = perturb_group(lm, clean, lp, j, EPS, dirs)
        k = j - single.i0  # the single pass starts later: compare on its positions
        off = single.i0 - start
        # Causality inside the shared pass: positions before j are exactly the baseline.
        assert torch.count_nonzero(res.r[..., : j - start]) == 0
        assert torch.count_nonzero(res.kl[..., : j - start]) == 0
        assert rel_error(res.r[..., off + k:], single.r[..., k:]) < 1e-9
        assert rel_error(res.r_attn[..., off + k:], single.r_attn[..., k:]) < 1e-9
        assert rel_error(res.r_mlp[..., off + k:], single.r_mlp[..., k:]) < 1e-9
        assert rel_error(res.kl[..., off + k:], single.kl[..., k:]) < 1e-9
    # And against the naive full forward per cell (one cell per site: prompt 1, eps 1e-2).
    for res in batched:
        r, r_attn, r_mlp, kl = naive_cell(lm, ids[1], lp, res.j, float(EPS[1]), dirs[1])
        c = 1 * len(dirs) + 1
        i = res.j - start
        assert rel_error(res.r[1, c, :, i:], r[lp:, res.j:]) < 1e-9
        assert rel_error(res.r_attn[1, c, :, i:], r_attn[lp:, res.j:]) < 1e-9
        assert rel_error(res.r_mlp[1, c, :, i:], r_mlp[lp:, res.j:]) < 1e-9
        assert rel_error(res.kl[1, c, i:], kl[res.j:]) < 1e-6  # the textbook KL cancels a little


def test_batched_linear_sites_equal_single_sites(setup):
    lm, _prompts, _ids, clean, dirs = setup
    batched = linear_sites(lm, clean, 2, SITES, dirs)
    for res in batched:
        single = linear_group(lm, clean, 2, res.j, dirs)
        off, k = single.i0 - res.i0, res.j - single.i0
        assert torch.count_nonzero(res.r[..., : res.j - res.i0]) == 0
        assert rel_error(res.r[..., off + k:], single.r[..., k:]) < 1e-9
        assert rel_error(res.kl[..., off + k:], single.kl[..., k:]) < 1e-9


def test_vanishing_eps_is_exactly_zero_in_float32_across_sites(setup):
    lm64, _prompts, ids, _clean, dirs = setup
    lm = load_model(lm64.model_id, dtype="float32")
    clean = clean_pass(lm, ids, [1])
    for res in perturb_sites(lm, clean, 1, SITES, torch.tensor([1e-30], dtype=torch.float64),
                             dirs):
        # 1e-30 * ||x|| vanishes when added in float32: one shared baseline on the same
        # kernel path makes every site's response exactly zero.
        assert torch.count_nonzero(res.r) == 0 and torch.count_nonzero(res.kl) == 0


def test_compute_responses_tables_equal_with_and_without_position_batching(setup):
    lm, prompts, _ids, _clean, dirs = setup
    args = dict(lps=[0, 2], positions=[1, 3, 4, 8, 15], eps=[1e-3, 0.3], directions=dirs,
                linear=True)
    keys = ["prompt_id", "prompt_kind", "lp", "j", "eps", "direction", "l", "i"]

    def table(**kw):
        tab = compute_responses(lm, prompts, **args, **kw)
        return tab.sort_by([(k, "ascending") for k in keys])

    calls = []
    real = engine.perturb_sites

    def counting(*a, **kw):
        calls.append(len(a[3]))
        return real(*a, **kw)

    engine.perturb_sites = counting
    try:
        batched = table()
        n_batched = len(calls)
        calls.clear()
        single = table(batch_positions=False)
    finally:
        engine.perturb_sites = real
    assert max(calls) == 1 and n_batched < len(calls)  # the planner did batch positions
    assert batched.num_rows == single.num_rows
    for k in keys:
        assert batched.column(k).equals(single.column(k)), k
    for col in ("r", "r_attn", "r_mlp", "kl"):
        a, b = batched.column(col), single.column(col)
        assert a.is_null().equals(b.is_null()), col
        a_t = torch.tensor(a.drop_null().to_numpy(), dtype=torch.float64)
        b_t = torch.tensor(b.drop_null().to_numpy(), dtype=torch.float64)
        # The table holds float32: float64 results that agree to 1e-9 round alike or to
        # neighbouring float32 values.
        assert float(((a_t - b_t).abs() / b_t.abs().clamp_min(1e-30)).max()) < 2e-7, col


def test_planner_packs_positions_within_the_rows_it_is_given():
    def start_of(j):
        return max(0, j - 2)

    for cap in (2, 3, 7, 20, 1000):
        for groups, base, site in ((1, 1, 1), (2, 1, 3), (1, 0, 4)):
            if groups * (base + site) > cap:
                continue
            batches = list(pack_positions(range(1, 33), groups, base, site, cap, 65, start_of, 64))
            assert sorted(j for b in batches for j in b) == list(range(1, 33))
            assert all(groups * (base + len(b) * site) <= cap for b in batches)
    # Close positions join; far ones do not when their own short suffix is cheaper.
    near = list(pack_positions([1, 2, 3], 1, 1, 4, 100, 65, start_of, 64))
    assert near == [(1, 2, 3)]
    far = list(pack_positions([1, 60], 1, 1, 4, 100, 65, start_of, 64))
    assert far == [(1,), (60,)]
    assert list(pack_positions([1, 2, 3], 1, 1, 4, 100, 65, start_of, 64,
                               batch_positions=False)) == [(1,), (2,), (3,)]


def test_rows_follow_the_memory_budget_and_too_small_fails_before_any_work(setup, monkeypatch):
    lm, prompts, _ids, _clean, dirs = setup
    n = prompts[0].n
    model = RowModel.of(lm)
    row = model.row_bytes(n, n, lm.n_layers, False)
    smallest_rows = []
    for budget in (1 << 20, 4 << 20, 64 << 20):
        got = rows_per_pass(lm, n, budget, False, None)
        # What the pass may hold (its rows and the KL's chunk) stays in the budget.
        assert got.rows * row + SAFETY * got.kl_bytes <= budget
        smallest_rows.append(got.rows)
    assert smallest_rows == sorted(smallest_rows) and smallest_rows[0] < smallest_rows[-1]

    def no_compute(*_a, **_k):
        raise AssertionError("computed before checking the memory")

    monkeypatch.setattr(engine, "clean_pass", no_compute)
    with pytest.raises(InvalidInput) as err:
        compute_responses(lm, prompts, lps=[0], positions=[1], eps=[0.1], directions=dirs,
                          memory_budget=1000)
    msg = str(err.value)
    assert "memory_budget" in msg and "at least" in msg
    needed = int(msg.split("at least ")[1].split(" bytes")[0])
    assert needed > 1000
    rows_per_pass(lm, n, needed, False, None)  # the named budget does fit
    with pytest.raises(InvalidInput):
        rows_per_pass(lm, n, needed - 1, False, None)
