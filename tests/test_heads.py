"""Per-head responses (tasks.heads) equal the naive reference, and the heads add up.

Float64 on the tiny GPT-2 (Conv1D c_proj), Llama (grouped-query), Gemma-2 and Gemma-3
(post-attention norm) configs, finite eps and the linear limit, every level and position.
"""

from __future__ import annotations

import pytest
import torch

from tasks.engine import linear_group, perturb_group
from tasks.heads import attention_patterns, default_offsets, head_projection, kept_positions
from tests.fixtures_models import clean_setup, rel_error
from tests.reference import _projection, _run_heads, head_contributions, naive_heads

EPS = torch.tensor([1e-4, 0.3], dtype=torch.float64)



@pytest.fixture(scope="module")
def setup(tiny_f64):
    _, ids, clean, dirs = clean_setup(tiny_f64)
    return tiny_f64, ids, clean, dirs


@pytest.mark.parametrize("lp,j", [(0, 2), (2, 9)])
def test_head_responses_equal_naive_reference_float64(setup, lp, j):
    lm, ids, clean, dirs = setup
    res = perturb_group(lm, clean, lp, j, EPS, dirs, heads=True)
    lin = linear_group(lm, clean, lp, j, dirs, heads=True)
    assert res.head_i.tolist() == list(range(j, ids.shape[1]))  # all offsets: every i >= j
    H = res.r_head.shape[3]
    assert H == 4
    for g in range(ids.shape[0]):
        for d in range(g, g + 1):  # one direction per prompt keeps the naive runs few
            for e in range(len(EPS)):
                want = naive_heads(lm, ids[g], lp, j, float(EPS[e]), dirs[d])  # [L, H, n]
                got = res.r_head[g, e * len(dirs) + d]  # [L - lp, H, n - j]
                assert rel_error(got, want[lp:, :, j:]) < 1e-9
            want = naive_heads(lm, ids[g], lp, j, None, dirs[d])
            assert rel_error(lin.r_head[g, d], want[lp:, :, j:]) < 1e-9
            assert float(want[lp:, :, j].min()) > 0  # every head responds at the site itself


def test_heads_are_causal_and_zero_before_the_site(setup):
    lm, ids, clean, dirs = setup
    want = naive_heads(lm, ids[0], 2, 6, 0.1, dirs[0])
    assert torch.count_nonzero(want[:2]) == 0 and torch.count_nonzero(want[:, :, :6]) == 0


@torch.no_grad()
def test_heads_sum_to_the_attention_output(setup):
    """sum_h W_O,h z_h + b is the attention module's output, clean and perturbed.

    For GPT-2 and Llama that vector is the one r_attn is the change of. For Gemma it is the
    input of post_attention_layernorm: r_attn is the change of that norm's output (what the
    block adds to the stream), so there the identity holds one step before r_attn.
    """
    lm, ids, _, dirs = setup
    blocks = lm.adapter.block_list(lm.model)
    for delta in (None, 0.2 * dirs[0]):
        x, z, proj_out, attn_out = _run_heads(lm, ids[0], 1, 4, delta)
        for b, blk in enumerate(blocks):
            proj = _projection(blk)
            hp = head_projection(lm, blk, torch.float64)
            bias = proj.bias if proj.bias is not None else torch.zeros(())
            by_reference = head_contributions(proj, z[b], hp.n_heads).sum(1) + bias
            by_engine_split = torch.einsum(
                "nhk,hkd->nd", z[b].unflatten(-1, (hp.n_heads, hp.head_dim)), hp.per_head) + bias
            assert rel_error(by_reference, attn_out[b]) < 1e-12
            assert rel_error(by_engine_split, attn_out[b]) < 1e-12
            assert torch.equal(proj_out[b], attn_out[b])
            if lm.family in ("gpt2", "llama"):
                # The adapter's attn_out module is the attention module itself here.
                assert lm.adapter.attn_module(blk) is (blk.attn if lm.family == "gpt2"
                                                       else blk.self_attn)


def test_default_offsets_keep_only_the_stripes_and_the_near_field(setup):
    lm, ids, clean, dirs = setup
    T, n = 8, ids.shape[1]
    assert default_offsets(T) == [0, 1, 2, 3, 7, 8]
    j = 5
    res = linear_group(lm, clean, 1, j, dirs, heads=True, head_offsets=default_offsets(T))
    assert res.head_i.tolist() == [5, 6, 7, 8, 12, 13]
    full = linear_group(lm, clean, 1, j, dirs, heads=True)
    idx = [i - j for i in res.head_i.tolist()]
    assert torch.equal(res.r_head, full.r_head[..., idx])
    # Offsets past the end of the prompt are dropped, not wrapped.
    assert kept_positions(14, 12, n, default_offsets(T)).tolist() == [2, 3, 4]
    # Recording heads changes nothing else.
    plain = linear_group(lm, clean, 1, j, dirs)
    assert plain.r_head is None and torch.equal(plain.r, full.r)


def test_attention_patterns_are_causal_distributions(setup):
    lm, ids, _, _ = setup
    a = attention_patterns(lm, ids)  # [L, G, H, n, n]
    n = ids.shape[1]
    assert a.shape == (lm.n_layers, 2, 4, n, n)
    assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)
    assert torch.count_nonzero(torch.triu(a, diagonal=1)) == 0
