"""The Python API of the analysis layer: load a sweep, then ask for Polars DataFrames.

    from analysis.api import load_sweep, universality, emergence, sections
"""

from __future__ import annotations

from analysis.emergence import chi_by_offset, chi_map, emergence, find_emergence, induction_scores
from analysis.report import build_report
from analysis.sections import sections
from analysis.source import SweepData, from_shards, load_sweep
from analysis.universality import chi_curves, universality
from analysis.views import OFFSET_CLASSES

__all__ = [
    "OFFSET_CLASSES",
    "SweepData",
    "build_report",
    "chi_by_offset",
    "chi_curves",
    "chi_map",
    "emergence",
    "find_emergence",
    "from_shards",
    "induction_scores",
    "load_sweep",
    "sections",
    "universality",
]
