"""Per-head section responses: how much each attention head's contribution to the stream changes.

Head h of block l writes W_O,h z_h(i) into the residual stream, where z_h is the head's slice
of the input of the attention output projection (o_proj / c_proj / dense) and W_O,h the
matching slice of that projection's weight; the projection's output is the sum over heads plus
its bias. The per-head response is r_head(l, h, i) = ||W_O,h (z~_h(i) - z_h(i))|| / ||x_l(i)||
(for linear passes the eps -> 0 limit, from the jvp tangent of z_h). This module finds the
projection inside HF's own block, hooks its input, and reduces it to those norms; it also
computes the clean attention pattern the classic head detectors read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tasks.errors import UnisweepError

# Offsets i - j kept by default: the diagonal, the near field (1..3) and the two induction
# stripes (T-1, T); everything else of a head's response map is left out of the shard.
NEAR_OFFSETS = (1, 2, 3)


def default_offsets(T: int) -> list[int]:
    """Offsets i - j kept when the spec does not widen them: 0, 1, 2, 3, T-1, T."""
    return sorted({0, *NEAR_OFFSETS, T - 1, T})


# Names HF gives the attention module inside a block, and its output projection inside it.
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_PROJ_NAMES = ("o_proj", "c_proj", "dense", "out_proj")


@dataclass(frozen=True)
class HeadProjection:
    """A block's attention output projection, viewed head by head.

    `per_head` is W_O split by head as [H, hd, d]: head h's contribution is z_h @ per_head[h]
    for z_h = z[..., h*hd:(h+1)*hd]. Both nn.Linear ([d, H*hd]) and GPT-2's Conv1D
    ([H*hd, d]) weights are brought to that layout.
    """

    module: nn.Module
    n_heads: int
    head_dim: int
    per_head: torch.Tensor


class NoHeadProjection(UnisweepError):
    pass


def _attention_parts(lm, block: nn.Module) -> tuple[nn.Module, nn.Module, int]:
    """(attention module, its output projection, number of heads) of `block`.

    From the adapter when it names the projection (`attn_proj`, relative to a block), else
    by HF's usual names.
    """
    path = getattr(lm.adapter, "attn_proj", None)
    if path:
        parent = path.rpartition(".")[0]
        attn = block.get_submodule(parent) if parent else block
        return attn, block.get_submodule(path), int(lm.adapter.n_heads)
    attn = next((getattr(block, n) for n in _ATTN_NAMES if hasattr(block, n)), None)
    if attn is None:
        raise NoHeadProjection(f"no attention module ({', '.join(_ATTN_NAMES)}) in block "
                               f"{type(block).__name__}")
    proj = next((getattr(attn, n) for n in _PROJ_NAMES if hasattr(attn, n)), None)
    if proj is None:
        raise NoHeadProjection(f"no output projection ({', '.join(_PROJ_NAMES)}) in "
                               f"{type(attn).__name__}")
    return attn, proj, n_heads_of(lm.model.config)


def n_heads_of(config) -> int:
    for name in ("num_attention_heads", "n_head", "num_heads"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise NoHeadProjection(f"config {type(config).__name__} names no attention head count")


def head_projection(lm, block: nn.Module, rdtype: torch.dtype) -> HeadProjection:
    """The output projection of `block`'s attention, split by head, weights in `rdtype`."""
    _, proj, H = _attention_parts(lm, block)
    w = proj.weight.detach().to(rdtype)
    # nn.Linear computes z @ W.T with W [d, H*hd]; Conv1D computes z @ W with W [H*hd, d].
    w_in_out = w.T if isinstance(proj, nn.Linear) else w
    width = w_in_out.shape[0]
    if width % H:
        raise NoHeadProjection(f"output projection input width {width} is not a multiple of "
                               f"the {H} heads")
    hd = width // H
    return HeadProjection(proj, H, hd, w_in_out.reshape(H, hd, -1).contiguous())


def head_norms(delta_z: torch.Tensor, proj: HeadProjection) -> torch.Tensor:
    """||W_O,h delta_z_h|| for every head: [..., H*hd] -> [..., H]."""
    z = delta_z.unflatten(-1, (proj.n_heads, proj.head_dim))  # [..., H, hd]
    return torch.einsum("...hk,hkd->...hd", z, proj.per_head).norm(dim=-1)


class HeadRecorder:
    """Reduces the o_proj input of every recorded block to per-head response norms.

    Plugs into the engine's recorder: `split` turns a captured activation into (clean, delta)
    [G, rows, s, .] and `den(l)` gives ||x_l(i)|| [G, 1, s] of the clean stream at the block's
    input (set by the block's pre-hook, which runs before the projection's). Only the
    positions `keep` (indices into the pass's positions) are reduced: the projection per head
    costs as much as o_proj itself, so the offsets a shard does not keep are never computed.
    """

    def __init__(self, lm, rdtype: torch.dtype, split: Callable, den: Callable[[int], torch.Tensor],
                 keep: torch.Tensor):
        self.lm, self.rdtype, self.split, self.den, self.keep = lm, rdtype, split, den, keep
        self.r_head: dict[int, torch.Tensor] = {}  # level -> [G, rows, H, k]
        self._proj: dict[int, HeadProjection] = {}

    def hook(self, block: nn.Module, lvl: int):
        """Register the forward pre-hook on `block`'s output projection; returns its handle."""
        proj = self._proj.setdefault(lvl, head_projection(self.lm, block, self.rdtype))

        def capture(_mod, args):
            z = args[0][:, self.keep]
            _, delta = self.split(z)
            den = self.den(lvl)[..., self.keep]  # [G, 1, k]
            self.r_head[lvl] = (head_norms(delta, proj) / den[..., None]).transpose(-1, -2)

        return proj.module.register_forward_pre_hook(capture)


def kept_positions(j: int, start: int, n: int, offsets: Sequence[int] | None) -> torch.Tensor:
    """Indices into a pass's positions start..n-1 of the responses i = j + o kept for heads."""
    if offsets is None:
        return torch.arange(j - start, n - start)
    pos = sorted({j + o for o in offsets if o >= 0 and j + o < n})
    return torch.tensor([p - start for p in pos], dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# The clean attention pattern, for the classic head detectors.


@contextmanager
def _eager_attention(model):
    """SDPA and flash kernels return no attention weights; HF's eager path does."""
    cfg = model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        yield
    finally:
        cfg._attn_implementation = old


@torch.no_grad()
def attention_patterns(lm, input_ids: torch.Tensor) -> torch.Tensor:
    """Clean attention weights of every head: [L, G, H, n, n] (query i, key j), float32.

    Captured from each block's attention module output (HF returns (output, weights)) in a
    plain forward on HF's eager attention path.
    """
    model, ad = lm.model, lm.adapter
    blocks = ad.block_list(model)
    weights: dict[int, torch.Tensor] = {}
    handles = []
    for b, blk in enumerate(blocks):
        def grab(_m, _a, out, b=b):
            if not isinstance(out, tuple) or len(out) < 2 or out[1] is None:
                raise NoHeadProjection(f"block {b}'s attention returned no weights")
            weights[b] = out[1].detach().float()
        handles.append(_attention_parts(lm, blk)[0].register_forward_hook(grab))
    try:
        with _eager_attention(model):
            ad.base(model)(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([weights[b] for b in range(len(blocks))])
