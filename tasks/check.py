"""The start-up check: hooked residuals and logits must equal the plain HF forward.

Also checks the prefix-reuse path (cached prefix, blocks from lp on) against the full pass.
A model that fails is refused, with the layer that differs and by how much.
"""

from __future__ import annotations

import torch

from tasks.engine import clean_pass, perturb_group
from tasks.errors import UnisweepError

# Relative tolerance per dtype for "the same numbers": identical ops give ~0; the suffix
# path differs from the full pass by float rounding only.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 6e-2, torch.float16: 2e-2}


class StartupCheckFailed(UnisweepError):
    pass


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@torch.no_grad()
def startup_check(lm, n: int = 12) -> dict[str, float]:
    """Compare the engine's view of the model with HF's own forward; raise if they differ."""
    model, ad = lm.model, lm.adapter
    L = lm.n_layers
    n = min(n, lm.max_positions)
    gen = torch.Generator().manual_seed(0)
    pool = torch.tensor(lm.token_space.ordinary_ids())
    ids = pool[torch.randint(len(pool), (1, n), generator=gen)].to(lm.device)
    tol = TOLERANCE[lm.dtype]
    ref = model(input_ids=ids, output_hidden_states=True)
    clean = clean_pass(lm, ids, range(L))
    worst: dict[str, float] = {}
    for lvl in range(L):
        # hidden_states[l] is the input of block l for l < L (the last entry may be normed).
        err = _rel(clean.resid[lvl], ref.hidden_states[lvl])
        worst[f"resid_pre[{lvl}]"] = err
        if err > tol:
            raise StartupCheckFailed(
                f"start-up check failed for {lm.model_id}: the hooked residual at the input of "
                f"block {lvl} differs from HF's hidden_states[{lvl}] by {err:.3g} (relative; "
                f"allowed {tol:g} for {lm.dtype_name}). The family adapter "
                f"{lm.adapter.family!r} does not fit this model.")
    out = ad.base(model)(input_ids=ids)
    err = _rel(ad.logits(model, out.last_hidden_state), ref.logits)
    worst["logits"] = err
    if err > tol:
        raise StartupCheckFailed(
            f"start-up check failed for {lm.model_id}: logits from the final norm and head differ "
            f"from HF's by {err:.3g} (allowed {tol:g}).")
    # Prefix reuse from the middle: the same cell through the cached-prefix suffix pass and
    # through the full pass must give the same response at every later level.
    lp, j = L // 2, n // 2
    eps = torch.tensor([1e-3], dtype=torch.float64)
    direction = torch.nn.functional.normalize(torch.ones(1, lm.d_model, dtype=torch.float64), dim=1)
    res = perturb_group(lm, clean, lp, j, eps, direction, kl=False)
    full = perturb_group(lm, clean, lp, j, eps, direction, reuse_prefix=False, kl=False)
    err = _rel(res.r, full.r[..., lp:, res.i0:])
    worst["prefix_reuse"] = err
    # The two paths round differently; in half precision that rounding dominates a 1e-3
    # response, so only float32/float64 are held to a bound here.
    if err > max(tol * 10, 1e-6) and lm.dtype in (torch.float64, torch.float32):
        raise StartupCheckFailed(
            f"start-up check failed for {lm.model_id}: the prefix-reuse path (block {lp}, "
            f"position {j}) differs from the full pass by {err:.3g} relative.")
    return worst
