"""`unisweep report`: one folder whose page answers, top to bottom, is there a universal regime
and is there induction (where it emerges, how strong, which sections carry it).

Statistics are computed once (`ReportContext`); each part of the page is one function in
`SECTIONS` returning a `Section`, drawn by one block of templates/report.html.j2. A new part
(per-head results, say) is one more function appended to `SECTIONS`.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from analysis import interactive, plots
from analysis.emergence import chi_by_offset, chi_map, emergence, induction_scores
from analysis.heads import report_parts as head_report_parts
from analysis.sections import sections
from analysis.source import SweepData
from analysis.universality import GROUP, chi_curves, universality
from tasks.errors import InvalidInput
from tasks.known_models import describe_model

# chi(i, j) maps need positions: with fewer perturbed j in copy 1 than this (or than T / 2)
# they show isolated columns, and chi against i - j shows the stripes instead.
MIN_MAP_POSITIONS = 6


@dataclass
class FigureOut:
    """One figure: a PNG file, its caption, and optionally an interactive Plotly div."""

    png: str
    caption: str
    interactive: str | None = None


@dataclass
class TableOut:
    """One table in the page; the full data is linked as CSV and Parquet files."""

    caption: str
    frame: pl.DataFrame
    files: list[str] = field(default_factory=list)


@dataclass
class Section:
    key: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[TableOut] = field(default_factory=list)
    figures: list[FigureOut] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class ReportContext:
    """Everything the sections read, computed once."""

    data: SweepData
    out: Path
    tol: float
    threshold: float
    min_layers: int
    layers: Sequence[int] | None
    uni: pl.DataFrame
    curves: pl.DataFrame
    scores: pl.DataFrame  # every eps
    eps_sel: float | None  # the figures' eps (None: linear response)
    eps_txt: str
    em: pl.DataFrame  # at eps_sel
    sec: pl.DataFrame  # at eps_sel
    offsets: pl.DataFrame  # chi by i - j at eps_sel
    files: list[str] = field(default_factory=list)  # data files written, for the last section

    @property
    def sel(self) -> pl.Expr:
        return pl.col("eps").is_null() if self.eps_sel is None else pl.col("eps") == self.eps_sel

    def model_dtypes(self) -> list[tuple[str, str]]:
        return sorted(self.curves.select("model", "dtype").unique().iter_rows())

    def lowest_lp(self, model: str, dtype: str) -> int:
        return int(self.curves.filter((pl.col("model") == model) & (pl.col("dtype") == dtype))
                   ["lp"].min())

    def chosen_layers(self, model: str, dtype: str, lp: int) -> list[int]:
        n_layers = int(self.curves.filter(pl.col("model") == model)["n_layers"][0])
        if self.layers:
            chosen = sorted(set(self.layers))
            bad = [x for x in chosen if not lp <= x <= n_layers]
            if bad:
                raise InvalidInput("layers", f"levels in {lp}..{n_layers} for {model}", bad)
            return chosen
        e = self.em.filter((pl.col("model") == model) & (pl.col("dtype") == dtype)
                           & (pl.col("lp") == lp))
        picks = {round(q * n_layers) for q in (0.25, 0.75, 1.0)}
        for col in ("emergence_layer", "peak_layer"):
            v = e[col][0] if len(e) else None
            picks.add(v if v is not None else round(0.5 * n_layers))
        return sorted({max(lp, min(n_layers, p)) for p in picks})

    def write_table(self, frame: pl.DataFrame, stem: str) -> list[str]:
        """The full table as CSV and Parquet beside the page; returns the file names."""
        frame.write_csv(self.out / f"{stem}.csv")
        frame.write_parquet(self.out / f"{stem}.parquet", compression="zstd")
        names = [f"{stem}.csv", f"{stem}.parquet"]
        self.files += names
        return names


def _slug(*parts: object) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(str(p) for p in parts)).strip("-")


def _pick_eps(curves: pl.DataFrame) -> float | None:
    """The linear response when the sweep has it, else the middle swept eps."""
    if curves["eps"].null_count():
        return None
    eps = sorted(set(curves["eps"].to_list()))
    return eps[len(eps) // 2]


def _g(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _who(model: str, dtype: str) -> str:
    return describe_model(model, dtype)


# ---- the sections, top to bottom ----------------------------------------------------------

def summary_section(ctx: ReportContext) -> Section:
    """The findings in words, from the numbers below."""
    s = Section("summary", "Summary")
    for model, dtype in ctx.model_dtypes():
        s.paragraphs.append(f"<b>{html.escape(_who(model, dtype))}</b>")
        s.paragraphs += [p for p in (_universal_sentence(ctx, model, dtype),
                                     _induction_sentence(ctx, model, dtype),
                                     _sections_sentence(ctx, model, dtype)) if p]
    return s


def _universal_sentence(ctx: ReportContext, model: str, dtype: str) -> str:
    u = ctx.uni.filter((pl.col("model") == model) & (pl.col("dtype") == dtype)
                       & (pl.col("chi_plateau") > 0) & (pl.col("l") > pl.col("lp")))
    if u.is_empty():
        return "<i>Universal regime:</i> no response to measure (no layer after lp)."
    wide = u.filter(pl.col("decades") >= 1.0)
    share = len(wide) / len(u)
    lin = u["linear_rel_err"].abs().drop_nulls()
    lin_txt = (f" The plateau value agrees with the exact linear response (jvp) within "
               f"{100 * lin.median():.2g}% (median; worst {100 * lin.max():.2g}%)."
               if len(lin) else "")
    if not len(wide):
        return (f"<i>Universal regime: not found.</i> No group's chi stays within "
                f"{ctx.tol:.0%} of a plateau over a decade of eps.{lin_txt}")
    return (f"<i>Universal regime: yes</i> in {share:.0%} of {len(u)} groups (lp, l, offset "
            f"class, prompt kind): chi stays within {ctx.tol:.0%} of its plateau over at least "
            f"one decade of eps, typically from eps = {_g(wide['eps_lo'].median(), 2)} (the "
            f"{dtype} precision floor) to {_g(wide['eps_hi'].median(), 2)} (nonlinear onset), "
            f"{wide['decades'].median():.1f} decades (median).{lin_txt}")


def _induction_sentence(ctx: ReportContext, model: str, dtype: str) -> str:
    e = ctx.em.filter((pl.col("model") == model) & (pl.col("dtype") == dtype)).sort("lp")
    parts = []
    for r in e.iter_rows(named=True):
        where = f"perturbed at lp = {r['lp']}"
        peak = (f"it peaks at {r['peak_score']:.2f} at layer {r['peak_layer']} "
                f"(depth {r['peak_depth']:.2f})" if r["peak_score"] is not None else "")
        half = (f", half of its rise by depth {r['half_rise_depth']:.2f}"
                if r["half_rise_depth"] is not None else "")
        if r["emergence_status"] == "sustained":
            parts.append(f"{where}, the induction score exceeds {ctx.threshold:g} from layer "
                         f"{r['emergence_layer']} (depth {r['emergence_depth']:.2f}) for "
                         f"{r['run_length']} layers; {peak}{half}.")
        elif r["emergence_status"] == "transient":
            parts.append(f"{where}, the score exceeds {ctx.threshold:g} only briefly (from "
                         f"layer {r['emergence_layer']} for {r['run_length']} layer(s), fewer "
                         f"than {ctx.min_layers}); {peak}.")
        else:
            parts.append(f"{where}, the score never exceeds {ctx.threshold:g}; {peak}.")
    if not parts:
        return "<i>Induction:</i> no stripe data (positions j in copy 1 needed)."
    found = (e["emergence_status"] == "sustained").any()
    head = "<i>Induction: yes.</i>" if found else "<i>Induction: not established.</i>"
    return head + " " + " ".join(p[0].upper() + p[1:] for p in parts)


def _sections_sentence(ctx: ReportContext, model: str, dtype: str) -> str:
    lp = ctx.lowest_lp(model, dtype)
    s = ctx.sec.filter((pl.col("model") == model) & (pl.col("dtype") == dtype)
                       & (pl.col("lp") == lp))
    if s.is_empty():
        return ""
    a, m = s["first_attn_block"][0], s["first_mlp_block"][0]
    share = s["attn_share"].drop_nulls()
    blocks = []
    blocks.append(f"attention outputs from block {a}" if a is not None
                  else "no attention output")
    blocks.append(f"MLP outputs from block {m}" if m is not None else "no MLP output")
    return (f"<i>Sections</i> (lp = {lp}): the stripe change exceeds {ctx.threshold:g} x the "
            f"control in {' and '.join(blocks)}; attention carries "
            f"{share.mean():.0%} of the stripe change on average over blocks.")


def universal_section(ctx: ReportContext) -> Section:
    """Is there a universal regime, and where (per dtype)?"""
    s = Section("universality", "Is there a universal regime?")
    if ctx.curves["eps"].null_count() == len(ctx.curves):
        s.paragraphs.append("This sweep holds the exact linear response only (eps: []): no eps "
                            "was swept, so there is no plateau to find.")
        return s
    s.paragraphs.append(
        f"chi = R / eps per group (model, dtype, T, prompt kind, lp, l, offset class). The "
        f"plateau is the longest run of swept eps where chi stays within {ctx.tol:.0%} of "
        f"the run's median; eps_lo is its lower edge (the dtype's precision floor), eps_hi "
        f"its upper edge (nonlinear onset). Medians over the layers l > lp and every lp.")
    summary = (ctx.uni.filter((pl.col("chi_plateau") > 0) & (pl.col("l") > pl.col("lp")))
               .group_by("model", "dtype", "offset_class")
               .agg(pl.len().alias("groups"),
                    pl.col("decades").median().alias("decades"),
                    pl.col("eps_lo").median().alias("eps_lo"),
                    pl.col("eps_hi").median().alias("eps_hi"),
                    pl.col("linear_rel_err").abs().median().alias("lin_err"),
                    pl.col("collapse").mean().alias("collapse"))
               .sort("model", "dtype", "offset_class"))
    s.tables.append(TableOut(
        "Plateau per offset class (medians; lin_err = |plateau / linear response - 1|; "
        "collapse = share of map points that coincide across the plateau)", summary,
        ctx.write_table(ctx.uni, "universality")))
    for model, dtype in ctx.model_dtypes():
        lp = ctx.lowest_lp(model, dtype)
        chosen = ctx.chosen_layers(model, dtype, lp)
        pick = ((pl.col("model") == model) & (pl.col("dtype") == dtype)
                & (pl.col("prompt_kind") == "repeat") & (pl.col("lp") == lp))
        cur = ctx.curves.filter(pick)
        name = f"collapse_{_slug(model, dtype)}.png"
        plots.collapse_curves(cur, ctx.uni.filter(pick), chosen, ctx.out / name,
                              f"{model} {dtype}: chi vs eps, repeat prompts, lp = {lp}")
        s.figures.append(FigureOut(
            name, f"chi against eps for {_who(model, dtype)} (lp = {lp}, repeat prompts), one "
                  f"panel per offset class, at layers {chosen}: the plateau drawn thick and "
                  f"pale over its eps range (within {ctx.tol:.0%}), the exact linear response "
                  "as a dashed line. Hover the interactive version for values.",
            interactive.chi_vs_eps(cur, chosen, f"fig-eps-{_slug(model, dtype)}")))
    for model in sorted({m for m, _ in ctx.model_dtypes()}):
        cur = ctx.curves.filter(pl.col("model") == model)
        name = f"collapse_normalized_{_slug(model)}.png"
        plots.normalized_collapse(cur, ctx.out / name, f"{model}: every (lp, l, offset, prompt "
                                  "kind) curve over its linear response", ctx.tol)
        s.figures.append(FigureOut(
            name, f"Collapse for {describe_model(model)}: chi(eps) / chi_linear for every group, "
                  f"one panel per dtype; the green band is ±{ctx.tol:.0%}. Where the curves "
                  "leave it at small eps is the dtype's precision floor; at large eps, the "
                  "nonlinear onset."))
    return s


def induction_section(ctx: ReportContext) -> Section:
    """Is there induction: where does it emerge, how strong?"""
    s = Section("induction", "Is there induction?")
    s.paragraphs.append(
        f"Induction score at layer l: mean chi on the stripes i - j = T-1 and T (j in copy 1) "
        f"of repeat prompts over the same on control prompts; 1 means no difference. "
        f"Emergence: the first layer of the first run of at least {ctx.min_layers} consecutive "
        f"layers with score above {ctx.threshold:g} (transient: above, but never that long; "
        f"none: never above). Half rise: the first layer where the score has made half its "
        f"rise from 1 to the peak. Figures use the {ctx.eps_txt}.")
    tab = ctx.em.select("model", "dtype", "T", "lp", "n_layers",
                        pl.col("emergence_layer").alias("emerges_l"),
                        pl.col("emergence_depth").alias("depth"),
                        pl.col("emergence_status").alias("status"),
                        pl.col("run_length").alias("run"),
                        pl.col("peak_score").alias("peak"),
                        pl.col("peak_layer").alias("peak_l"),
                        pl.col("half_rise_depth").alias("half_rise"))
    ctx.write_table(ctx.scores, "induction_scores")
    s.tables.append(TableOut("Emergence of induction per perturbed layer lp", tab,
                             ctx.write_table(ctx.em, "emergence")))
    sel = ctx.scores.filter(ctx.sel)
    plots.induction_vs_depth(sel, ctx.out / "induction_depth.png", ctx.threshold,
                             f"Induction score vs depth ({ctx.eps_txt})")
    drawn = sel.filter(pl.col("emergence_layer").is_not_null()).height > 0
    s.figures.append(FigureOut(
        "induction_depth.png",
        "Induction score against normalised depth l / L, one line per model, dtype and lp; "
        f"dashed grey: threshold {ctx.threshold:g}"
        + ("; dotted verticals: each line's emergence layer." if drawn else
           "; no line has an emergence layer, so no dotted verticals are drawn."),
        interactive.induction_vs_depth(sel, ctx.threshold, "fig-induction-depth")))
    ctx.write_table(ctx.offsets, "chi_by_offset")
    for model, dtype in ctx.model_dtypes():
        lp = ctx.lowest_lp(model, dtype)
        chosen = ctx.chosen_layers(model, dtype, lp)
        off = ctx.offsets.filter((pl.col("model") == model) & (pl.col("dtype") == dtype)
                                 & (pl.col("lp") == lp))
        T = int(off["T"][0]) if len(off) else int(ctx.curves["T"][0])
        name = f"chi_offset_{_slug(model, dtype)}.png"
        plots.chi_vs_offset(off, chosen, T, ctx.out / name,
                            f"{model} {dtype}, lp = {lp}: chi against i - j ({ctx.eps_txt})")
        s.figures.append(FigureOut(
            name, f"chi against the offset i - j for {_who(model, dtype)}, lp = {lp}, mean "
                  f"over the perturbed positions j in copy 1, at layers {chosen}: repeat "
                  f"prompts solid, control dashed; red lines at T-1 = {T - 1} and T = {T}, "
                  "where induction puts its stripes.",
            interactive.chi_vs_offset(off, chosen, T, f"fig-offset-{_slug(model, dtype)}")))
        js = ctx.data.sql(
            f"SELECT count(DISTINCT j) FROM responses WHERE model = '{model}' AND dtype = "
            f"'{dtype}' AND lp = {lp} AND j BETWEEN 1 AND T").fetchall()[0][0]
        if js >= max(MIN_MAP_POSITIONS, T // 2):
            maps = {(kind, layer): chi_map(ctx.data, layer, model=model, dtype=dtype, lp=lp,
                                           prompt_kind=kind, eps=ctx.eps_sel)
                    for kind in ("repeat", "control") for layer in chosen}
            name = f"chi_map_{_slug(model, dtype)}.png"
            plots.chi_maps(maps, T, ctx.out / name, f"{model} {dtype}, lp = {lp}, {ctx.eps_txt}")
            s.figures.append(FigureOut(
                name, f"chi(i, j) maps of {_who(model, dtype)} at layers {chosen}, repeat vs "
                      f"control prompts; white boxes: the stripe cells i = j+T-1, j+T."))
        else:
            s.notes.append(f"No chi(i, j) map for {model} {dtype}: only {js} perturbed "
                           f"position(s) in copy 1 (a map needs {max(MIN_MAP_POSITIONS, T // 2)}"
                           "); chi against i - j above shows the stripes instead.")
    return s


def sections_section(ctx: ReportContext) -> Section:
    """Which sections (attention, MLP of which blocks) carry the stripes?"""
    s = Section("sections", "Which sections carry it?")
    s.paragraphs.append(
        "Per block: the change of its attention output and of its MLP output on the stripes, "
        "relative to ||x_l|| and per unit eps, on repeat prompts and at the same offsets on "
        "control prompts. First block: where the block's repeat / control ratio emerges by "
        f"the same rule (above {ctx.threshold:g} for {ctx.min_layers} consecutive blocks).")
    if ctx.sec.is_empty():
        s.notes.append("The sweep recorded no section responses (r_attn, r_mlp).")
        return s
    tab = (ctx.sec.group_by("model", "dtype", "T", "lp")
           .agg(pl.col("first_attn_block").first().alias("first_attn"),
                pl.col("first_mlp_block").first().alias("first_mlp"),
                pl.col("l").get(pl.col("attn_score").fill_null(0).arg_max())
                .alias("top_attn_block"),
                pl.col("attn_score").max().alias("top_attn_score"),
                pl.col("l").get(pl.col("mlp_score").fill_null(0).arg_max())
                .alias("top_mlp_block"),
                pl.col("mlp_score").max().alias("top_mlp_score"),
                pl.col("attn_share").mean().alias("attn_share"))
           .sort("model", "dtype", "lp"))
    s.tables.append(TableOut("Sections per perturbed layer lp (attn_share: attention's share of "
                             "the stripe change, mean over blocks)", tab,
                             ctx.write_table(ctx.sec, "sections")))
    low = [(m, d, ctx.lowest_lp(m, d)) for m, d in ctx.model_dtypes()]
    fig_sec = pl.concat([ctx.sec.filter((pl.col("model") == m) & (pl.col("dtype") == d)
                                        & (pl.col("lp") == lp)) for m, d, lp in low])
    if fig_sec.is_empty():
        return s
    plots.section_bars(fig_sec, ctx.out / "sections.png",
                       f"Attention vs MLP on the induction stripes ({ctx.eps_txt}, lowest lp)")
    drawn = fig_sec.select(pl.col("first_attn_block").is_not_null().any()
                           | pl.col("first_mlp_block").is_not_null().any()).item()
    s.figures.append(FigureOut(
        "sections.png",
        "Per block (lowest lp): attention (blue) and MLP (orange) output change on the stripes "
        "of repeat prompts (solid) and at the same offsets on control prompts (hatched)"
        + ("; dotted verticals: the first attention / MLP blocks that carry the stripe."
           if drawn else "; no block carries the stripe by the rule, so no verticals."),
        interactive.section_bars(fig_sec, "fig-sections")))
    return s


def heads_section(ctx: ReportContext) -> Section | None:
    """Which heads carry the stripes? Only for sweeps that recorded heads (record.heads)."""
    parts = head_report_parts(ctx.data, ctx.out, ctx.eps_sel, ctx.threshold, ctx.min_layers)
    if parts is None:
        return None
    scores, agree, figures = parts
    s = Section("heads", "Which heads carry it?")
    s.paragraphs.append(
        "Per attention head: the response-based induction score (the head's output change on "
        "the stripes of repeat prompts over the same offsets of control prompts) and "
        "previous-token score (its change at i - j = 1 over its change at i = j), beside the "
        "classic attention-pattern scores of the same prompts' clean forward (mean weight from "
        "i to i - T + 1, and to i - 1). Spearman rank correlation over all heads; top heads "
        f"by each ({ctx.eps_txt}).")
    shown = agree.select("model", "dtype", "lp", "heads", "induction_spearman",
                         "prev_spearman", "top_by_response", "top_by_pattern", "top_overlap",
                         "emergence_layer")  # narrow enough for the page
    s.tables.append(TableOut("Response vs attention pattern, per perturbed layer lp", shown,
                             ctx.write_table(scores, "heads")))
    s.figures += [FigureOut(png, caption) for png, caption in figures]
    return s


def data_section(ctx: ReportContext) -> Section:
    """Links to every table written, for use outside the page."""
    s = Section("data", "Data")
    s.paragraphs.append("Full tables behind this page (CSV for a spreadsheet, Parquet for "
                        "Polars / pandas / DuckDB); eps empty or null marks the linear response.")
    return s


SECTIONS: list[Callable[[ReportContext], Section | None]] = [
    universal_section, induction_section, sections_section, heads_section, data_section]


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
    uni = universality(data, tol)
    curves = chi_curves(data).with_columns(gkey=pl.concat_str(GROUP, separator="|"))
    eps_sel = _pick_eps(curves)
    eps_txt = ("linear response (eps -> 0, jvp)" if eps_sel is None
               else f"eps = {eps_sel:.3g}")
    scores = induction_scores(data, threshold, min_layers)
    sel = pl.col("eps").is_null() if eps_sel is None else pl.col("eps") == eps_sel
    ctx = ReportContext(
        data=data, out=out, tol=tol, threshold=threshold, min_layers=min_layers, layers=layers,
        uni=uni, curves=curves, scores=scores, eps_sel=eps_sel, eps_txt=eps_txt,
        em=emergence(data, threshold, min_layers).filter(sel),
        sec=sections(data, threshold, min_layers).filter(sel),
        offsets=chi_by_offset(data, eps=eps_sel))
    for model, dtype in ctx.model_dtypes():  # bad --layers: refused before anything is written
        ctx.chosen_layers(model, dtype, ctx.lowest_lp(model, dtype))
    out.mkdir(parents=True, exist_ok=True)
    parts = [p for p in [summary_section(ctx)] + [build(ctx) for build in SECTIONS] if p]
    models = "; ".join(_who(m, d) for m, d in ctx.model_dtypes())
    title = f"unisweep report: {data.sweep or 'sweep'}"
    meta = (f"{models}. {n_rows:,} response rows from {len(data.shard_paths)} shards; "
            f"plateau tolerance {tol:.0%}; induction threshold {threshold:g} for "
            f"{min_layers} layers; figures at the {eps_txt}; written "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.")
    _write_markdown(out / "report.md", title, meta, parts, ctx.files)
    return _write_html(out / "index.html", title, meta, parts, ctx.files)


def _fmt(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.col(pl.Float64, pl.Float32).round_sig_figs(3))


def _cell(v: object) -> str:
    return "" if v is None else str(v)


def _write_markdown(path: Path, title: str, meta: str, parts: list[Section],
                    files: list[str]) -> None:
    strip = re.compile(r"</?(b|i)>")
    lines = [f"# {title}", "", meta, ""]
    for sec in parts:
        lines += [f"## {sec.title}", ""]
        for p in sec.paragraphs:
            lines += [strip.sub(lambda m: "**" if m.group(1) == "b" else "*", p), ""]
        for t in sec.tables:
            d = _fmt(t.frame)
            lines += [t.caption + (" (" + ", ".join(f"[{f}]({f})" for f in t.files) + ")"
                                   if t.files else ""), "",
                      "| " + " | ".join(d.columns) + " |", "|" + "---|" * len(d.columns)]
            lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in d.iter_rows()]
            lines.append("")
        for f in sec.figures:
            lines += [f"![{f.caption}]({f.png})", "", f.caption, ""]
        lines += [f"*{n}*\n" for n in sec.notes]
        if sec.key == "data":
            lines += [f"- [{name}]({name})" for name in files] + [""]
    path.write_text("\n".join(lines))


def _write_html(path: Path, title: str, meta: str, parts: list[Section],
                files: list[str]) -> Path:
    from jinja2 import Environment, PackageLoader, select_autoescape
    from markupsafe import Markup

    env = Environment(loader=PackageLoader("analysis", "templates"),
                      autoescape=select_autoescape(["html", "j2"]), trim_blocks=True,
                      lstrip_blocks=True)
    html = env.get_template("report.html.j2").render(
        title=title, meta=meta, sections=parts, files=files, fmt=lambda t: _fmt(t.frame),
        cell=_cell,
        # Our own text: paragraphs carry <b>/<i> only; Plotly divs are generated markup.
        markup=Markup, plotly_js=Markup(interactive.plotly_js()))
    path.write_text(html)
    return path
