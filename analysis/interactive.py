"""Plotly versions of the report's figures: HTML divs with hover values, no network needed.

The page embeds plotly.js once (`plotly_js`); each figure here is a div that uses it. Inputs
are the same Polars frames the PNGs are drawn from; nothing is aggregated here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl

if TYPE_CHECKING:  # plotly loads when a figure is drawn, not when analysis.api is imported
    import plotly.graph_objects as go

_HEIGHT = 420
_CONFIG = {"responsive": True, "displaylogo": False, "toImageButtonOptions": {"format": "svg"}}
_DASH = {"float32": "solid", "float64": "dot", "bfloat16": "dash", "float16": "dashdot"}


def plotly_js() -> str:
    """plotly.js itself, to inline once in a <script> element of the page."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _div(fig: go.Figure, div_id: str) -> str:
    # Log axes: ticks at 1, 2, 5 of each decade, numbers as 1e-05 rather than SI prefixes.
    fig.update_xaxes(exponentformat="e")
    fig.update_yaxes(exponentformat="e")
    for axis in (fig.layout.xaxis, fig.layout.yaxis):
        if axis.type == "log":
            axis.dtick = "D2"
    fig.update_layout(height=_HEIGHT, margin={"l": 60, "r": 10, "t": 40, "b": 50},
                      legend={"orientation": "h", "y": -0.25, "font": {"size": 10}},
                      template="plotly_white", autosize=True)
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config=_CONFIG, default_width="100%", default_height=f"{_HEIGHT}px")


def induction_vs_depth(scores: pl.DataFrame, threshold: float, div_id: str) -> str:
    """Induction score vs depth l / L per (model, dtype, lp); hover: layer, score, chi."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for (model, dtype, lp), part in sorted(scores.partition_by(["model", "dtype", "lp"],
                                                               as_dict=True).items()):
        part = part.filter(pl.col("score").is_not_null() & (pl.col("score") > 0)).sort("l")
        if part.is_empty():
            continue
        em = part["emergence_layer"][0]
        fig.add_trace(go.Scatter(
            x=part["depth"].to_list(), y=part["score"].to_list(), mode="lines+markers",
            name=f"{model} {dtype} lp={lp} (emergence {'none' if em is None else f'l={em}'})",
            line={"dash": _DASH.get(dtype, "solid")},
            customdata=list(zip(part["l"].to_list(), part["stripe_chi"].to_list(),
                                part["control_chi"].to_list())),
            hovertemplate=("l = %{customdata[0]} (depth %{x:.3f})<br>score %{y:.3f}<br>"
                           "stripe chi %{customdata[1]:.4g}, control chi %{customdata[2]:.4g}"
                           "<extra>%{fullData.name}</extra>")))
    fig.add_trace(go.Scatter(x=[0, 1], y=[threshold, threshold], mode="lines",
                             name=f"threshold {threshold:g}", hoverinfo="skip",
                             line={"dash": "dash", "color": "grey"}))
    fig.update_xaxes(title="normalised depth l / L", range=[0, 1])
    fig.update_yaxes(title="induction score (repeat / control)", type="log")
    return _div(fig, div_id)


def chi_vs_offset(offsets: pl.DataFrame, layers: list[int], T: int, div_id: str) -> str:
    """chi against i - j at the chosen layers, repeat vs control; hover: offset, chi, rows."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for layer in layers:
        for kind, dash in (("repeat", "solid"), ("control", "dash")):
            c = offsets.filter((pl.col("l") == layer) & (pl.col("prompt_kind") == kind)
                               & (pl.col("chi") > 0)).sort("delta")
            if c.is_empty():
                continue
            fig.add_trace(go.Scatter(
                x=c["delta"].to_list(), y=c["chi"].to_list(), mode="lines+markers",
                name=f"l = {layer}, {kind}", line={"dash": dash},
                customdata=c["n"].to_list(),
                hovertemplate="i - j = %{x}<br>chi %{y:.4g}<br>%{customdata} rows"
                              "<extra>%{fullData.name}</extra>"))
    for x in (T - 1, T):
        fig.add_vline(x=x, line_color="red", opacity=0.4)
    fig.update_xaxes(title=f"offset i - j (stripes at T-1 = {T - 1} and T = {T})")
    fig.update_yaxes(title="chi = R / eps", type="log")
    return _div(fig, div_id)


def section_bars(sec: pl.DataFrame, div_id: str) -> str:
    """Per block: attention and MLP chi on the stripes (repeat) and on control prompts."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for col, name, color, opacity in (("attn_stripe", "attention, repeat", "#1f77b4", 1.0),
                                      ("attn_control", "attention, control", "#1f77b4", 0.35),
                                      ("mlp_stripe", "MLP, repeat", "#ff7f0e", 1.0),
                                      ("mlp_control", "MLP, control", "#ff7f0e", 0.35)):
        for (model, dtype), p in sorted(sec.partition_by(["model", "dtype"],
                                                         as_dict=True).items()):
            p = p.sort("l")
            fig.add_trace(go.Bar(
                x=p["l"].to_list(), y=p[col].to_list(), name=f"{model} {dtype}: {name}",
                marker={"color": color, "opacity": opacity},
                hovertemplate="block %{x}<br>chi %{y:.4g}<extra>%{fullData.name}</extra>"))
    for col, color in (("first_attn_block", "#1f77b4"), ("first_mlp_block", "#ff7f0e")):
        for b in sec[col].drop_nulls().unique().to_list():
            fig.add_vline(x=b, line_dash="dot", line_color=color)
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="block l (output enters the stream at level l + 1)")
    fig.update_yaxes(title="section chi", type="log")
    return _div(fig, div_id)


def chi_vs_eps(curves: pl.DataFrame, layers: list[int], div_id: str) -> str:
    """chi against eps per (offset class, layer); the linear response is the hover note."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for (cls, layer), c in sorted(curves.filter(pl.col("l").is_in(layers))
                                  .partition_by(["offset_class", "l"], as_dict=True).items()):
        fin = c.filter(pl.col("eps").is_not_null() & (pl.col("chi") > 0)).sort("eps")
        if fin.is_empty():
            continue
        lin = c.filter(pl.col("eps").is_null())["chi"]
        lin_txt = f"{lin[0]:.4g}" if len(lin) else "n/a"
        fig.add_trace(go.Scatter(
            x=fin["eps"].to_list(), y=fin["chi"].to_list(), mode="lines+markers",
            name=f"{cls}, l = {layer}",
            hovertemplate=f"eps %{{x:.3g}}<br>chi %{{y:.5g}}<br>linear {lin_txt}"
                          "<extra>%{fullData.name}</extra>"))
    fig.update_xaxes(title="eps", type="log")
    fig.update_yaxes(title="chi = R / eps", type="log")
    return _div(fig, div_id)
