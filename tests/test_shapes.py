"""Shape-only models: published configs and parameter counts (on `meta`), and the CPU-sized
variants through load_model's start-up check and the engine, marked as not real weights.
"""

from __future__ import annotations

import pyarrow.compute as pc
import pytest
import torch

from tasks.directions import random_directions
from tasks.engine import compute_responses
from tasks.errors import InvalidInput
from tasks.models import load_model
from tasks.prompts import make_prompts
from tasks.shapes import SHAPES, count_parameters, load_shape, shape_config, shape_identity

PUBLISHED = {"gemma-2-2b": 2.61e9, "llama-3.2-3b": 3.21e9, "gpt2-xl": 1.56e9, "gpt2-small": 124e6}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published(name):
    n = count_parameters(name)
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.01, n


def test_gemma2_config_is_the_published_one():
    c = shape_config("gemma-2-2b")
    got = (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
           c.num_key_value_heads, c.head_dim, c.vocab_size, c.sliding_window)
    assert got == (26, 2304, 9216, 8, 4, 256, 256000, 4096)
    assert (c.final_logit_softcapping, c.attn_logit_softcapping) == (30.0, 50.0)
    assert c.query_pre_attn_scalar == 256 and c.hidden_activation == "gelu_pytorch_tanh"
    assert c.tie_word_embeddings and c._attn_implementation == "eager"


def test_llama32_config_is_the_published_one():
    c = shape_config("llama-3.2-3b")
    got = (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
           c.num_key_value_heads, c.head_dim, c.vocab_size, c.max_position_embeddings)
    assert got == (28, 3072, 8192, 24, 8, 128, 128256, 131072)
    rope = c.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0
    assert (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
            rope["original_max_position_embeddings"]) == (32.0, 1.0, 4.0, 8192)
    assert c.tie_word_embeddings


def test_gpt2_xl_config_is_the_published_one():
    c = shape_config("gpt2-xl")
    assert (c.n_layer, c.n_embd, c.n_head, c.n_positions, c.vocab_size) == (48, 1600, 25, 1024,
                                                                            50257)
    assert c.tie_word_embeddings


def test_scaled_variants_keep_depth_and_heads_and_divide_widths():
    for big in ("gemma-2-2b", "llama-3.2-3b", "gpt2-xl"):
        a, b = shape_config(big), shape_config(big + "/4")
        assert a.num_hidden_layers == b.num_hidden_layers
        assert a.num_attention_heads == b.num_attention_heads
        assert a.hidden_size == 4 * b.hidden_size and a.vocab_size // 4 == b.vocab_size


def test_unknown_shape_names_the_allowed_ones():
    with pytest.raises(InvalidInput, match="gemma-2-2b") as err:
        load_model("shape:gemma-7b")
    assert err.value.field == "model"


def test_init_is_seeded_and_tied():
    m1, _, _ = load_shape("gpt2-xl/4", torch.float32, torch.device("cpu"))
    m2, _, _ = load_shape("gpt2-xl/4", torch.bfloat16, torch.device("cpu"))
    w1 = m1.transformer.h[7].mlp.c_fc.weight
    w2 = m2.transformer.h[7].mlp.c_fc.weight
    # Same draws in every dtype: bfloat16 is float32 rounded.
    assert torch.equal(w1.to(torch.bfloat16), w2)
    assert 0.019 < float(w1.detach().std()) < 0.021
    assert m1.lm_head.weight.data_ptr() == m1.transformer.wte.weight.data_ptr()


@pytest.fixture(scope="module", params=["gpt2-small", "gemma-2-2b/4", "llama-3.2-3b/4"])
def shape_lm(request):
    return load_model(f"shape:{request.param}", dtype="float32", check=True)


def test_shape_loads_checked_and_marked(shape_lm):
    assert shape_lm.identity["not_real_weights"] == "true"
    assert shape_lm.identity["name"] == shape_lm.model_id and shape_lm.model_id.startswith("shape:")
    assert shape_lm.extra["not_real_weights"] is True


def test_shape_runs_the_engine(shape_lm):
    lm = shape_lm
    prompts = make_prompts(lm.token_space, T=4, count=1, seed=0, kinds=("repeat",))
    L = lm.n_layers
    tab = compute_responses(lm, prompts, [0, L // 2], [2], [1e-2, 1e-1],
                            random_directions(lm.d_model, 1), kl=True)
    # At the perturbed level and position, R is eps by construction.
    at = tab.filter(pc.and_(pc.equal(tab["l"], tab["lp"]), pc.equal(tab["i"], 2)))
    assert at.num_rows == 4
    assert torch.allclose(torch.tensor(at["r"].to_pylist()), torch.tensor(at["eps"].to_pylist()),
                          rtol=1e-3)
    # The response survives to the last level and grows with eps; the KL is finite and > 0.
    last = tab.filter(pc.and_(pc.equal(tab["l"], L), pc.equal(tab["i"], 2)))
    r = dict(zip(zip(last["lp"].to_pylist(), last["eps"].to_pylist()), last["r"].to_pylist()))
    assert r[(0, 1e-1)] > r[(0, 1e-2)] > 0
    kl = torch.tensor([x for x in last["kl"].to_pylist() if x is not None])
    assert len(kl) == 4 and bool(torch.isfinite(kl).all()) and bool((kl > 0).all())


def test_all_shapes_are_listed():
    assert set(PUBLISHED) | {"gemma-2-2b/4", "llama-3.2-3b/4", "gpt2-xl/4"} == set(SHAPES)


def test_stored_config_facts_match_transformers():
    """Planning reads tasks/config_facts.py; every entry is what the transformers config gives,
    and the identity load_model records for the model carries the same config hash."""
    import subprocess
    import sys

    from tasks.config_facts import CONFIG_FACTS, computed_facts
    from tasks.model_catalog import model_info

    # Every shape and the paper's four tiny families (the other tiny families read their
    # configs: planning them imports torch).
    expected = {f"tiny:{f}" for f in ("gpt2", "llama", "gemma2", "gemma3")} | {f"shape:{s}" for s in SHAPES}
    assert set(CONFIG_FACTS) == expected
    for name in CONFIG_FACTS:
        assert CONFIG_FACTS[name] == computed_facts(name), f"{name}: python -m tasks.config_facts"
    assert shape_identity("gpt2-small") == model_info("shape:gpt2-small").identity
    lm = load_model("tiny:gemma3", dtype="float32", device="cpu")
    assert {k: v for k, v in lm.identity.items() if k != "dtype"} == model_info("tiny:gemma3").identity
    # Planning these models imports neither torch nor transformers.
    code = ("import sys; from tasks.model_catalog import model_info; "
            "[model_info(n) for n in " + repr(sorted(CONFIG_FACTS)) + "]; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
