"""The report page in a real headless Chromium at 800 px, and what its summary says, on a
synthetic sweep with a known answer (two models, two dtypes, stripes from depth 0.5)."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from analysis.api import from_shards
from analysis.report import build_report
from analysis.synthetic import SyntheticSpec, write_synthetic_sweep
from tests.browser import inspect_page

SPEC = SyntheticSpec(sweep="syn", models=(("synth-a", 12), ("synth-b", 20)),
                     dtypes=("float32", "bfloat16"), T=8, n_prompts=1, lps=(0, 2), directions=2)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    paths = write_synthetic_sweep(SPEC, d / "shards")
    units = pa.table({"unit_key": [p.stem for p in paths], "status": ["done"] * len(paths)})
    data = from_shards(paths, units, pa.table({"sweep": ["syn"]}), sweep="syn")
    return build_report(data, d / "rep")


def test_page_renders_in_chromium_at_800px(report, tmp_path):
    shot = tmp_path / "page.png"
    page = inspect_page(report, width=800, screenshot=shot)
    assert page.console_errors == []
    html = report.read_text()
    n_imgs = len(re.findall(r"<img ", html))
    n_plotly = html.count('class="plotly-graph-div"')
    # Per (model, dtype): chi vs eps and chi vs i - j interactive; induction depth; sections.
    assert n_plotly == 2 * 4 + 2
    assert (page.images, page.broken_images) == (n_imgs, [])
    assert page.plotly_divs == n_plotly and page.plotly_rendered == n_plotly
    assert page.too_wide == [] and page.scroll_width <= page.viewport_width
    assert shot.read_bytes()[:4] == b"\x89PNG"
    # No network: plotly.js is inline (inspect_page also fails any non-file request).
    assert re.search(r"<script[^>]+src=", html) is None


def test_summary_states_the_findings_from_the_numbers(report):
    html = report.read_text()
    summary = html[html.index('id="summary"'):html.index('id="universality"')]
    # synth-a: 12 layers, stripes (score 10) from layer round(0.5 * 12) = 6 on; the one-layer
    # spike (score 3) at layer 3 is not emergence.
    assert "Induction: yes." in summary
    assert "exceeds 2 from layer 6 (depth 0.50)" in summary
    assert "exceeds 2 from layer 10 (depth 0.50)" in summary  # synth-b, 20 layers
    assert "peaks at 10.00" in summary
    assert "Universal regime: yes" in summary
    assert summary.count("Universal regime") == 4  # one per (model, dtype)


def test_every_table_and_extract_is_linked_and_written(report):
    html = report.read_text()
    folder = report.parent
    for stem in ("universality", "induction_scores", "emergence", "sections", "chi_by_offset"):
        for ext in ("csv", "parquet"):
            name = f"{stem}.{ext}"
            assert f'href="{name}"' in html and (folder / name).stat().st_size > 0, name
    md = (folder / "report.md").read_text()
    assert "[emergence.parquet](emergence.parquet)" in md
    # The sections table names its first blocks (synthetic: attention at le - 1, MLP 2 later).
    sec = html[html.index('id="sections"'):html.index('id="data"')]
    rows = re.findall(r"<tr><td>synth-a</td><td>float32</td><td>8</td><td>0</td>"
                      r"<td>(\d+)</td><td>(\d+)</td>", sec)
    assert rows == [("5", "7")]
