"""bench/peers.py on a tiny config in its quickest mode: every method timed, ratios paired.

The peers (nnsight, TransformerLens) are the optional `bench` extra, not installed by CI: the
naive-only run always runs; the run with the peers skips, with the reason, without them.
"""

from __future__ import annotations

import importlib.util
import json

import pytest


def _run(tmp_path, peers: str) -> list[dict]:
    from bench.peers import main

    out = tmp_path / "peers.json"
    assert main(["--model", "tiny:llama", "--quick", "--peers", peers, "--per-position",
                 "--json", str(out)]) == 0
    return json.loads(out.read_text())["rows"]


def _check_rows(rows: list[dict], peers: tuple[str, ...]) -> None:
    # --quick: T = 16, 4 positions of copy 1, lp 0, 1 and 4 eps, 1 direction.
    assert [(r["T"], r["positions"], r["lps"], r["eps"], r["dirs"]) for r in rows] == [
        (16, "4", [0], 1, 1), (16, "4", [0], 4, 1)]
    for r in rows:
        assert r["cells"] == 4 * r["eps"] and r["engine_positions"] == 4
        assert r["engine"] > 0 and len(r["reps"]) == 1
        (rep,) = r["reps"]
        # The engine with one position per pass (--per-position), paired the same way.
        assert rep["engine_pp"] > 0
        assert r["batching_gain"] == pytest.approx(rep["engine"] / rep["engine_pp"])
        for name in peers:
            assert rep[name] > 0
            assert r[f"ratio_{name}"] == pytest.approx(rep["engine"] / rep[name])
        # The FLOP limit: a peer's full forward per cell against what the engine's cells need
        # (blocks and head from j on): above 1 whenever the positions are not all at 0.
        assert r["limit"] > 1.0


def test_peers_quick_naive_only(tmp_path):
    _check_rows(_run(tmp_path, "naive"), ("naive",))


@pytest.mark.skipif(not (importlib.util.find_spec("nnsight")
                         and importlib.util.find_spec("transformer_lens")),
                    reason="nnsight / transformer-lens not installed (pip install '.[bench]')")
def test_peers_quick_all_peers(tmp_path):
    _check_rows(_run(tmp_path, "naive,nnsight,bridge"),
                ("naive", "nnsight_cell", "nnsight_batched", "bridge"))


def test_peers_quick_with_fused_kl_both(tmp_path, monkeypatch, capsys):
    """--fused-kl both: the engine with the compiled KL, and with the eager KL interleaved."""
    from bench.peers import main
    from tasks import kl as klmod

    monkeypatch.setenv("UNISWEEP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "peers.json"
    try:
        assert main(["--model", "tiny:llama", "--quick", "--peers", "naive", "--fused-kl", "both",
                     "--json", str(out)]) == 0
        fused_on = klmod._fused is not None
    finally:
        klmod.set_fused_kl_mode("off")
    rows = json.loads(out.read_text())["rows"]
    for r in rows:
        (rep,) = r["reps"]
        assert rep["engine_eager"] > 0 and "engine_pp" not in rep
        assert r["fused_gain"] == pytest.approx(rep["engine"] / rep["engine_eager"])
    # --render prints the same table from the file, timing nothing.
    assert main(["--render", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "engine, eager KL" in printed and "issue 19 target met on" in printed
    assert f"{rows[1]['engine']:.2f}" in printed
    if not fused_on:
        pytest.skip("torch.compile unavailable here: both columns ran the eager KL")


def test_peers_limits_table(capsys):
    """--limits: the FLOP limit of each selected grid, from the shapes, nothing timed."""
    from bench.peers import main

    assert main(["--model", "tiny:llama", "--limits", "--grids", "T=16,positions=4,eps=1/11,dirs=1"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 16 |")]
    assert len(lines) == 4  # lp sets {0} and thirds: FLOP limits, then the engine's passes
    lp0, thirds = ([float(c.strip().rstrip("x")) for c in ln.strip("|").split("|")[3:]]
                   for ln in lines[:2])
    # More cells share the clean pass; skipping blocks below lp saves more: both raise it.
    assert 1.0 < lp0[0] < lp0[1] and lp0[1] < thirds[1]
    # Passes: one per lp at least; three lps take three times lp 0's passes.
    lp0_passes, thirds_passes = ([int(c.split(",")[0]) for c in ln.strip("|").split("|")[3:]]
                                 for ln in lines[2:])
    assert all(t == 3 * z >= 3 for z, t in zip(lp0_passes, thirds_passes))


def test_peers_bad_grid_selection_exits_2(capsys):
    from bench.peers import main

    for argv, says in ((["--grids", "eps=5"], "--grids: eps must be among 1/4/11, got '5'"),
                       (["--grids", "layers=0"], "--grids: 'layers=0'"),
                       (["--peers", "naive,pyvene"], "--peers: 'pyvene'"),
                       (["--render", "/nonexistent/peers.json"], "--render: no such file")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and says in capsys.readouterr().err
