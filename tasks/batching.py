"""The batch planner: how many rows a forward pass may hold, and which cells share a pass.

Rows per pass come from a memory budget (free memory on a CUDA device; a given budget, or
half the available RAM, on the CPU) divided by a per-row activation model; positions are
packed into one pass when sharing it costs less than a pass of their own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from tasks.errors import InvalidInput

# Bytes the KL's temporaries may take at once (its chunk of rows x positions x vocab), at
# most a quarter of the memory budget.
LOGIT_BUDGET = 128 << 20
# Temporaries of the KL alive with one chunk of logits (logits, dz, x, g, f; see tasks.kl).
KL_TEMPORARIES = 5
# With the fused kernel (tasks.kl) a chunk is the logits turned into dz in place, plus what
# the large-change fallback takes for its few rows: the same bytes hold 2.5x the rows, and
# the head's GEMM runs faster on more rows (measured: 102 -> 122 GFLOP/s from 128 to 512
# rows of SmolLM2's head on this 2-core CPU).
KL_TEMPORARIES_FUSED = 2
# The activation model below counts the tensors a block creates; the allocator, the hooks'
# float copies and HF's masks add to that: a 2x margin. An estimate: bench/memory.py compares
# it with measured peaks (not yet run to the end on the shared development machine).
SAFETY = 2.0
# On the CPU, passes stop at this many row-positions: beyond a few thousand a larger GEMM
# gains nothing per row-position while its activations leave the caches (an estimate that
# bench/memory.py measures); a GPU takes all the memory allows.
CPU_ROW_POSITIONS = 8192
# Per-pass overhead in row-positions (Python hooks, cache set-up, kernel launches): what a
# position saves by joining a pass instead of running its own. Estimates (bench/memory.py
# fits the CPU one); on a GPU launches cost relatively more, so more joins pay.
PASS_OVERHEAD = {"cpu": 64, "cuda": 2048}


def _cfg(lm, *names, default=None):
    cfg = lm.model.config
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    return default


@dataclass(frozen=True)
class RowModel:
    """Bytes one row of a suffix pass holds at its peak, from the model's shapes."""

    kv_per_position: int  # K and V of one block, per context position
    act_per_position: int  # one block's transient activations, per computed position
    scores_per_key: int  # attention scores and probabilities, per (computed position, key)
    n_layers: int

    @classmethod
    def of(cls, lm) -> RowModel:
        elem = torch.finfo(lm.dtype).bits // 8
        rd = 8 if lm.dtype == torch.float64 else 4  # the recorder's result dtype
        d = lm.d_model
        heads = _cfg(lm, "num_attention_heads", "n_head")
        head_dim = _cfg(lm, "head_dim", default=d // heads)
        kv_heads = _cfg(lm, "num_key_value_heads", default=heads)
        d_ff = _cfg(lm, "intermediate_size", "n_inner", default=4 * d)
        # residual, normed input, attention and MLP outputs, norms; q, k, v, attention output;
        # the MLP's gate, up, activation and product; the recorder's delta in the result dtype.
        act = elem * (6 * d + 2 * heads * head_dim + 2 * kv_heads * head_dim + 4 * d_ff) + 2 * rd * d
        # Scores and probabilities (eager attention upcasts the softmax to float32).
        scores = heads * (elem + 4)
        return cls(2 * kv_heads * head_dim * elem, act, scores, lm.n_layers)

    def row_bytes(self, s: int, n: int, blocks_run: int, linear: bool) -> int:
        """One row computing s positions with n keys: its cache of the run blocks plus one
        block's activations (hooks reduce each block's outputs to norms before the next)."""
        per_row = (self.kv_per_position * n * blocks_run
                   + s * (self.act_per_position + self.scores_per_key * n))
        return int(SAFETY * per_row * (2 if linear else 1))  # tangents double everything



def memory_budget(device: torch.device, budget: int | None) -> int:
    """Bytes a pass may use: the given budget, else free device memory (CUDA) or half the
    RAM available now (CPU), which other processes share."""
    if budget is not None:
        return int(budget)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(0.9 * free)
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        return info["MemAvailable"] // 2
    except (OSError, KeyError, ValueError, IndexError):
        return 4 << 30


@dataclass(frozen=True)
class PassBudget:
    rows: int  # rows one pass may hold
    kl_bytes: int  # bytes the KL's temporaries may take at once


def rows_per_pass(lm, n: int, budget: int | None, linear: bool,
                  max_rows: int | None) -> PassBudget:
    """The most rows one pass over n positions may hold (every block, from position 0: the
    worst case of any pass of the grid). Raises InvalidInput naming the smallest budget that
    fits when not even the smallest pass (a baseline and one cell) fits: before any work."""
    model = RowModel.of(lm)
    row = model.row_bytes(n, n, model.n_layers, linear)
    avail = memory_budget(lm.device, budget)
    # The KL needs one row of logits at least; with that, one baseline and one cell.
    rd = 8 if lm.dtype == torch.float64 else 4
    kl_row = KL_TEMPORARIES * n * lm.model.config.vocab_size * rd
    smallest = 2 * row + int(SAFETY * kl_row)
    if avail < smallest:
        where = "the budget given" if budget is not None else f"free memory on {lm.device}"
        raise InvalidInput("memory_budget", f"at least {smallest} bytes ({smallest / 2**20:.0f} "
                           f"MiB): one pass of {lm.model_id} over {n} positions", avail,
                           detail=f"{where}, in bytes")
    kl_bytes = max(kl_row, min(LOGIT_BUDGET, avail // 4))
    rows = (avail - int(SAFETY * kl_bytes)) // row
    if rows < 2:  # a tight budget: rows first, the KL one row of logits at a time
        kl_bytes = kl_row
        rows = (avail - int(SAFETY * kl_bytes)) // row
    if lm.device.type == "cpu":
        rows = min(rows, max(2, CPU_ROW_POSITIONS // n))
    if max_rows is not None:
        rows = min(rows, max_rows)
    return PassBudget(int(max(2, rows)), int(kl_bytes))


@dataclass(frozen=True)
class PassSpec:
    """One forward pass: these positions j, each with the cells of one chunk."""

    js: tuple[int, ...]
    e_chunk: slice | None  # None: a linear-response pass (directions only)
    d_chunk: slice


def pack_positions(positions: Sequence[int], groups: int, base_rows: int, site_rows: int,
                   rows_cap: int, n: int, start_of, overhead: int,
                   batch_positions: bool = True) -> Iterator[tuple[int, ...]]:
    """Consecutive positions that share a pass: a position joins while the rows fit and its
    rows over the pass's longer suffix cost less than a pass of its own (overhead, its own
    baseline and its own suffix). start_of(j) is the first position a pass for j computes."""
    batch: list[int] = []
    for j in sorted(positions):
        if batch and batch_positions:
            s_pass = n - start_of(batch[0])
            s_own = n - start_of(j)
            rows_after = groups * (base_rows + (len(batch) + 1) * site_rows)
            join = groups * site_rows * s_pass
            own = overhead + groups * (base_rows + site_rows) * s_own
            if rows_after <= rows_cap and join <= own:
                batch.append(j)
                continue
        if batch:
            yield tuple(batch)
        batch = [j]
    if batch:
        yield tuple(batch)


def plan_passes(grid, groups: int, n: int, start_of, device_type: str, linear: bool,
                batch_positions: bool = True) -> Iterator[PassSpec]:
    """Every pass of one lp for a prompt group: cell chunks (eps x directions) that fit the
    rows, then the grid's positions packed into passes for each chunk."""
    overhead = PASS_OVERHEAD.get(device_type, PASS_OVERHEAD["cuda"])
    for e_chunk, d_chunk in grid.cell_chunks(groups):
        cells = (e_chunk.stop - e_chunk.start) * (d_chunk.stop - d_chunk.start)
        for js in pack_positions(grid.positions, groups, 1, cells, grid.max_rows, n, start_of,
                                 overhead, batch_positions):
            yield PassSpec(js, e_chunk, d_chunk)
    if linear:
        for d_chunk in grid.direction_chunks(groups):
            dirs = d_chunk.stop - d_chunk.start
            for js in pack_positions(grid.positions, groups, 0, dirs, grid.max_rows, n,
                                     start_of, overhead, batch_positions):
                yield PassSpec(js, None, d_chunk)
