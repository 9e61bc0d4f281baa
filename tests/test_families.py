"""Every architecture family in tasks/tiny.py: discovered layout, exact float64 responses.

For each tiny random config: what discovery found (sections, parallel blocks, final norm),
the start-up check, and the fast engine against the naive references (finite eps and the
jvp limit) to 1e-9. The README's families table is generated from these results
(UNISWEEP_UPDATE_DOCS=1 rewrites it; otherwise the test fails when it is stale).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from tasks import adapters
from tasks.adapters import UnsupportedArchitecture
from tasks.check import StartupCheckFailed
from tasks.directions import random_directions
from tasks.engine import clean_pass, linear_group, perturb_group
from tasks.models import load_model
from tasks.prompts import make_prompts
from tasks.tiny import TINY
from tests.fixtures_models import rel_error
from tests.reference import naive_cell, naive_linear_cell

# family -> (display name, attention section, MLP section, parallel block).
EXPECTED = {
    "gpt2": ("GPT-2", "attn", "mlp", False),
    "llama": ("Llama", "self_attn", "mlp", False),
    "gemma2": ("Gemma-2", "post_attention_layernorm", "post_feedforward_layernorm", False),
    "gemma3": ("Gemma-3", "post_attention_layernorm", "post_feedforward_layernorm", False),
    "mistral": ("Mistral", "self_attn", "mlp", False),
    "qwen2": ("Qwen2", "self_attn", "mlp", False),
    "qwen3": ("Qwen3", "self_attn", "mlp", False),
    "gemma": ("Gemma", "self_attn", "mlp", False),
    "phi3": ("Phi-3", "self_attn", "mlp", False),
    "olmo": ("OLMo", "self_attn", "mlp", False),
    "olmo2": ("OLMo-2", "post_attention_layernorm", "post_feedforward_layernorm", False),
    "gpt_neox": ("GPT-NeoX (Pythia)", "attention", "mlp", True),
    "gpt_neox_seq": ("GPT-NeoX, sequential residual", "attention", "mlp", False),
    "falcon": ("Falcon (7B style)", "self_attention", "mlp", True),
    "falcon_new": ("Falcon (40B style)", "self_attention", "mlp", True),
    "stablelm": ("StableLM", "self_attn", "mlp", False),
    "granite": ("Granite", "self_attn", "mlp", False),
    "cohere": ("Cohere", "self_attn", "mlp", True),
    "phi": ("Phi-2", "self_attn", "mlp", True),
    "gptj": ("GPT-J", "attn", "mlp", True),
    "gpt_bigcode": ("GPT-BigCode (StarCoder)", "attn", "mlp", False),
    "mixtral": ("Mixtral (MoE)", "self_attn", "mlp", False),
    "qwen2_moe": ("Qwen2-MoE", "self_attn", "mlp", False),
    "qwen3_moe": ("Qwen3-MoE", "self_attn", "mlp", False),
}
MOE = {"mixtral", "qwen2_moe", "qwen3_moe"}
# A small eps (float precision) and a large one (nonlinear, where the reference's KL is exact).
EPS = torch.tensor([1e-5, 0.3], dtype=torch.float64)
TOL = 1e-9
# family -> (worst relative difference against the naive references, its Adapter), filled
# as the exactness tests pass.
MEASURED: dict[str, tuple[float, adapters.Adapter]] = {}



def test_every_tiny_family_has_an_expected_layout():
    assert set(EXPECTED) == set(TINY)


@pytest.fixture(scope="module", params=sorted(TINY))
def family(request):
    return (request.param, *_tiny_f64(request.param))


def test_discovered_layout(family):
    name, lm, _ = family
    ad = lm.adapter
    _, attn, mlp, parallel = EXPECTED[name]
    assert (ad.attn_out, ad.mlp_out, ad.parallel) == (attn, mlp, parallel)
    blk = ad.block_list(lm.model)[0]
    proj = ad.attn_proj_module(blk)
    assert ad.n_heads * ad.head_dim in tuple(proj.weight.shape)


def _exactness(name, lm, ids) -> float:
    """Worst relative difference of R, sections, KL and the jvp limits against the naive
    references over two perturbation sites; asserts each is within TOL."""
    L = lm.n_layers
    clean = clean_pass(lm, ids[None], range(L))
    dirs = random_directions(lm.d_model, 1, seed=1)
    worst = 0.0
    for lp, j in [(0, 2), (L - 1, 7)]:
        res = perturb_group(lm, clean, lp, j, EPS, dirs)
        k = j - res.i0
        for e in range(len(EPS)):
            r, r_attn, r_mlp, kl = naive_cell(lm, ids, lp, j, float(EPS[e]), dirs[0])
            before = res.r[0, e, :, :k]  # clean positions the pass computed before j
            if name in MOE:
                # Experts gather the tokens routed to them from every row of the batch, so a
                # perturbed row can change the GEMM shapes of the baseline row: rounding only.
                assert float(before.abs().sum()) < 1e-12
            else:
                assert torch.count_nonzero(before) == 0
            errs = [rel_error(res.r[0, e, :, k:], r[lp:, j:]),
                    rel_error(res.r_attn[0, e, :, k:], r_attn[lp:, j:]),
                    rel_error(res.r_mlp[0, e, :, k:], r_mlp[lp:, j:])]
            # The reference's textbook KL, sum q (log q - log p), cancels at small changes
            # (1e-9 holds at eps >= 0.1 only); the jvp below checks the small-eps limit.
            if EPS[e] >= 0.1:
                errs.append(rel_error(res.kl[0, e, k:], kl[j:]))
            assert max(errs) < TOL, (name, lp, j, float(EPS[e]), errs)
            worst = max(worst, *errs)
        lin = linear_group(lm, clean, lp, j, dirs)
        r, r_attn, r_mlp, kl = naive_linear_cell(lm, ids, lp, j, dirs[0])
        errs = [rel_error(lin.r[0, 0, :, k:], r[lp:, j:]), rel_error(lin.r_attn[0, 0, :, k:], r_attn[lp:, j:]),
                rel_error(lin.r_mlp[0, 0, :, k:], r_mlp[lp:, j:]), rel_error(lin.kl[0, 0, k:], kl[j:])]
        assert max(errs) < TOL, (name, "jvp", lp, j, errs)
        worst = max(worst, *errs)
    return worst


def _tiny_f64(name):
    lm = load_model(f"tiny:{name}", dtype="float64")  # runs the start-up check
    ids = make_prompts(lm.token_space, T=5, count=1, seed=3)[0].input_ids  # repeat, n = 11
    return lm, ids


def test_engine_equals_naive_references_float64(family):
    name, lm, ids = family
    MEASURED[name] = (_exactness(name, lm, ids), lm.adapter)


# ---------------------------------------------------------------------------------------------
# What discovery cannot handle, and what the start-up check refuses.


def test_undiscoverable_model_fails_before_compute_naming_what_is_missing():
    from transformers import AutoModelForCausalLM, OPTConfig

    # OPT's block computes its MLP inline (fc1, fc2): there is no MLP module to find.
    cfg = OPTConfig(num_hidden_layers=2, hidden_size=16, ffn_dim=32, num_attention_heads=2,
                    word_embed_proj_dim=16, vocab_size=50, max_position_embeddings=32)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedArchitecture,
                       match=r"'opt'.*MLP module of block OPTDecoderLayer not found.*fc1 "
                             r"\(Linear\).*EXCEPTIONS\['opt'\].*tasks/adapters.py"):
        adapters.adapter_for(model)


@pytest.mark.parametrize("override,level", [
    # Gemma-2's raw attention output is not what its block adds (the post-norm is).
    ({"attn_out": "self_attn"}, r"block 0: x_1 - x_0 is not the sum of the attention "
                                r"\('self_attn'\)"),
    # A head without its logit scale.
    ({"logit_multiplier": 1.0}, r"logits from x_3 through the final norm"),
])
def test_startup_check_refuses_a_wrong_layout_naming_the_level(monkeypatch, override, level):
    family = "gemma2" if "attn_out" in override else "cohere"
    monkeypatch.setitem(adapters.EXCEPTIONS, family, override)
    with pytest.raises(StartupCheckFailed, match=level + r".*EXCEPTIONS"):
        load_model(f"tiny:{family}", dtype="float64")


# ---------------------------------------------------------------------------------------------
# The README's families table, generated from the results above.

BEGIN = "<!-- families:begin (generated by tests/test_families.py; UNISWEEP_UPDATE_DOCS=1 rewrites) -->"
END = "<!-- families:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def _table() -> str:
    rows = ["| Family | `tiny:` name | model_type | Block | Attention section | MLP section "
            "| Final norm | float64 vs naive (R, sections, KL, jvp) |",
            "|---|---|---|---|---|---|---|---|"]
    for name in EXPECTED:
        ad = MEASURED[name][1]
        block = "parallel" if ad.parallel else "sequential"
        if ad.residual_scale != 1.0:
            block += ", residual multiplier"
        rows.append(f"| {EXPECTED[name][0]} | `{name}` | `{ad.family}` | {block} | "
                    f"`{ad.attn_out}` | `{ad.mlp_out}` | `{ad.final_norm}` | exact (< 1e-9) |")
    return "\n".join(rows)


def test_readme_families_table_is_generated_from_passing_tests():
    for name in sorted(set(EXPECTED) - set(MEASURED)):  # when run alone: measure them here
        lm, ids = _tiny_f64(name)
        MEASURED[name] = (_exactness(name, lm, ids), lm.adapter)
    assert max(worst for worst, _ in MEASURED.values()) < TOL
    text = README.read_text()
    block = f"{BEGIN}\n{_table()}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    assert pattern.search(text), f"README.md lacks the families markers {BEGIN!r} ... {END!r}"
    if os.environ.get("UNISWEEP_UPDATE_DOCS") == "1":
        README.write_text(pattern.sub(lambda _m: block, text))
    else:
        assert pattern.search(text).group(0) == block, (
            "README.md's families table is stale: rerun with UNISWEEP_UPDATE_DOCS=1")
