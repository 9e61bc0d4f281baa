"""Running one unit of work: prompts, directions, the engine, checks -> the unit's shard table.

No database and no files: the worker leases a unit, calls run_unit, writes what it returns.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from tasks.directions import unit_directions
from tasks.engine import compute_responses
from tasks.errors import UnisweepError
from tasks.layout import SHARD_SCHEMA
from tasks.model_handle import LoadedModel
from tasks.prompts import unit_prompts
from tasks.work import UnitWork

# Float columns that carry responses: a NaN or inf in any of them is never data.
RESPONSE_COLUMNS = ("r", "r_attn", "r_mlp", "kl")


class NonFiniteResponse(UnisweepError):
    """The engine returned NaN or inf (for example float16/bfloat16 overflow)."""


def check_finite(table: pa.Table) -> None:
    """Raise NonFiniteResponse naming the columns and row counts with NaN or inf."""
    bad = []
    for name in RESPONSE_COLUMNS:
        if name not in table.column_names:
            continue
        col = table.column(name)
        finite = pc.is_finite(col)  # null stays null (r_attn at l = L is NULL by design)
        n_bad = int(pc.sum(pc.invert(finite.fill_null(True))).as_py() or 0)
        if n_bad:
            bad.append(f"{name}: {n_bad} of {len(col)} rows")
    if bad:
        raise NonFiniteResponse("non-finite response (NaN or inf; in float16/bfloat16 usually an "
                                "overflow) in " + "; ".join(bad))


def add_unit_columns(table: pa.Table, *, sweep: str, unit_key: str, model: str, dtype: str,
                     T: int, n_layers: int) -> pa.Table:
    """Prefix the engine's columns with the UNIT_FIELDS, in SHARD_SCHEMA order and types."""
    n = table.num_rows
    consts = {"sweep": sweep, "unit_key": unit_key, "model": model, "dtype": dtype, "T": T,
              "n_layers": n_layers}
    cols = []
    for f in SHARD_SCHEMA:
        if f.name in consts:
            cols.append(pa.array([consts[f.name]] * n, type=f.type))
        else:
            cols.append(table.column(f.name).cast(f.type))
    return pa.Table.from_arrays(cols, schema=SHARD_SCHEMA)


def run_unit(lm: LoadedModel, work: UnitWork, *, sweep: str, unit_key: str | None = None) -> pa.Table:
    """The shard table of one unit: every cell's responses, checked finite, with unit columns.

    `lm` must be the unit's model in the unit's dtype (the worker loads it once per group);
    `unit_key`: the key the database holds (default: work.key()).
    """
    unit_key = unit_key or work.key()
    if lm.dtype_name != work.dtype:
        raise UnisweepError(f"unit {unit_key[:12]} wants dtype {work.dtype}, the worker holds "
                            f"{lm.dtype_name}")
    prompts = unit_prompts(lm, work)
    table = compute_responses(
        lm, prompts, lps=[work.lp], positions=list(work.positions), eps=list(work.eps),
        directions=unit_directions(work, lm.d_model), linear=work.linear,
        record_layers=None if work.record_layers is None else list(work.record_layers),
        record_positions=None if work.record_positions is None else list(work.record_positions),
    )
    check_finite(table)
    # expected_rows counts every kind at one length; prompts of a unit may differ in length
    # (a text window of a tokenizer without BOS), so count each prompt at its own.
    expected = sum(work.expected_rows(p.n) // len(prompts) for p in prompts)
    if table.num_rows != expected:
        raise UnisweepError(f"unit {unit_key[:12]}: the engine returned {table.num_rows} rows, "
                            f"the unit's grid has {expected}")
    return add_unit_columns(table, sweep=sweep, unit_key=unit_key, model=lm.model_id,
                            dtype=work.dtype, T=work.prompt.T, n_layers=lm.n_layers)
