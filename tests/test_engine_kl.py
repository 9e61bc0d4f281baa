"""The KL of a logit change against a 50-digit reference, at eps 1e-5..1, in float64 and float32.

The eager formula always; the fused (compiled) kernel when a test asks for it (slow: compiling
takes a minute on a loaded 2-core machine).
"""

from __future__ import annotations

import pytest
import torch

from tasks import kl as klmod
from tasks.kl import kl_accuracy_errors, kl_from_logit_change, kl_tolerance


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_matches_exact_reference_from_tiny_to_large_eps(dtype):
    errors = kl_accuracy_errors(kl_from_logit_change, dtype)
    for eps, err in errors.items():
        assert err < kl_tolerance(dtype, eps), (dtype, eps, err)
    # The bounds are tight enough to mean something: float32 at 1e-5 is above float64's.
    assert errors[1e-5] > 1e-9 if dtype == torch.float32 else errors[1e-5] < 1e-10


def test_kl_is_finite_and_exact_for_large_changes_and_underflowing_probabilities():
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(4, 200, generator=gen, dtype=torch.float64) * 40  # many p underflow to 0
    for scale in (1e-6, 0.3, 5.0, 200.0):
        dz = torch.randn(4, 200, generator=gen, dtype=torch.float64) * scale
        p = torch.softmax(z0, -1)
        got = kl_from_logit_change(p, dz)
        logq, logp = torch.log_softmax(z0 + dz, -1), torch.log_softmax(z0, -1)
        q = logq.exp()
        want = torch.where(q > 0, q * (logq - logp), torch.zeros_like(q)).sum(-1)
        assert torch.isfinite(got).all()
        if scale >= 0.3:  # the textbook form is exact enough there to be the reference
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (scale, got, want)
        else:  # and tiny changes are O(dz^2) >= 0, where the textbook form cancels
            assert torch.all(got >= 0) and float(got.max()) < 1e-9


def test_kl_batched_rows_equal_row_by_row():
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(5, 300, generator=gen, dtype=torch.float64), -1)
    dz = torch.randn(3, 2, 5, 300, generator=gen, dtype=torch.float64) * 1e-3
    dz[1, 0, 2] *= 1e4  # one large change among small ones takes the plain form alone
    whole = kl_from_logit_change(p, dz)
    for a in range(3):
        for b in range(2):
            assert torch.allclose(whole[a, b], kl_from_logit_change(p, dz[a, b]), rtol=1e-12)


@pytest.mark.slow
def test_fused_kl_passes_its_gate_and_matches_eager():
    try:
        on = klmod.use_fused_kl(True, cache=False)  # gate here, whatever a cache says
        if not on:
            pytest.skip("torch.compile unavailable or inaccurate here (the gate said why)")
        gen = torch.Generator().manual_seed(2)
        p = torch.softmax(torch.randn(4, 500, generator=gen), -1)
        dz = torch.randn(3, 4, 500, generator=gen) * 1e-2
        fused = kl_from_logit_change(p, dz)
        assert torch.allclose(fused, klmod._kl_small(p, dz)[0], rtol=1e-4)
    finally:
        klmod.use_fused_kl(False)
