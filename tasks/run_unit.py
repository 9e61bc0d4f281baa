"""Running units of work: prompts, directions, the engine, checks -> each unit's shard table.

No database and no files: the worker leases units, calls run_unit (one) or run_units (several
in as few engine calls as possible), writes what it returns.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc

from tasks.directions import unit_directions
from tasks.engine import compute_tables
from tasks.errors import UnisweepError
from tasks.layout import HEAD_SHARD_SCHEMA, SHARD_SCHEMA
from tasks.model_handle import LoadedModel
from tasks.prompts import unit_prompts
from tasks.work import UnitWork

# Float columns that carry responses: a NaN or inf in any of them is never data.
RESPONSE_COLUMNS = ("r", "r_attn", "r_mlp", "kl", "r_head", "attn")


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
                     T: int, n_layers: int, schema: pa.Schema = SHARD_SCHEMA) -> pa.Table:
    """Prefix the engine's columns with the UNIT_FIELDS, in `schema` order and types
    (SHARD_SCHEMA, or HEAD_SHARD_SCHEMA for the head_responses table)."""
    n = table.num_rows
    consts = {"sweep": sweep, "unit_key": unit_key, "model": model, "dtype": dtype, "T": T,
              "n_layers": n_layers}
    cols = []
    for f in schema:
        if f.name in consts:
            cols.append(pa.array([consts[f.name]] * n, type=f.type))
        else:
            cols.append(table.column(f.name).cast(f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def run_unit(lm: LoadedModel, work: UnitWork, *, sweep: str, unit_key: str | None = None) -> pa.Table:
    """The shard table of one unit: every cell's responses, checked finite, with unit columns.

    `lm` must be the unit's model in the unit's dtype (the worker loads it once per group);
    `unit_key`: the key the database holds (default: work.key()).
    """
    return run_unit_tables(lm, work, sweep=sweep, unit_key=unit_key)[0]


def run_unit_tables(lm: LoadedModel, work: UnitWork, *, sweep: str,
                    unit_key: str | None = None) -> tuple[pa.Table, pa.Table | None]:
    """run_unit's shard table and, when the unit records heads, its head_responses table."""
    unit_key = unit_key or work.key()
    _check_dtype(lm, work, unit_key)
    prompts = unit_prompts(lm, work)
    table, head_table = _engine(lm, work, prompts, [work.lp], work.positions)
    return _finish(lm, work, prompts, table, head_table, sweep=sweep, unit_key=unit_key)


def _check_dtype(lm: LoadedModel, work: UnitWork, unit_key: str) -> None:
    if lm.dtype_name != work.dtype:
        raise UnisweepError(f"unit {unit_key[:12]} wants dtype {work.dtype}, the worker holds "
                            f"{lm.dtype_name}")


def _engine(lm: LoadedModel, work: UnitWork, prompts: list, lps: list[int],
            positions: tuple[int, ...]) -> tuple[pa.Table, pa.Table | None]:
    """One engine call: `work`'s settings over the grid lps x positions."""
    return compute_tables(
        lm, prompts, lps=list(lps), positions=list(positions), eps=list(work.eps),
        directions=unit_directions(work, lm.d_model), linear=work.linear,
        record_layers=None if work.record_layers is None else list(work.record_layers),
        record_positions=None if work.record_positions is None else list(work.record_positions),
        heads=work.record_heads,
        head_offsets=None if work.head_offsets is None else list(work.head_offsets),
    )


def _finish(lm: LoadedModel, work: UnitWork, prompts: list, table: pa.Table,
            head_table: pa.Table | None, *, sweep: str,
            unit_key: str) -> tuple[pa.Table, pa.Table | None]:
    """Check one unit's engine rows (finite, the unit's row count) and add the unit columns."""
    check_finite(table)
    # expected_rows counts every kind at one length; prompts of a unit may differ in length
    # (a text window of a tokenizer without BOS), so count each prompt at its own.
    expected = sum(work.expected_rows(p.n) // len(prompts) for p in prompts)
    if table.num_rows != expected:
        raise UnisweepError(f"unit {unit_key[:12]}: the engine returned {table.num_rows} rows, "
                            f"the unit's grid has {expected}")
    unit = dict(sweep=sweep, unit_key=unit_key, model=lm.model_id, dtype=work.dtype,
                T=work.prompt.T, n_layers=lm.n_layers)
    if head_table is not None:
        check_finite(head_table)
        head_table = add_unit_columns(head_table, **unit, schema=HEAD_SHARD_SCHEMA)
    return add_unit_columns(table, **unit), head_table


# A merged engine call: the units it serves, and the grid (lps x positions) it computes.
_Call = tuple[list[int], list[int], tuple[int, ...]]  # (unit indices, lps, positions)


def plan_calls(works: list[UnitWork]) -> list[_Call]:
    """Group units into engine calls whose grid is exactly the union of their cells.

    Units merge only when they differ in lp and positions alone (same model, dtype, prompt,
    eps, linear, directions, record settings). Per lp the positions of its units are united;
    lps whose united positions are the same set share one call (lps x positions, a product).
    So every cell a call computes belongs to one of its units (no wasted work), and each unit
    takes its own (lp, j) rows out of the call's table.
    """
    by_identity: dict[UnitWork, dict[int, list[int]]] = {}
    for idx, w in enumerate(works):
        by_identity.setdefault(replace(w, lp=0, positions=()), {}).setdefault(w.lp, []).append(idx)
    calls: list[_Call] = []
    for per_lp in by_identity.values():
        by_positions: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}
        for lp, idxs in per_lp.items():
            pos = tuple(sorted({j for i in idxs for j in works[i].positions}))
            units, lps = by_positions.setdefault(pos, ([], []))
            units.extend(idxs)
            lps.append(lp)
        calls.extend((units, sorted(lps), pos) for pos, (units, lps) in by_positions.items())
    return calls


def _own_rows(table: pa.Table, work: UnitWork) -> pa.Table:
    """The rows of `table` that are `work`'s cells: its lp and its positions j."""
    mask = pc.and_(pc.equal(table.column("lp"), work.lp),
                   pc.is_in(table.column("j"), value_set=pa.array(work.positions, pa.int64())))
    return table.filter(mask)


def run_units(lm: LoadedModel, works: list[UnitWork], *, sweep: str,
              unit_keys: list[str] | None = None
              ) -> list[tuple[pa.Table, pa.Table | None] | Exception]:
    """run_unit_tables of several units of one model and dtype, in as few engine calls as
    plan_calls allows, so that their positions share passes (tasks.batching).

    Returns one entry per unit, in order: its (shard table, head table), or the exception
    that stops it. Each unit's rows are checked on their own (finite, the unit's row count),
    so a NaN in one unit fails that unit alone. When a merged call raises (a bad input, a
    memory error), its units run one at a time, so only the faulty one fails.
    """
    keys = unit_keys or [w.key() for w in works]
    out: list[tuple[pa.Table, pa.Table | None] | Exception | None] = [None] * len(works)

    def alone(i: int) -> tuple[pa.Table, pa.Table | None] | Exception:
        return _attempt(partial(run_unit_tables, lm, works[i], sweep=sweep, unit_key=keys[i]))

    for idxs, lps, positions in plan_calls(works):
        if len(idxs) == 1:
            out[idxs[0]] = alone(idxs[0])
            continue
        first = works[idxs[0]]
        try:
            _check_dtype(lm, first, keys[idxs[0]])
            prompts = unit_prompts(lm, first)
            table, head_table = _engine(lm, first, prompts, lps, positions)
        except Exception:  # noqa: BLE001 (each unit alone: only the faulty one fails)
            for i in idxs:
                out[i] = alone(i)
            continue
        for i in idxs:
            w = works[i]
            out[i] = _attempt(partial(_finish_own, lm, w, prompts, table, head_table,
                                      sweep=sweep, unit_key=keys[i]))
    return out  # type: ignore[return-value]


def _finish_own(lm: LoadedModel, w: UnitWork, prompts, table: pa.Table,  # noqa: ANN001
                head_table: pa.Table | None, *, sweep: str, unit_key: str):  # noqa: ANN202
    """One unit's share of a merged call: its own rows, then run_unit's checks on them."""
    own_heads = None if head_table is None else _own_rows(head_table, w)
    return _finish(lm, w, prompts, _own_rows(table, w), own_heads, sweep=sweep, unit_key=unit_key)


def _attempt(fn):  # noqa: ANN001, ANN202
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 (the caller records it against its unit)
        return exc
