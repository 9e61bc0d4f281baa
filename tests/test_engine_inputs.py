"""Bad input fails before any compute with a message naming the argument; prompts are seeded."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.adapters import UnsupportedArchitecture, adapter_for
from tasks.directions import random_directions
from tasks.engine import compute_responses
from tasks.errors import InvalidInput
from tasks.models import load_model
from tasks.prompts import make_prompts


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny:llama", dtype="float32")


@pytest.fixture(scope="module")
def prompts(lm):
    return make_prompts(lm.token_space, T=6, count=1, seed=0)


def _call(lm, prompts, **over):
    args = dict(lps=[0], positions=[1], eps=[1e-2], directions=random_directions(lm.d_model, 1))
    args.update(over)
    return compute_responses(lm, prompts, **args)


@pytest.mark.parametrize("field,over,needle", [
    ("layer", {"lps": [4]}, "[0, 3]"),
    ("layer", {"lps": [-1]}, "[0, 3]"),
    ("position", {"positions": [13]}, "[0, 12]"),
    ("eps", {"eps": [0.0]}, "> 0"),
    ("eps", {"eps": [-1e-3]}, "> 0"),
    ("eps", {"eps": [math.inf]}, "finite"),
    ("eps", {"eps": [math.nan]}, "finite"),
    ("eps", {"eps": []}, "non-empty"),
    ("directions", {"directions": torch.ones(1, 5)}, "[D, 32]"),
    ("record_layers", {"record_layers": [9]}, "levels 0..4"),
])
def test_bad_grid_names_the_argument(lm, prompts, field, over, needle):
    with pytest.raises(InvalidInput) as exc:
        _call(lm, prompts, **over)
    assert exc.value.field == field
    assert needle in str(exc.value)


def test_bad_model_dtype_device():
    with pytest.raises(InvalidInput, match="invalid dtype.*float32, bfloat16, float16"):
        load_model("tiny:llama", dtype="int8")
    with pytest.raises(InvalidInput, match="invalid model"):
        load_model("tiny:mamba")
    with pytest.raises(InvalidInput, match="invalid model.*alias"):
        load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(InvalidInput, match="invalid model.*existing .gguf"):
        load_model("/nonexistent/file.gguf")
    with pytest.raises(InvalidInput, match="invalid device"):
        load_model("tiny:llama", device="tpu")


def test_T_too_large_for_context(lm):
    with pytest.raises(InvalidInput, match="invalid T.*at most 63"):
        make_prompts(lm.token_space, T=64, max_positions=lm.max_positions)


def test_undiscoverable_architecture_names_what_is_missing():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
                                       intermediate_size=8, vocab_size=20))
    with pytest.raises(UnsupportedArchitecture,
                       match=r"'bert'.*MLP module of block BertLayer not found.*EXCEPTIONS"):
        adapter_for(model)


def test_prompts_are_seeded_and_structured(lm):
    a = make_prompts(lm.token_space, T=6, count=2, seed=5)
    b = make_prompts(lm.token_space, T=6, count=2, seed=5)
    c = make_prompts(lm.token_space, T=6, count=2, seed=6)
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert not torch.equal(a[0].input_ids, c[0].input_ids)
    rep, ctl = a[0], a[1]
    assert (rep.kind, ctl.kind) == ("repeat", "control") and rep.n == ctl.n == 13
    assert int(rep.input_ids[0]) == lm.token_space.bos_token_id
    assert torch.equal(rep.input_ids[1:7], rep.input_ids[7:])  # s + s
    assert torch.equal(rep.input_ids[1:7], ctl.input_ids[1:7])  # same copy 1
    assert not torch.equal(ctl.input_ids[1:7], ctl.input_ids[7:])
    special = lm.token_space.special_ids
    assert not any(int(t) in special for t in rep.input_ids[1:])
    # Fixed ids for this seed: the same on every machine (numpy PCG64 is portable).
    assert rep.input_ids[1:7].tolist() == make_prompts(lm.token_space, T=6, seed=5)[0].input_ids[1:7].tolist()
