"""The naive reference: one hooked full HF forward per cell, nothing reused or batched.

Written independently of tasks/engine.py (its own hooks, HF's own logits) so that equality
of the two is evidence, not tautology.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def _run(lm, ids, lp=None, j=None, delta=None):
    """Full forward; returns block inputs [L+1, n, d] (last = pre-final-norm), attn, mlp, logits."""
    model, ad = lm.model, lm.adapter
    blocks = ad.block_list(model)
    resid, attn, mlp, handles = {}, {}, {}, []
    for b, blk in enumerate(blocks):
        def pre(_m, args, kwargs, b=b):
            h = args[0] if args else kwargs["hidden_states"]
            if delta is not None and b == lp:
                h = h.clone()
                h[0, j] = h[0, j] + delta.to(h.dtype)
                if args:
                    args = (h, *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": h}
            resid[b] = h[0].clone()
            return args, kwargs
        handles.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(ad.attn_module(blk).register_forward_hook(
            lambda _m, _a, o, b=b: attn.__setitem__(b, (o[0] if isinstance(o, tuple) else o)[0].clone())))
        handles.append(ad.mlp_module(blk).register_forward_hook(
            lambda _m, _a, o, b=b: mlp.__setitem__(b, (o[0] if isinstance(o, tuple) else o)[0].clone())))
    L = len(blocks)
    handles.append(ad.final_norm_module(model).register_forward_pre_hook(
        lambda _m, a: resid.__setitem__(L, a[0][0].clone())))
    try:
        out = model(input_ids=ids[None])
    finally:
        for h in handles:
            h.remove()
    return (torch.stack([resid[lvl] for lvl in range(L + 1)]),
            torch.stack([attn[b] for b in range(L)]),
            torch.stack([mlp[b] for b in range(L)]), out.logits[0])


def naive_cell(lm, ids: torch.Tensor, lp: int, j: int, eps: float, direction: torch.Tensor,
               rdtype=torch.float64):
    """R [L+1, n], R_attn [L, n], R_mlp [L, n], KL [n] for one cell, all levels and positions."""
    x0, a0, m0, z0 = _run(lm, ids)
    delta = eps * x0[lp, j].to(rdtype).norm() * direction.to(rdtype)
    x1, a1, m1, z1 = _run(lm, ids, lp, j, delta)
    den = x0.to(rdtype).norm(dim=-1)
    r = (x1.to(rdtype) - x0.to(rdtype)).norm(dim=-1) / den
    r_attn = (a1.to(rdtype) - a0.to(rdtype)).norm(dim=-1) / den[:-1]
    r_mlp = (m1.to(rdtype) - m0.to(rdtype)).norm(dim=-1) / den[:-1]
    logp = torch.log_softmax(z0.to(rdtype), -1)
    logq = torch.log_softmax(z1.to(rdtype), -1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    return r, r_attn, r_mlp, kl
