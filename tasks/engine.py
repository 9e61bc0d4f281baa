"""The batched perturbation engine: read top to bottom, it is the whole algorithm.

For each prompt group and perturbation (lp, j): one clean forward gives the prefix KV cache
and the clean residual at block lp; then each batch of cells runs only blocks lp..L-1 on
positions j..n-1, with a zero-perturbation baseline row on the same kernel path. Hooks
reduce every captured activation to norms at once, so memory holds one layer at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.autograd.forward_ad as fwAD
from transformers import DynamicCache

from tasks.batching import (
    KL_TEMPORARIES,
    KL_TEMPORARIES_FUSED,
    LOGIT_BUDGET,
    plan_passes,
    rows_per_pass,
)
from tasks.heads import HeadRecorder, attention_patterns, kept_positions
from tasks.kl import fused_kl_on, kl_from_logit_change
from tasks.layout import HEAD_ENGINE_SCHEMA
from tasks.model_handle import LoadedModel
from tasks.prompts import Prompt
from tasks.tabulate import concat_tables, heads_to_table, responses_to_table
from tasks.validation import check_grid, check_offsets


@dataclass
class Responses:
    """Responses of one (prompt group, lp, j) for C cells (or D directions when linear).

    Levels l run from l0 to L (x_L = last block output before the final norm); positions
    from i0 to n-1. r: [G, C, L+1-l0, n-i0]; r_attn, r_mlp: [G, C, L-l0, n-i0]; kl: [G, C, n-i0].
    For linear responses (eps -> 0) the arrays hold the limits R/eps and KL/eps^2.
    """

    lp: int
    j: int
    l0: int
    i0: int
    r: torch.Tensor
    r_attn: torch.Tensor
    r_mlp: torch.Tensor
    kl: torch.Tensor
    # Per-head responses (tasks.heads) when asked: [G, C, L-l0, H, k] at positions head_i [k].
    r_head: torch.Tensor | None = None
    head_i: torch.Tensor | None = None


def result_dtype(lm: LoadedModel) -> torch.dtype:
    """Float32 results whatever the model dtype; float64 models keep float64 for exactness tests."""
    return torch.float64 if lm.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Clean pass: prefix KV cache and residuals, once per prompt group.


@dataclass
class CleanState:
    input_ids: torch.Tensor  # [G, n]
    keys: list[torch.Tensor]  # per block [G, H, n, hd]
    values: list[torch.Tensor]
    resid: dict[int, torch.Tensor]  # block-input residual x_l for the requested l: [G, n, d]


@torch.no_grad()
def clean_pass(lm: LoadedModel, input_ids: torch.Tensor, levels: Sequence[int],
               prefix: int | None = None) -> CleanState:
    """The clean stream's KV cache and block inputs at `levels`.

    prefix: the most clean positions any suffix pass will take from the cache (its largest
    start). The cache is then complete for positions < prefix only; beyond it, the forward
    runs just the blocks below max(levels), which is all the residuals at `levels` need (for
    levels {0}: the embeddings alone). None: every block on every position.
    """
    model, ad = lm.model, lm.adapter
    n = input_ids.shape[1]
    top = max(levels)
    if prefix is None or prefix >= n:
        cache, parts = _clean_forward(lm, input_ids, levels, None, 0, len(ad.block_list(model)))
        resid = parts
    else:
        cache, resid = DynamicCache(), {}
        if prefix > 0:
            cache, resid = _clean_forward(lm, input_ids[:, :prefix], levels, cache, 0,
                                          len(ad.block_list(model)))
        cache, rest = _clean_forward(lm, input_ids[:, prefix:], levels, cache, prefix, top)
        resid = {lvl: torch.cat([resid[lvl], rest[lvl]], 1) if lvl in resid else rest[lvl]
                 for lvl in rest}
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return CleanState(input_ids, keys, values, resid)


def _clean_forward(lm: LoadedModel, ids: torch.Tensor, levels: Sequence[int], cache, start: int,
                   n_blocks: int):
    """Forward ids (positions start..) after `cache`, running blocks 0..n_blocks-1 only (the
    rest pass their input through, and leave their cache alone); (cache, block inputs)."""
    model, ad = lm.model, lm.adapter
    blocks = ad.block_list(model)
    resid: dict[int, torch.Tensor] = {}
    handles, skipped = [], []
    for lvl in set(levels):
        def grab(_mod, args, kwargs, lvl=lvl):
            resid[lvl] = _hidden_arg(args, kwargs).detach()
        handles.append(blocks[lvl].register_forward_pre_hook(grab, with_kwargs=True))
    for b in range(n_blocks, len(blocks)):
        blocks[b].forward = ad.passthrough
        skipped.append(blocks[b])
    cache = cache if cache is not None else DynamicCache()
    positions = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
    try:
        ad.base(model)(input_ids=ids, past_key_values=cache, position_ids=positions,
                       use_cache=True)
    finally:
        for h in handles:
            h.remove()
        for blk in skipped:
            del blk.forward
    return cache, resid


def _hidden_arg(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_hidden(args, kwargs, new: torch.Tensor):
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


# ---------------------------------------------------------------------------------------------
# One suffix pass: hooks that inject the perturbation and reduce activations to norms.


@dataclass
class _PassPlan:
    lp: int
    start: int  # first position computed (j with prefix reuse, 0 without)
    first_block: int  # first block run (lp with prefix reuse, 0 without)
    groups: int  # G prompts in the batch
    rows_per_group: int  # 1 baseline + J x C cells (finite); J x D directions (linear)
    linear: bool
    kl_bytes: int = LOGIT_BUDGET  # what the KL's temporaries may take at once


class _Recorder:
    """Turns captured activations into response norms as the forward pass goes."""

    def __init__(self, plan: _PassPlan, rdtype: torch.dtype):
        self.plan, self.rdtype = plan, rdtype
        self.resid: dict[int, torch.Tensor] = {}
        self.attn: dict[int, torch.Tensor] = {}
        self.mlp: dict[int, torch.Tensor] = {}
        self.den: dict[int, torch.Tensor] = {}  # ||x_l(i)|| of the clean stream, per level
        self.kl: torch.Tensor | None = None
        self.heads: HeadRecorder | None = None  # per-head norms, when the pass records them

    def _split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean, delta) of a captured activation, both [G, rows, s, d] in the result dtype."""
        p = self.plan
        if p.linear:
            primal, tangent = fwAD.unpack_dual(h)
            primal = primal.to(self.rdtype).unflatten(0, (p.groups, p.rows_per_group))
            tangent = tangent.to(self.rdtype).unflatten(0, (p.groups, p.rows_per_group))
            return primal[:, :1], tangent
        x = h.to(self.rdtype).unflatten(0, (p.groups, p.rows_per_group))
        base = x[:, :1]
        # Same kernel path for baseline and cells: a zero perturbation gives exactly zero.
        return base, x[:, 1:] - base

    def level(self, lvl: int, h: torch.Tensor) -> None:
        clean, delta = self._split(h)
        den = clean.norm(dim=-1)  # [G, 1, s]
        self.den[lvl] = den
        self.resid[lvl] = delta.norm(dim=-1) / den

    def section(self, store: dict, lvl: int, out: torch.Tensor) -> None:
        _, delta = self._split(out)
        store[lvl] = delta.norm(dim=-1) / self.den[lvl]


@contextmanager
def _hooks(lm: LoadedModel, plan: _PassPlan, rec: _Recorder, inject):
    """Install the pass's hooks: skip blocks below first_block, inject at lp, record the rest."""
    model, ad = lm.model, lm.adapter
    blocks = ad.block_list(model)
    handles, skipped = [], []
    for b in range(plan.first_block):
        # Blocks below lp change nothing we keep: their output is replaced at lp's input.
        blocks[b].forward = ad.passthrough
        skipped.append(blocks[b])
    for b in range(plan.first_block, len(blocks)):
        def pre(_m, args, kwargs, b=b):
            if b == plan.lp:
                args, kwargs = _replace_hidden(args, kwargs, inject(_hidden_arg(args, kwargs)))
            rec.level(b, _hidden_arg(args, kwargs))
            return args, kwargs
        handles.append(blocks[b].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(ad.attn_module(blocks[b]).register_forward_hook(
            lambda _m, _a, out, b=b: rec.section(rec.attn, b, ad.section_output(out))))
        handles.append(ad.mlp_module(blocks[b]).register_forward_hook(
            lambda _m, _a, out, b=b: rec.section(rec.mlp, b, ad.section_output(out))))
        if rec.heads is not None:
            handles.append(rec.heads.hook(blocks[b], b))
    n_layers = len(blocks)
    handles.append(ad.final_norm_module(model).register_forward_pre_hook(
        lambda _m, args: rec.level(n_layers, args[0])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for blk in skipped:
            del blk.forward


def _kl_rows(lm: LoadedModel, normed: torch.Tensor, plan: _PassPlan,
             rdtype: torch.dtype) -> torch.Tensor:
    """KL(p~ || p) per cell and position, [G, C, s]; for linear passes the limit KL/eps^2."""
    model, ad = lm.model, lm.adapter
    G, R = plan.groups, plan.rows_per_group
    out = []
    for g in range(G):
        rows = normed[g * R:(g + 1) * R]
        s, vocab = rows.shape[1], model.config.vocab_size
        temporaries = KL_TEMPORARIES_FUSED if fused_kl_on() and not plan.linear else KL_TEMPORARIES
        chunk = max(1, plan.kl_bytes // max(1, s * vocab * rdtype.itemsize * temporaries))
        if plan.linear:
            # KL(softmax(z + e dz) || softmax(z)) = e^2/2 Var_p(dz) + O(e^3).
            parts = []
            for c0 in range(0, R, chunk):
                primal, tangent = fwAD.unpack_dual(ad.logits(model, rows[c0:c0 + chunk]))
                logp = torch.log_softmax(primal.to(rdtype), dim=-1)
                p = logp.exp()
                dz = tangent.to(rdtype)
                mean = (p * dz).sum(-1)
                parts.append(0.5 * ((p * dz * dz).sum(-1) - mean * mean))
            out.append(torch.cat(parts))
        else:
            z0 = ad.logits(model, rows[:1]).to(rdtype)
            p = torch.softmax(z0, dim=-1)
            parts = []
            for c0 in range(1, R, chunk):
                # In place: the head's fresh output becomes dz (a vocabulary-wide tensor less
                # to allocate; .to() returns a copy only when the dtypes differ).
                dz = ad.logits(model, rows[c0:c0 + chunk]).to(rdtype).sub_(z0)
                parts.append(kl_from_logit_change(p, dz))
            out.append(torch.cat(parts))
    return torch.stack(out)


def _rows_of(t: torch.Tensor, prompt_rows: torch.Tensor) -> torch.Tensor:
    """t[prompt_rows]; for one prompt a broadcast view, so that the cached prefix of blocks a
    pass skips costs no memory (the blocks it runs concatenate their own copy)."""
    if t.shape[0] == 1:
        return t.expand(len(prompt_rows), *t.shape[1:])
    return t[prompt_rows]


def _suffix_pass(lm: LoadedModel, clean: CleanState, prompt_rows: torch.Tensor, plan: _PassPlan,
                 inject, rdtype: torch.dtype, kl: bool,
                 heads_keep: torch.Tensor | None = None) -> _Recorder:
    """Run blocks first_block..L-1 on positions start..n-1 for B = G x rows batch rows."""
    model, ad = lm.model, lm.adapter
    start = plan.start
    ids = clean.input_ids[prompt_rows, start:]
    past = None
    if start > 0:
        past = DynamicCache(ddp_cache_data=[
            (_rows_of(k[:, :, :start], prompt_rows), _rows_of(v[:, :, :start], prompt_rows))
            for k, v in zip(clean.keys, clean.values)])
    positions = torch.arange(start, clean.input_ids.shape[1], device=ids.device).unsqueeze(0)
    rec = _Recorder(plan, rdtype)
    if heads_keep is not None:
        rec.heads = HeadRecorder(lm, rdtype, rec._split, rec.den.__getitem__, heads_keep)
    with _hooks(lm, plan, rec, inject):
        out = ad.base(model)(input_ids=ids, past_key_values=past, position_ids=positions,
                             use_cache=past is not None)
    if kl:
        rec.kl = _kl_rows(lm, out.last_hidden_state, plan, rdtype)
    return rec


# ---------------------------------------------------------------------------------------------
# Public entry points.


# Matmul kernels round a row differently at the ragged end of a batch (measured on CPU:
# float32 rows differ when a sequence has < 3 positions, float64 rows unless it has a
# multiple of 4). Starting the suffix a few clean positions early makes every row of a
# pass round identically, so the baseline row cancels exactly.
_ROW_ALIGN = {torch.float64: 4}
_MIN_SUFFIX = 4


def suffix_start(j: int, n: int, dtype: torch.dtype) -> int:
    """First position a pass computes for perturbed position j (<= j; clean before j)."""
    start = min(j, max(0, n - _MIN_SUFFIX))
    align = _ROW_ALIGN.get(dtype, 1)
    while start > 0 and (n - start) % align:
        start -= 1
    return start


def _perturbation(clean_lp: torch.Tensor, j: int, eps: torch.Tensor, dirs: torch.Tensor,
                  rdtype: torch.dtype) -> torch.Tensor:
    """eps * ||x_lp(j)|| * u for every (prompt, eps, direction): [G, E*D, d], eps-major."""
    x = clean_lp[:, j].to(rdtype)  # [G, d]
    norm = x.norm(dim=-1)  # [G]
    cells = eps.to(rdtype)[:, None, None] * dirs.to(rdtype)[None, :, :]  # [E, D, d]
    return norm[:, None, None] * cells.reshape(-1, cells.shape[-1])[None]


def _sites_start(lm: LoadedModel, clean: CleanState, js: Sequence[int], reuse_prefix: bool) -> int:
    """First position of a pass that perturbs every j of `js`: the smallest j's start."""
    return suffix_start(min(js), clean.input_ids.shape[1], lm.dtype) if reuse_prefix else 0


@torch.no_grad()
def perturb_sites(lm: LoadedModel, clean: CleanState, lp: int, js: Sequence[int],
                  eps: torch.Tensor, dirs: torch.Tensor, reuse_prefix: bool = True,
                  kl: bool = True, kl_bytes: int = LOGIT_BUDGET, heads: bool = False,
                  head_offsets: Sequence[int] | None = None) -> list[Responses]:
    """Finite-eps responses of every (eps, direction) cell at every position of `js`, for all
    prompts of `clean`, in one pass; one Responses per j.

    Rows per prompt: one baseline (no perturbation), then the C cells of js[0], of js[1], ...
    The pass starts at the smallest j (its clean positions before each larger j are computed
    in every row alike), so one baseline serves every site on the same kernel path. With
    reuse_prefix=False the pass starts at block 0 and position 0 (the ablation the benchmark
    compares against, and the layout the causality test reads).
    """
    rdtype = result_dtype(lm)
    G, J = clean.input_ids.shape[0], len(js)
    deltas = [_perturbation(clean.resid[lp], j, eps, dirs, rdtype) for j in js]  # J x [G, C, d]
    C = deltas[0].shape[1]
    start = _sites_start(lm, clean, js, reuse_prefix)
    plan = _PassPlan(lp, start, lp if reuse_prefix else 0, G, 1 + J * C, False, kl_bytes)
    x_lp = clean.resid[lp][:, start:]  # [G, s, d]

    def inject(incoming: torch.Tensor) -> torch.Tensor:
        base = x_lp if reuse_prefix else incoming.unflatten(0, (G, plan.rows_per_group))[:, 0]
        h = base[:, None].expand(G, plan.rows_per_group, *base.shape[1:]).clone()
        cells = h[:, 1:].unflatten(1, (J, C))  # a view: [G, J, C, s, d]
        for k, j in enumerate(js):
            cells[:, k, :, j - start] = (cells[:, k, :, j - start].to(rdtype)
                                         + deltas[k]).to(h.dtype)
        return h.flatten(0, 1)

    rows = torch.arange(G, device=clean.input_ids.device).repeat_interleave(plan.rows_per_group)
    keep = _heads_keep(heads, head_offsets, js, start, clean)
    rec = _suffix_pass(lm, clean, rows, plan, inject, rdtype, kl, keep)
    return _collect(lm, rec, plan, js, C, kl, head_offsets)


def perturb_group(lm: LoadedModel, clean: CleanState, lp: int, j: int,
                  eps: torch.Tensor, dirs: torch.Tensor, reuse_prefix: bool = True,
                  kl: bool = True, heads: bool = False,
                  head_offsets: Sequence[int] | None = None) -> Responses:
    """Finite-eps responses of every (eps, direction) cell at position j: perturb_sites of one j.
    With heads, the per-head responses at offsets i - j in head_offsets (None: all) too."""
    return perturb_sites(lm, clean, lp, [j], eps, dirs, reuse_prefix, kl, heads=heads,
                         head_offsets=head_offsets)[0]


def linear_sites(lm: LoadedModel, clean: CleanState, lp: int, js: Sequence[int],
                 dirs: torch.Tensor, reuse_prefix: bool = True, kl: bool = True,
                 kl_bytes: int = LOGIT_BUDGET, heads: bool = False,
                 head_offsets: Sequence[int] | None = None) -> list[Responses]:
    """The exact eps -> 0 response J(||x_lp(j)|| u) by forward-mode autodiff, for every
    direction and every j of `js` in one pass (rows: the D directions of js[0], of js[1], ...)."""
    rdtype = result_dtype(lm)
    G, D, J = clean.input_ids.shape[0], dirs.shape[0], len(js)
    ones = torch.ones(1, dtype=rdtype)
    tangents = [_perturbation(clean.resid[lp], j, ones, dirs, rdtype) for j in js]
    start = _sites_start(lm, clean, js, reuse_prefix)
    plan = _PassPlan(lp, start, lp if reuse_prefix else 0, G, J * D, True, kl_bytes)
    x_lp = clean.resid[lp][:, start:]

    def inject(incoming: torch.Tensor) -> torch.Tensor:
        base = x_lp if reuse_prefix else incoming.unflatten(0, (G, J * D))[:, 0]
        primal = base[:, None].expand(G, J * D, *base.shape[1:]).contiguous()
        tangent = torch.zeros_like(primal)
        for k, j in enumerate(js):
            tangent[:, k * D:(k + 1) * D, j - start] = tangents[k].to(primal.dtype)
        return fwAD.make_dual(primal.flatten(0, 1), tangent.flatten(0, 1))

    rows = torch.arange(G, device=clean.input_ids.device).repeat_interleave(J * D)
    keep = _heads_keep(heads, head_offsets, js, start, clean)
    with torch.no_grad(), _forward_ad_attention(lm), fwAD.dual_level():
        rec = _suffix_pass(lm, clean, rows, plan, inject, rdtype, kl, keep)
    return _collect(lm, rec, plan, js, D, kl, head_offsets)


def linear_group(lm: LoadedModel, clean: CleanState, lp: int, j: int, dirs: torch.Tensor,
                 reuse_prefix: bool = True, kl: bool = True, heads: bool = False,
                 head_offsets: Sequence[int] | None = None) -> Responses:
    """The exact eps -> 0 response at position j: linear_sites of one j."""
    return linear_sites(lm, clean, lp, [j], dirs, reuse_prefix, kl, heads=heads,
                        head_offsets=head_offsets)[0]


def _heads_keep(heads: bool, offsets, js: Sequence[int], start: int, clean: CleanState):
    """Pass positions the head norms are computed at: the kept offsets of every site."""
    if not heads:
        return None
    n = clean.input_ids.shape[1]
    keep = sorted({int(k) for j in js for k in kept_positions(j, start, n, offsets)})
    return torch.tensor(keep, dtype=torch.long, device=clean.input_ids.device)


@contextmanager
def _forward_ad_attention(lm: LoadedModel):
    """Forward-mode AD has no rule for the fused SDPA kernels: use SDPA's math backend,
    which is built from differentiable primitives and keeps the model's dtype."""
    if lm.model.config._attn_implementation != "sdpa":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _collect(lm, rec: _Recorder, plan: _PassPlan, js: Sequence[int], C: int,
             kl: bool, head_offsets: Sequence[int] | None = None) -> list[Responses]:
    """Split a pass's norms into one Responses per perturbed position (C cells each)."""
    L = lm.n_layers
    levels = range(plan.first_block, L + 1)
    r = torch.stack([rec.resid[lvl] for lvl in levels], dim=2)  # [G, J*C, levels, s]
    r_attn = torch.stack([rec.attn[lvl] for lvl in levels[:-1]], dim=2)
    r_mlp = torch.stack([rec.mlp[lvl] for lvl in levels[:-1]], dim=2)
    kls = rec.kl if kl else torch.full((*r.shape[:2], r.shape[-1]), float("nan"), dtype=r.dtype)
    out = [Responses(plan.lp, j, plan.first_block, plan.start, r[:, k * C:(k + 1) * C],
                     r_attn[:, k * C:(k + 1) * C], r_mlp[:, k * C:(k + 1) * C],
                     kls[:, k * C:(k + 1) * C]) for k, j in enumerate(js)]
    if rec.heads is not None:
        r_head = torch.stack([rec.heads.r_head[lvl] for lvl in levels[:-1]], dim=2)
        pass_pos = (rec.heads.keep + plan.start).tolist()  # positions the norms were taken at
        n = plan.start + r.shape[-1]
        for k, res in enumerate(out):
            own = (kept_positions(res.j, plan.start, n, head_offsets) + plan.start).tolist()
            idx = torch.tensor([pass_pos.index(p) for p in own], dtype=torch.long,
                               device=r_head.device)
            res.r_head = r_head[:, k * C:(k + 1) * C][..., idx]
            res.head_i = torch.tensor(own, dtype=torch.long)
    return out


def compute_responses(lm: LoadedModel, prompts: Sequence[Prompt], lps: Sequence[int],
                      positions: Sequence[int], eps: Sequence[float], directions: torch.Tensor,
                      linear: bool = False, record_layers: Sequence[int] | None = None,
                      record_positions: Sequence[int] | None = None,
                      max_rows: int | None = None, kl: bool = True,
                      memory_budget: int | None = None, batch_positions: bool = True):
    """Every cell of the grid for these prompts, as a long pyarrow table (tasks.layout).

    Validates all arguments and the memory before any compute. Prompts of equal length share
    passes; so do positions, where the planner (tasks.batching) finds that it pays.
    Rows per pass: what memory_budget (bytes a pass may use beyond the weights; default: free
    device memory, or half the available RAM) allows, at most max_rows if given.
    batch_positions=False forces one position per pass (the per-position engine).
    """
    return compute_tables(lm, prompts, lps, positions, eps, directions, linear, record_layers,
                          record_positions, max_rows, kl, memory_budget, batch_positions)[0]


def compute_tables(lm: LoadedModel, prompts: Sequence[Prompt], lps: Sequence[int],
                   positions: Sequence[int], eps: Sequence[float], directions: torch.Tensor,
                   linear: bool = False, record_layers: Sequence[int] | None = None,
                   record_positions: Sequence[int] | None = None,
                   max_rows: int | None = None, kl: bool = True,
                   memory_budget: int | None = None, batch_positions: bool = True,
                   heads: bool = False, head_offsets: Sequence[int] | None = None):
    """(responses, head_responses) tables of the grid (compute_responses); head_responses is
    None unless `heads`. Per-head rows are kept at offsets i - j in head_offsets (None: every
    i >= j) and carry the clean attention weight of their head from i to j (tasks.heads)."""
    grid = check_grid(lm, prompts, lps, positions, eps, directions, record_layers,
                      record_positions, max_rows, memory_budget, linear=linear)
    if heads and head_offsets is not None:
        head_offsets = check_offsets(head_offsets, min(p.n for p in prompts))
    n_max = max(p.n for p in grid.prompts)
    budget = rows_per_pass(lm, n_max, memory_budget, linear, max_rows)
    grid.max_rows = budget.rows
    tables, head_tables, pending = [], [], None
    for group in grid.prompt_groups():
        ids = torch.stack([p.input_ids for p in group]).to(lm.device)
        n = ids.shape[1]

        def start_of(j: int, n=n) -> int:
            return suffix_start(j, n, lm.dtype)

        specs = {lp: list(plan_passes(grid, len(group), n, start_of, lm.device.type, linear,
                                      batch_positions)) for lp in grid.lps}
        # The cache is read only before each pass's start: the clean pass runs every block
        # up to the last start, and beyond it only what the residuals at the lps need.
        prefix = max(start_of(min(spec.js)) for lp_specs in specs.values() for spec in lp_specs)
        clean = clean_pass(lm, ids, grid.lps, prefix)
        patterns = attention_patterns(lm, ids) if heads else None

        for lp in grid.lps:
            for spec in specs[lp]:
                d_sel = grid.directions[spec.d_chunk]
                if spec.e_chunk is None:
                    results = linear_sites(lm, clean, lp, spec.js, d_sel, kl=kl,
                                           kl_bytes=budget.kl_bytes, heads=heads,
                                           head_offsets=head_offsets)
                else:
                    results = perturb_sites(lm, clean, lp, spec.js, grid.eps[spec.e_chunk],
                                            d_sel, kl=kl, kl_bytes=budget.kl_bytes,
                                            heads=heads, head_offsets=head_offsets)
                # The previous pass's rows are built while this one's copies travel.
                if pending is not None:
                    tables.extend(_tables_of(*pending, grid))
                pending = (*_to_host(results), group, spec)
                if heads:
                    head_tables += [heads_to_table(res, group, grid, spec.e_chunk,
                                                   spec.d_chunk, patterns) for res in results]
    if pending is not None:
        tables.extend(_tables_of(*pending, grid))
    head_table = concat_tables(head_tables, HEAD_ENGINE_SCHEMA) if heads else None
    return concat_tables(tables), head_table


def _to_host(results: list[Responses]) -> tuple[list[Responses], object]:
    """Start copying a pass's norms to the host without waiting (pinned buffers,
    non_blocking) on CUDA; the event returned marks their arrival. On the CPU, as they are."""
    if results[0].r.device.type != "cuda":
        return results, None

    def pinned(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)

    moved = [replace(r, r=pinned(r.r), r_attn=pinned(r.r_attn), r_mlp=pinned(r.r_mlp),
                     kl=pinned(r.kl)) for r in results]
    event = torch.cuda.Event()
    event.record()
    return moved, event


def _tables_of(results: list[Responses], event, group, spec, grid) -> list:
    if event is not None:
        event.synchronize()
    return [responses_to_table(res, group, grid, spec.e_chunk, spec.d_chunk) for res in results]
