"""The long-format layouts of a unit's tables: responses (one row per prompt, lp, j, eps,
direction, l, i) and, when recorded, head_responses (the same keys plus the head).

Shared contract between the engine (which fills it), the shard writer in db/ and analysis/.
"""

from __future__ import annotations

import pyarrow as pa

# Version of the numbers' definition: part of every unit key, so a change of method
# (what r means, how the baseline is taken) never mixes with old results.
METHOD_VERSION = "1"

# Columns filled by the engine for one unit of work.
ENGINE_FIELDS: list[pa.Field] = [
    pa.field("prompt_id", pa.int32(), nullable=False),  # index of the prompt pair in the sweep
    pa.field("prompt_kind", pa.string(), nullable=False),  # repeat | control | text
    pa.field("lp", pa.int16(), nullable=False),  # layer whose input is perturbed
    pa.field("j", pa.int32(), nullable=False),  # perturbed position
    # Perturbation strength; NULL marks the exact linear response (eps -> 0, by jvp).
    pa.field("eps", pa.float64(), nullable=True),
    pa.field("direction", pa.int32(), nullable=False),  # direction index within its family
    pa.field("l", pa.int16(), nullable=False),  # residual level: input of block l; l = L is the
    # output of the last block before the final norm
    pa.field("i", pa.int32(), nullable=False),  # response position (i >= j)
    # R_l(i) = ||x~_l(i) - x_l(i)|| / ||x_l(i)||.  For linear rows (eps NULL): the limit R/eps.
    pa.field("r", pa.float32(), nullable=False),
    # Same normalisation for block l's attention and MLP outputs (what each adds to the
    # residual stream).  NULL at l = L, which is no block.
    pa.field("r_attn", pa.float32(), nullable=True),
    pa.field("r_mlp", pa.float32(), nullable=True),
    # KL(p~_i || p_i) of the next-token distribution; only on rows with l = L, else NULL.
    # For linear rows: the limit KL / eps^2.
    pa.field("kl", pa.float32(), nullable=True),
]

# Columns the orchestrator adds so that a shard stands alone.
UNIT_FIELDS: list[pa.Field] = [
    pa.field("sweep", pa.string(), nullable=False),
    pa.field("unit_key", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("dtype", pa.string(), nullable=False),
    pa.field("T", pa.int32(), nullable=False),  # length of one copy of the random sequence
    pa.field("n_layers", pa.int16(), nullable=False),  # L, for normalised depth l / L
]

ENGINE_SCHEMA = pa.schema(ENGINE_FIELDS)
SHARD_SCHEMA = pa.schema(UNIT_FIELDS + ENGINE_FIELDS)

# Per-head responses (spec `record: {heads: true}`): a second table per unit, one row per
# (prompt, lp, j, eps, direction, l, head, i), kept only at the offsets i - j the spec asks
# for (by default 0, 1..3, T-1, T; tasks.heads.default_offsets).
HEAD_ENGINE_FIELDS: list[pa.Field] = [
    *(f for f in ENGINE_FIELDS if f.name in ("prompt_id", "prompt_kind", "lp", "j", "eps",
                                             "direction", "l")),
    pa.field("head", pa.int16(), nullable=False),  # attention head of block l (query head)
    pa.field("i", pa.int32(), nullable=False),
    # ||W_O,h (z~_h(i) - z_h(i))|| / ||x_l(i)||: the change of what head h of block l adds to
    # the residual stream (z_h: its slice of the attention output projection's input).
    # For linear rows (eps NULL): the limit r_head / eps.
    pa.field("r_head", pa.float32(), nullable=False),
    # The clean attention weight head h of block l gives query i on key j (independent of the
    # perturbation): at i - j = T-1 the classic induction pattern, at 1 the previous token.
    pa.field("attn", pa.float32(), nullable=False),
]
HEAD_ENGINE_SCHEMA = pa.schema(HEAD_ENGINE_FIELDS)
HEAD_SHARD_SCHEMA = pa.schema(UNIT_FIELDS + HEAD_ENGINE_FIELDS)
