"""`unisweep report`: one folder with index.html, report.md, the PNG figures and CSV tables.

Computes universality, emergence and sections once, then draws and writes; nothing else.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from analysis import plots
from analysis.emergence import chi_map, emergence, induction_scores
from analysis.sections import sections
from analysis.source import SweepData
from analysis.universality import GROUP, chi_curves, universality
from tasks.errors import InvalidInput


def _slug(*parts: object) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(str(p) for p in parts)).strip("-")


def _pick_eps(curves: pl.DataFrame) -> float | None:
    """The linear response when the sweep has it, else the middle swept eps."""
    if curves["eps"].null_count():
        return None
    eps = sorted(set(curves["eps"].to_list()))
    return eps[len(eps) // 2]


def _default_layers(n_layers: int, lp: int, emergence_layer: int | None) -> list[int]:
    picks = {round(q * n_layers) for q in (0.25, 0.75, 1.0)}
    picks.add(emergence_layer if emergence_layer is not None else round(0.5 * n_layers))
    return sorted(max(lp, min(n_layers, p)) for p in picks)


def build_report(data: SweepData, out_dir: str | Path, *, tol: float = 0.05,
                 threshold: float = 2.0, min_layers: int = 3,
                 layers: Sequence[int] | None = None) -> Path:
    """Write the report of `data` into `out_dir`; return the path of index.html."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidInput("out", "a folder (created if missing)", str(out))
    n_rows = data.sql("SELECT count(*) FROM responses").fetchall()[0][0]
    if n_rows == 0:
        raise InvalidInput("sweep", "a sweep with at least one done shard", data.sweep)
    out.mkdir(parents=True, exist_ok=True)

    uni = universality(data, tol)
    curves = chi_curves(data).with_columns(gkey=pl.concat_str(GROUP, separator="|"))
    eps_sel = _pick_eps(curves)
    scores = induction_scores(data, threshold, min_layers)
    sel = pl.col("eps").is_null() if eps_sel is None else pl.col("eps") == eps_sel
    scores_sel = scores.filter(sel)
    # One lp per (model, dtype) in the figures: the lowest, where the stripes have room to form.
    low_lp = scores_sel.group_by("model", "dtype").agg(pl.col("lp").min())
    scores_fig = scores_sel.join(low_lp, on=["model", "dtype", "lp"])
    em = emergence(data, threshold, min_layers).filter(sel)
    sec = sections(data, threshold, min_layers).filter(sel)
    eps_txt = "linear response (eps -> 0, jvp)" if eps_sel is None else f"eps = {eps_sel:.3g}"

    figures: list[tuple[str, str]] = []  # (file name, caption)
    for (model, dtype), cur in sorted(curves.partition_by(["model", "dtype"], as_dict=True)
                                      .items()):
        lp = int(cur["lp"].min())
        n_layers = int(cur["n_layers"][0])
        e = em.filter((pl.col("model") == model) & (pl.col("dtype") == dtype)
                      & (pl.col("lp") == lp))
        e_layer = e["emergence_layer"][0] if len(e) else None
        chosen = sorted(set(layers)) if layers else _default_layers(n_layers, lp, e_layer)
        bad = [x for x in chosen if not lp <= x <= n_layers]
        if bad:
            raise InvalidInput("layers", f"levels in {lp}..{n_layers} for {model}", bad)
        pick = (pl.col("prompt_kind") == "repeat") & (pl.col("lp") == lp)
        name = f"collapse_{_slug(model, dtype)}.png"
        plots.collapse_curves(cur.filter(pick), uni.filter(
            (pl.col("model") == model) & (pl.col("dtype") == dtype) & pick), chosen, out / name,
            f"{model} {dtype}: chi vs eps, repeat prompts, lp = {lp}")
        figures.append((name, f"chi against eps for {model} {dtype} (lp = {lp}, repeat "
                              f"prompts) per offset class at layers {chosen}: thick pale segment = plateau "
                              f"within {tol:.0%}, dashed = exact linear response."))
        T = int(cur["T"][0])
        maps = {(kind, layer): chi_map(data, layer, model=model, dtype=dtype, lp=lp,
                                       prompt_kind=kind, eps=eps_sel)
                for kind in ("repeat", "control") for layer in chosen}
        name = f"chi_map_{_slug(model, dtype)}.png"
        plots.chi_maps(maps, T, out / name, f"{model} {dtype}, lp = {lp}, {eps_txt}")
        figures.append((name, f"chi(i, j) maps of {model} {dtype} at layers {chosen}, repeat "
                              f"vs control prompts ({eps_txt})."))
    for model, cur in sorted(curves.partition_by("model", as_dict=True).items()):
        model = model[0] if isinstance(model, tuple) else model
        name = f"collapse_normalized_{_slug(model)}.png"
        plots.normalized_collapse(cur, out / name, f"{model}: every (lp, l, offset, prompt "
                                  "kind) curve over its linear response", tol)
        figures.append((name, f"Collapse of {model}: chi(eps) / chi_linear for every group, one "
                              "panel per dtype; the lower edge of the band is the dtype's "
                              "precision floor, the upper edge the nonlinear onset."))
    plots.induction_vs_depth(scores_fig, out / "induction_depth.png", threshold,
                             f"Induction score vs depth ({eps_txt}, lowest lp)")
    figures.append(("induction_depth.png", "Induction score (mean chi on the stripes, repeat / "
                    f"control) against normalised depth l / L; dotted: emergence layer "
                    f"(score > {threshold:g} from there on)."))
    sec_fig = sec.join(low_lp, on=["model", "dtype", "lp"])
    if len(sec_fig):
        plots.section_bars(sec_fig, out / "sections.png",
                           f"Attention vs MLP on the induction stripes ({eps_txt}, lowest lp)")
        figures.append(("sections.png", "Per block: attention and MLP output change on the "
                        "stripes (solid) vs the same offsets on control prompts (hatched); "
                        "dotted: the first blocks that carry the stripe."))

    # Tables: full CSVs, and short summaries in the page.
    uni.write_csv(out / "universality.csv")
    scores.write_csv(out / "induction_scores.csv")
    sec.write_csv(out / "sections.csv")
    summary = (uni.filter(pl.col("chi_plateau") > 0)
               .group_by("model", "dtype", "offset_class")
               .agg(pl.len().alias("groups"),
                    pl.col("decades").median().alias("median_decades"),
                    pl.col("eps_lo").median().alias("median_eps_lo"),
                    pl.col("eps_hi").median().alias("median_eps_hi"),
                    pl.col("linear_rel_err").abs().median().alias("median_abs_linear_err"),
                    pl.col("collapse").mean().alias("mean_collapse"))
               .sort("model", "dtype", "offset_class"))
    em_tab = em.select("model", "dtype", "T", "lp", "n_layers", "emergence_layer",
                       "emergence_depth", "emergence_status", "peak_score", "peak_layer",
                       "half_rise_depth")
    sec_tab = (sec.group_by("model", "dtype", "lp")
               .agg(pl.col("first_attn_block").first(), pl.col("first_mlp_block").first(),
                    pl.col("attn_share").mean().alias("mean_attn_share"))
               .sort("model", "dtype", "lp"))
    tables = [("Universal regime (median over layers and lp; groups with chi > 0)", summary),
              ("Emergence of induction", em_tab),
              ("Sections: first blocks carrying the stripe", sec_tab)]
    title = f"unisweep report: {data.sweep or 'sweep'}"
    meta = (f"{n_rows:,} response rows from {len(data.shard_paths)} shards; tolerance "
            f"{tol:.0%}; threshold {threshold:g}; {eps_txt}; written "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.")
    _write_markdown(out / "report.md", title, meta, tables, figures)
    return _write_html(out / "index.html", title, meta, tables, figures)


def _fmt(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.col(pl.Float64, pl.Float32).round_sig_figs(4))


def _write_markdown(path: Path, title: str, meta: str, tables, figures) -> None:
    lines = [f"# {title}", "", meta, ""]
    for head, df in tables:
        d = _fmt(df)
        lines += [f"## {head}", "", "| " + " | ".join(d.columns) + " |",
                  "|" + "---|" * len(d.columns)]
        lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |"
                  for row in d.iter_rows()]
        lines.append("")
    lines += ["## Figures", ""]
    for name, caption in figures:
        lines += [f"![{caption}]({name})", "", caption, ""]
    path.write_text("\n".join(lines))


def _write_html(path: Path, title: str, meta: str, tables, figures) -> Path:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>", f"<p>{e(meta)}</p>"]
    for head, df in tables:
        d = _fmt(df)
        body.append(f"<h2>{e(head)}</h2><table><tr>"
                    + "".join(f"<th>{e(c)}</th>" for c in d.columns) + "</tr>")
        body += ["<tr>" + "".join(f"<td>{'' if v is None else e(str(v))}</td>" for v in row)
                 + "</tr>" for row in d.iter_rows()]
        body.append("</table>")
    body.append("<h2>Figures</h2>")
    for name, caption in figures:
        body.append(f'<figure><img src="{e(name)}" alt="{e(caption)}">'
                    f"<figcaption>{e(caption)}</figcaption></figure>")
    css = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto}"
           "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
           "padding:2px 6px}img{max-width:100%}figcaption{color:#444;margin-bottom:2em}")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}"
                    f"</title><style>{css}</style></head><body>{''.join(body)}</body></html>")
    return path
