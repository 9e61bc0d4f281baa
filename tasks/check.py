"""The start-up check: the discovered layout must reproduce HF's own forward, level by level.

Compares every captured level x_0..x_L, each block's sections (x_{l+1} = x_l + attn + mlp,
for sequential and parallel blocks alike) and the logits against a plain HF forward, and
the prefix-reuse path against the full pass. A model that fails is refused, naming the
level that differs and by how much.
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


def _hf_forward(lm, ids: torch.Tensor):
    """HF's full forward with hooks on the discovered modules: HF's hidden_states and logits,
    the final norm's input (x_L) and each block's attention and MLP contributions."""
    model, ad = lm.model, lm.adapter
    seen: dict = {"attn": {}, "mlp": {}}
    handles = []
    for b, blk in enumerate(ad.block_list(model)):
        # Clones: some blocks add into a section's output in place (Falcon's mlp += attn).
        handles.append(ad.attn_module(blk).register_forward_hook(
            lambda _m, _a, out, b=b: seen["attn"].__setitem__(b, ad.section_output(out).clone())))
        handles.append(ad.mlp_module(blk).register_forward_hook(
            lambda _m, _a, out, b=b: seen["mlp"].__setitem__(b, ad.section_output(out).clone())))
    handles.append(ad.final_norm_module(model).register_forward_pre_hook(
        lambda _m, args: seen.__setitem__("x_L", args[0].clone())))
    try:
        ref = model(input_ids=ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return ref, seen


@torch.no_grad()
def startup_check(lm, n: int = 12) -> dict[str, float]:
    """Compare the engine's view of the model with HF's own forward; raise if they differ.

    Returns the relative difference per compared level (resid_pre[l], resid_final,
    sections[l], logits, prefix_reuse).
    """
    model, ad = lm.model, lm.adapter
    L = lm.n_layers
    n = min(n, lm.max_positions)
    gen = torch.Generator().manual_seed(0)
    pool = torch.tensor(lm.token_space.ordinary_ids())
    ids = pool[torch.randint(len(pool), (1, n), generator=gen)].to(lm.device)
    tol = TOLERANCE[lm.dtype]
    where = f"start-up check failed for {lm.model_id} ({ad.describe()})"
    how = (" Discovery got this model's layout wrong: add an entry for it to EXCEPTIONS in "
           "tasks/adapters.py.")
    ref, seen = _hf_forward(lm, ids)
    clean = clean_pass(lm, ids, range(L))
    worst: dict[str, float] = {}
    for lvl in range(L):
        # hidden_states[l] is the input of block l for l < L.
        err = worst[f"resid_pre[{lvl}]"] = _rel(clean.resid[lvl], ref.hidden_states[lvl])
        if err > tol:
            raise StartupCheckFailed(
                f"{where}: the hooked residual x_{lvl} at the input of block {lvl} differs from "
                f"HF's hidden_states[{lvl}] by {err:.3g} (relative; allowed {tol:g} for "
                f"{lm.dtype_name}).{how}")
    # x_L: the final norm's input. HF's last hidden_states entry is x_L or (in most
    # families) the final norm of it; the logits read it through the final norm and head.
    x_L, final = seen["x_L"], ref.hidden_states[L]
    err = worst["resid_final"] = min(_rel(x_L, final), _rel(ad.final_norm_module(model)(x_L), final))
    if err > tol:
        raise StartupCheckFailed(
            f"{where}: x_{L}, the input of the final norm {ad.final_norm!r}, differs from HF's "
            f"hidden_states[{L}] (raw or normed) by {err:.3g} (allowed {tol:g}).{how}")
    err = worst["logits"] = _rel(ad.logits(model, ad.final_norm_module(model)(x_L)), ref.logits)
    if err > tol:
        raise StartupCheckFailed(
            f"{where}: logits from x_{L} through the final norm and head differ from HF's by "
            f"{err:.3g} (allowed {tol:g}): an unknown logit scale or soft-cap?{how}")
    # Sections: what each block adds is exactly its attention and MLP contributions.
    levels = [*ref.hidden_states[:L], x_L]
    for b in range(L):
        added = seen["attn"][b] + seen["mlp"][b]
        err = worst[f"sections[{b}]"] = _rel(levels[b] + added, levels[b + 1])
        if err > tol:
            raise StartupCheckFailed(
                f"{where}: block {b}: x_{b + 1} - x_{b} is not the sum of the attention "
                f"({ad.attn_out!r}) and MLP ({ad.mlp_out!r}) outputs"
                f"{f' times {ad.residual_scale:g}' if ad.residual_scale != 1 else ''}: relative "
                f"difference {err:.3g} of x_{b + 1} (allowed {tol:g}).{how}")
    # Prefix reuse from the middle: the same cell through the cached-prefix suffix pass and
    # through the full pass must give the same response at every later level.
    lp, j = L // 2, n // 2
    eps = torch.tensor([1e-3], dtype=torch.float64)
    direction = torch.nn.functional.normalize(torch.ones(1, lm.d_model, dtype=torch.float64), dim=1)
    res = perturb_group(lm, clean, lp, j, eps, direction, kl=False)
    full = perturb_group(lm, clean, lp, j, eps, direction, reuse_prefix=False, kl=False)
    err = worst["prefix_reuse"] = _rel(res.r, full.r[..., lp:, res.i0:])
    # The two paths round differently; in half precision that rounding dominates a 1e-3
    # response, so only float32/float64 are held to a bound here.
    if err > max(tol * 10, 1e-6) and lm.dtype in (torch.float64, torch.float32):
        raise StartupCheckFailed(
            f"{where}: the prefix-reuse path (block {lp}, position {j}) differs from the full "
            f"pass by {err:.3g} relative.")
    return worst
