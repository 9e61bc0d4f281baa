"""Unit keys of existing sweeps never change: the example specs plan to the recorded keys."""

from __future__ import annotations

import json

import pytest

from tests.unit_keys import FIXTURE, GEMMA3_SPECS, all_names, gemma3_installed, plan_summary

RECORDED = json.loads(FIXTURE.read_text())


def test_fixture_covers_every_recorded_spec() -> None:
    assert sorted(RECORDED) == sorted(all_names())


@pytest.mark.parametrize("name", all_names())
def test_plan_reproduces_recorded_unit_keys(name: str) -> None:
    if name in GEMMA3_SPECS and not gemma3_installed():
        pytest.skip("Gemma-3-270M weights not installed (unisweep models install gemma3-270m)")
    got = plan_summary(name)
    want = RECORDED[name]
    assert got["first_keys"] == want["first_keys"]
    assert (got["units"], got["cells"]) == (want["units"], want["cells"])
    assert got["sha256"] == want["sha256"]
