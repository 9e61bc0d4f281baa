"""Engine responses -> the long pyarrow table of tasks.layout (one row per cell, l, i).

Vectorised with numpy: building a shard never loops over rows in Python.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tasks.layout import ENGINE_SCHEMA, HEAD_ENGINE_SCHEMA


def responses_to_table(res, group, grid, e_chunk: slice | None, d_chunk: slice) -> pa.Table:
    """One Responses block as rows; e_chunk None marks linear-response rows (eps NULL)."""
    r = res.r.float().cpu().numpy()  # [G, C, levels, s]
    G, C, n_lv, s = r.shape
    dir_idx = np.arange(d_chunk.start, d_chunk.stop, dtype=np.int32)
    if e_chunk is None:
        eps_vals = np.array([np.nan])
    else:
        eps_vals = grid.eps[e_chunk].numpy()
    cell_eps, cell_dir = _cells(eps_vals, dir_idx)
    assert len(cell_eps) == C, (len(cell_eps), C)
    levels = np.arange(res.l0, res.l0 + n_lv, dtype=np.int16)
    pos = np.arange(res.i0, res.i0 + s, dtype=np.int32)

    keep_l = np.ones(n_lv, bool) if grid.record_layers is None else np.isin(
        levels, list(grid.record_layers))
    # Positions before j are exactly zero by causality: never stored.
    keep_i = pos >= res.j
    if grid.record_positions is not None:
        keep_i &= np.isin(pos, list(grid.record_positions))
    # Levels below lp are untouched by the perturbation (only present without prefix reuse).
    keep_l &= levels >= res.lp

    shape = (G, C, n_lv, s)
    g_ix, c_ix, l_ix, i_ix = np.meshgrid(np.arange(G), np.arange(C), np.arange(n_lv),
                                         np.arange(s), indexing="ij")
    mask = keep_l[l_ix] & keep_i[i_ix]
    g_ix, c_ix, l_ix, i_ix = g_ix[mask], c_ix[mask], l_ix[mask], i_ix[mask]

    # NULLs come from the layout (no block at l = L; KL only at l = L), never from values:
    # a NaN from an overflow must stay visible so the unit can be failed for it.
    is_final = (l_ix == n_lv - 1)

    def section(t):
        full = np.zeros(shape, dtype=np.float32)
        full[:, :, : n_lv - 1] = t.float().cpu().numpy()
        return pa.array(full[mask], type=pa.float32(), mask=is_final)

    kl_full = np.zeros(shape, dtype=np.float32)
    kl_full[:, :, n_lv - 1] = res.kl.float().cpu().numpy()
    cols = {
        **_cell_columns(res, group, cell_eps, cell_dir, g_ix, c_ix),
        "l": levels[l_ix],
        "i": pos[i_ix],
        "r": r[mask],
        "r_attn": section(res.r_attn),
        "r_mlp": section(res.r_mlp),
        "kl": pa.array(kl_full[mask], type=pa.float32(), mask=~is_final),
    }
    return pa.table(cols, schema=ENGINE_SCHEMA)


def _cells(eps_vals: np.ndarray, dir_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Cells are eps-major: c = e * D_chunk + d.
    return np.repeat(eps_vals, len(dir_idx)), np.tile(dir_idx, len(eps_vals))


def _cell_columns(res, group, cell_eps: np.ndarray, cell_dir: np.ndarray, g_ix: np.ndarray,
                  c_ix: np.ndarray) -> dict:
    """The columns that name a cell (prompt, kind, lp, j, eps, direction), per row: shared by
    the response rows and the per-head rows so both tables key their cells the same way."""
    prompts = np.array([p.id for p in group], dtype=np.int32)
    kinds = np.array([p.kind for p in group], dtype=object)
    eps_col = cell_eps[c_ix]
    return {
        "prompt_id": prompts[g_ix],
        "prompt_kind": kinds[g_ix],
        "lp": np.full(len(g_ix), res.lp, dtype=np.int16),
        "j": np.full(len(g_ix), res.j, dtype=np.int32),
        "eps": pa.array(eps_col, type=pa.float64(), mask=np.isnan(eps_col)),  # NULL = linear
        "direction": cell_dir[c_ix],
    }


def heads_to_table(res, group, grid, e_chunk: slice | None, d_chunk: slice,
                   patterns) -> pa.Table:
    """Per-head rows of one Responses block (tasks.layout.HEAD_ENGINE_SCHEMA).

    `patterns` [L, G, H, n, n] holds the group's clean attention weights; each row carries
    the weight its head gives query i on key j.
    """
    r = res.r_head.float().cpu().numpy()  # [G, C, blocks, H, k]
    G, C, n_blk, H, k = r.shape
    dir_idx = np.arange(d_chunk.start, d_chunk.stop, dtype=np.int32)
    eps_vals = np.array([np.nan]) if e_chunk is None else grid.eps[e_chunk].numpy()
    cell_eps, cell_dir = _cells(eps_vals, dir_idx)
    levels = np.arange(res.l0, res.l0 + n_blk, dtype=np.int16)
    pos = res.head_i.numpy().astype(np.int32)
    keep_l = levels >= res.lp
    if grid.record_layers is not None:
        keep_l &= np.isin(levels, list(grid.record_layers))
    keep_i = pos >= res.j
    if grid.record_positions is not None:
        keep_i &= np.isin(pos, list(grid.record_positions))
    g_ix, c_ix, l_ix, h_ix, i_ix = np.meshgrid(np.arange(G), np.arange(C), np.arange(n_blk),
                                               np.arange(H), np.arange(k), indexing="ij")
    mask = keep_l[l_ix] & keep_i[i_ix]
    g_ix, c_ix, l_ix, h_ix, i_ix = (a[mask] for a in (g_ix, c_ix, l_ix, h_ix, i_ix))
    attn = patterns.float().cpu().numpy()[levels[l_ix], g_ix, h_ix, pos[i_ix], res.j]
    cols = {
        **_cell_columns(res, group, cell_eps, cell_dir, g_ix, c_ix),
        "l": levels[l_ix],
        "head": h_ix.astype(np.int16),
        "i": pos[i_ix],
        "r_head": r[g_ix, c_ix, l_ix, h_ix, i_ix],
        "attn": attn,
    }
    return pa.table(cols, schema=HEAD_ENGINE_SCHEMA)


def concat_tables(tables: list[pa.Table], schema: pa.Schema = ENGINE_SCHEMA) -> pa.Table:
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)
