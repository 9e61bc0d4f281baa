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
        # section_output: the module's output times the block's residual multiplier (Granite).
        handles.append(ad.attn_module(blk).register_forward_hook(
            lambda _m, _a, o, b=b: attn.__setitem__(b, ad.section_output(o)[0].clone())))
        handles.append(ad.mlp_module(blk).register_forward_hook(
            lambda _m, _a, o, b=b: mlp.__setitem__(b, ad.section_output(o)[0].clone())))
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


def naive_linear_cell(lm, ids: torch.Tensor, lp: int, j: int, direction: torch.Tensor,
                      rdtype=torch.float64):
    """The eps -> 0 limits R/eps [L+1, n], R_attn/eps, R_mlp/eps [L, n] and KL/eps^2 [n] of one
    cell: one full HF forward with forward-mode AD, the tangent ||x_lp(j)|| u seeded at block
    lp's input (SDPA on its math backend, which forward AD can differentiate)."""
    import torch.autograd.forward_ad as fwAD
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, ad = lm.model, lm.adapter
    blocks = ad.block_list(model)
    resid, attn, mlp, handles = {}, {}, {}, []

    def tangent(t):  # cloned: some blocks add into a section output in place (Falcon)
        d = fwAD.unpack_dual(t).tangent
        return None if d is None else d.clone()

    for b, blk in enumerate(blocks):
        def pre(_m, args, kwargs, b=b):
            h = args[0] if args else kwargs["hidden_states"]
            if b == lp:
                t = torch.zeros_like(h)
                t[0, j] = (h[0, j].to(rdtype).norm() * direction.to(rdtype)).to(h.dtype)
                h = fwAD.make_dual(h, t)
                if args:
                    args = (h, *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": h}
            resid[b] = (h[0].clone(), tangent(h))
            return args, kwargs
        handles.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(ad.attn_module(blk).register_forward_hook(
            lambda _m, _a, o, b=b: attn.__setitem__(b, tangent(ad.section_output(o)))))
        handles.append(ad.mlp_module(blk).register_forward_hook(
            lambda _m, _a, o, b=b: mlp.__setitem__(b, tangent(ad.section_output(o)))))
    L = len(blocks)
    handles.append(ad.final_norm_module(model).register_forward_pre_hook(
        lambda _m, a: resid.__setitem__(L, (fwAD.unpack_dual(a[0]).primal[0].clone(), tangent(a[0])))))
    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), fwAD.dual_level():
            out = model(input_ids=ids[None])
            z, dz = fwAD.unpack_dual(out.logits)
            z, dz = z[0].to(rdtype), dz[0].to(rdtype)
            resid = {k: (fwAD.unpack_dual(p).primal, t) for k, (p, t) in resid.items()}
    finally:
        for h in handles:
            h.remove()

    def norm(t, n_pos):  # a tangent that never formed (before lp) is an exact zero
        return t[0].to(rdtype).norm(dim=-1) if t is not None else torch.zeros(n_pos, dtype=rdtype)

    n = ids.shape[0]
    den = torch.stack([resid[lvl][0].to(rdtype).norm(dim=-1) for lvl in range(L + 1)])
    r = torch.stack([norm(resid[lvl][1], n) for lvl in range(L + 1)]) / den
    r_attn = torch.stack([norm(attn.get(b), n) for b in range(L)]) / den[:-1]
    r_mlp = torch.stack([norm(mlp.get(b), n) for b in range(L)]) / den[:-1]
    p = torch.softmax(z, -1)
    mean = (p * dz).sum(-1)
    kl = 0.5 * ((p * dz * dz).sum(-1) - mean * mean)  # KL/eps^2 -> Var_p(dz)/2
    return r, r_attn, r_mlp, kl


# ---------------------------------------------------------------------------------------------
# Per-head responses, by HF's own output projection applied to one head's slice at a time.

_PROJ_PATHS = ("attn.c_proj", "self_attn.o_proj")  # GPT-2's Conv1D; Llama's and Gemma's Linear


def _projection(blk):
    return next(m for name, m in blk.named_modules() if name in _PROJ_PATHS)


@torch.no_grad()
def head_contributions(proj, z: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[n, H, d]: what head h adds, proj(z with every other head zeroed) - proj(0)."""
    width = z.shape[-1]
    hd = width // n_heads
    zero = proj(torch.zeros_like(z[:1]))
    out = []
    for h in range(n_heads):
        mask = torch.zeros(width, dtype=z.dtype)
        mask[h * hd:(h + 1) * hd] = 1
        out.append(proj(z * mask) - zero)
    return torch.stack(out, dim=1)


@torch.no_grad()
def _run_heads(lm, ids, lp=None, j=None, delta=None, linear=False):
    """One full forward; per block the o_proj input z [n, H*hd], o_proj output, attention
    module output, and block inputs [L+1, n, d]. With linear, delta is injected as the
    forward-mode tangent and the tangents of z are returned instead of z."""
    import torch.autograd.forward_ad as fwAD
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, ad = lm.model, lm.adapter
    blocks = ad.block_list(model)
    resid, z, proj_out, attn_out, handles = {}, {}, {}, {}, []
    def unpack(t):
        if not linear:
            return t
        tangent = fwAD.unpack_dual(t).tangent  # None before the perturbed block
        return torch.zeros_like(t) if tangent is None else tangent
    for b, blk in enumerate(blocks):
        def pre(_m, args, kwargs, b=b):
            h = args[0] if args else kwargs["hidden_states"]
            if delta is not None and b == lp:
                if linear:
                    tangent = torch.zeros_like(h)
                    tangent[0, j] = delta.to(h.dtype)
                    h = fwAD.make_dual(h, tangent)
                else:
                    h = h.clone()
                    h[0, j] = h[0, j] + delta.to(h.dtype)
                args, kwargs = ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
            resid[b] = fwAD.unpack_dual(h).primal[0].clone()
            return args, kwargs
        handles.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
        proj = _projection(blk)
        handles.append(proj.register_forward_pre_hook(
            lambda _m, a, b=b: z.__setitem__(b, unpack(a[0])[0].clone())))
        handles.append(proj.register_forward_hook(
            lambda _m, _a, o, b=b: proj_out.__setitem__(b, unpack(o)[0].clone())))
        attn = blk.attn if hasattr(blk, "attn") else blk.self_attn
        handles.append(attn.register_forward_hook(
            lambda _m, _a, o, b=b: attn_out.__setitem__(b, unpack(o[0])[0].clone())))
    try:
        if linear:
            with fwAD.dual_level(), sdpa_kernel([SDPBackend.MATH]):
                model(input_ids=ids[None])
        else:
            model(input_ids=ids[None])
    finally:
        for h in handles:
            h.remove()
    return resid, z, proj_out, attn_out


@torch.no_grad()
def naive_heads(lm, ids: torch.Tensor, lp: int, j: int, eps: float | None, direction: torch.Tensor,
                rdtype=torch.float64):
    """r_head [L, H, n] of one cell: ||W_O,h (z~_h - z_h)|| / ||x_l||; eps None: the linear
    limit (forward-mode tangent of z_h per unit eps)."""
    blocks = lm.adapter.block_list(lm.model)
    H = next(getattr(lm.model.config, k) for k in ("num_attention_heads", "n_head")
             if hasattr(lm.model.config, k))
    x0, z0, _, _ = _run_heads(lm, ids)
    size = 1.0 if eps is None else eps
    delta = size * x0[lp][j].to(rdtype).norm() * direction.to(rdtype)
    _, z1, _, _ = _run_heads(lm, ids, lp, j, delta, linear=eps is None)
    out = []
    for b, blk in enumerate(blocks):
        proj = _projection(blk)
        dz = z1[b] if eps is None else z1[b] - z0[b]
        # The projection's bias cancels in proj(dz * mask) - proj(0): only W_O,h dz_h is left.
        c = head_contributions(proj, dz, H).to(rdtype)  # [n, H, d]
        out.append((c.norm(dim=-1) / x0[b].to(rdtype).norm(dim=-1)[:, None]).T)
    return torch.stack(out)
