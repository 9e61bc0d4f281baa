"""The emergence rule on score curves with a known answer: rise then fall, a noise spike,
never crossing, missing scores, the half-maximum rise, and bad rule parameters."""

from __future__ import annotations

import math

import polars as pl
import pytest

from analysis.emergence import emergence_columns, find_emergence
from tasks.errors import InvalidInput

L = list(range(0, 31))


def _curve(values: dict[int, float], base: float = 1.0) -> list[float]:
    return [values.get(lv, base) for lv in L]


def test_rise_then_fall_emerges_where_it_first_stays_up():
    # Real models: the score rises in the middle and falls back below 2 near the output.
    s = _curve({lv: 1.0 + 0.4 * lv for lv in range(1, 10)} | {lv: 4.85 for lv in range(10, 20)}
               | {lv: 1.5 for lv in range(20, 31)})
    e = find_emergence(L, s)
    # 1 + 0.4 l > 2 first at l = 3 (2.2), then 2.6, 3.0, ... through l = 19.
    assert (e.layer, e.status, e.run_length) == (3, "sustained", 17)
    assert (e.peak_layer, e.peak_score) == (10, 4.85)
    # Half of the rise 1 -> 4.85 is 2.925: 1 + 0.4 l >= 2.925 first at l = 5 (3.0).
    assert e.half_rise_layer == 5


def test_noise_spike_does_not_count_before_a_sustained_run():
    s = _curve({4: 3.0, 5: 2.5} | {lv: 6.0 for lv in range(15, 31)})
    e = find_emergence(L, s)
    assert (e.layer, e.status, e.run_length) == (15, "sustained", 16)
    assert e.peak_layer == 15 and e.half_rise_layer == 15
    # With a run length of 2 the spike is enough.
    assert find_emergence(L, s, min_layers=2).layer == 4
    assert find_emergence(L, s, min_layers=1).layer == 4


def test_spike_alone_is_transient_not_none():
    s = _curve({12: 3.0})
    e = find_emergence(L, s)
    assert (e.layer, e.status, e.run_length) == (12, "transient", 1)
    assert (e.peak_layer, e.peak_score, e.half_rise_layer) == (12, 3.0, 12)


def test_never_crossing_is_none():
    s = _curve({lv: 1.9 for lv in range(10, 31)})
    e = find_emergence(L, s)
    assert (e.layer, e.status, e.run_length) == (None, "none", 0)
    assert (e.peak_layer, e.peak_score) == (10, 1.9)
    assert e.half_rise_layer == 10
    # A score that never rises above 1 has no half-maximum rise.
    flat = find_emergence(L, [0.8] * len(L))
    assert (flat.status, flat.half_rise_layer, flat.peak_score) == ("none", None, 0.8)


def test_threshold_is_strict_and_missing_scores_break_a_run():
    # Exactly the threshold is not above it; a NULL (0/0 at l = lp) or NaN is below.
    assert find_emergence(L, [2.0] * len(L)).status == "none"
    s = _curve({lv: 3.0 for lv in range(5, 31)})
    s[7] = None
    s[12] = math.nan
    e = find_emergence(L, s)
    assert (e.layer, e.run_length) == (8, 4)  # 5, 6 | 8..11 | 13..30
    assert find_emergence(L, [None] * len(L)).peak_layer is None


def test_layers_need_not_start_at_zero_or_be_contiguous():
    layers = [15, 16, 17, 18, 20, 25, 30]
    e = find_emergence(layers, [None, 1.2, 2.5, 2.6, 2.7, 1.0, 1.0])
    assert (e.layer, e.status, e.run_length, e.peak_layer) == (17, "sustained", 3, 20)


def test_emergence_columns_per_group():
    frame = pl.DataFrame({
        "g": ["a"] * 6 + ["b"] * 6, "l": list(range(6)) * 2,
        "score": [1.0, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 5],
    })
    out = emergence_columns(frame, ["g"], "score", "x", threshold=2.0, min_layers=3).sort("g")
    assert out["x_layer"].to_list() == [1, 5]
    assert out["x_status"].to_list() == ["sustained", "transient"]
    assert out["x_peak_layer"].to_list() == [1, 5]


@pytest.mark.parametrize("kwargs, field", [({"threshold": 0}, "threshold"),
                                           ({"min_layers": 0}, "min_layers"),
                                           ({"min_layers": 2.5}, "min_layers")])
def test_bad_rule_parameters_name_the_field(kwargs, field):
    with pytest.raises(InvalidInput, match=field):
        find_emergence(L, [1.0] * len(L), **kwargs)
