"""Matplotlib figures of a sweep's statistics, each written as one PNG.

Inputs are the Polars frames of universality / emergence / sections; no aggregation here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from analysis.views import OFFSET_CLASSES

# Figures are built as matplotlib.figure.Figure objects, never through pyplot: no backend
# is selected or switched, so importing this module leaves a notebook's inline figures alone.

CHI_LABEL = r"$\chi = R/\varepsilon$  (relative change per unit $\varepsilon$)"
EPS_LABEL = r"perturbation strength $\varepsilon$ (relative to $\|x_{l_p}(j)\|$)"
_DTYPE_STYLE = {"float32": "-", "float64": ":", "bfloat16": "--", "float16": "-."}


def _plain_log_y(ax: Axes) -> None:
    """Log y axis labelled with plain numbers (0.2, 1, 5), enough of them to read a value
    off: 1-2-5 per decade over a few decades, every integer multiple within about one
    decade, decades only over a wide range. A range under a factor 5 stays linear."""
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < 5:
        return
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    decades = np.log10(hi / lo)
    subs = np.arange(1.0, 10.0) if decades < 1.5 else (1.0, 2.0, 5.0) if decades < 4 else (1.0,)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize, constrained_layout: bool = False,
              **kw) -> tuple[Figure, object]:
    fig = Figure(figsize=figsize, layout="constrained" if constrained_layout else None)
    return fig, fig.subplots(nrows, ncols, **kw)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def collapse_curves(curves: pl.DataFrame, plateaus: pl.DataFrame, layers: list[int],
                    path: Path, title: str) -> Path:
    """chi vs eps for each offset class (one panel each) and a few layers: the plateau
    shaded in the layer's colour, the exact linear response as a dashed line."""
    classes = [c for c in OFFSET_CLASSES if c in set(curves["offset_class"])]
    fig, axes = _subplots(1, len(classes), figsize=(3.6 * len(classes), 3.6), squeeze=False)
    colors = colormaps['viridis'](np.linspace(0, 0.9, max(len(layers), 1)))
    for ax, cls in zip(axes[0], classes, strict=True):
        for color, layer in zip(colors, layers, strict=False):
            c = curves.filter((pl.col("offset_class") == cls) & (pl.col("l") == layer))
            fin = c.filter(pl.col("eps").is_not_null() & (pl.col("chi") > 0)).sort("eps")
            if fin.is_empty():
                continue
            ax.plot(fin["eps"], fin["chi"], "o-", ms=3, lw=1.2, color=color, label=f"l = {layer}")
            lin = c.filter(pl.col("eps").is_null())["chi"]
            if len(lin) and lin[0] > 0:
                ax.axhline(lin[0], color=color, ls="--", lw=0.9)
            p = plateaus.filter((pl.col("offset_class") == cls) & (pl.col("l") == layer))
            if len(p) and p["eps_lo"][0] is not None and p["n_plateau"][0] > 1:
                # The plateau: the same curve, drawn thick and pale over its eps range.
                on = fin.filter(pl.col("eps").is_between(p["eps_lo"][0], p["eps_hi"][0]))
                ax.plot(on["eps"], on["chi"], "-", lw=7, alpha=0.25, color=color,
                        solid_capstyle="butt")
        ax.set_xscale("log")
        _plain_log_y(ax)
        ax.tick_params(axis="y", which="both", labelsize=8)
        ax.set_title(cls.replace("_", " "))
        ax.set_xlabel(EPS_LABEL, fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel(CHI_LABEL, fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles += [Line2D([], [], color="grey", ls="--"),
                Line2D([], [], color="grey", lw=7, alpha=0.3)]
    labels += ["linear response (jvp)", "plateau (within tol of its median)"]
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8,
               bbox_to_anchor=(0.5, 1.08))
    fig.suptitle(title, y=1.14)
    return _save(fig, path)


def normalized_collapse(curves: pl.DataFrame, path: Path, title: str, tol: float) -> Path:
    """Every group's chi(eps) divided by its linear response (else its median), one panel
    per dtype: the curves collapse onto 1 inside the universal regime."""
    ref = curves.group_by("gkey").agg(
        pl.col("chi").filter(pl.col("eps").is_null()).first().alias("lin"),
        pl.col("chi").filter(pl.col("eps").is_not_null()).median().alias("med"))
    c = (curves.join(ref, on="gkey")
         .with_columns(norm=pl.col("chi") / pl.coalesce("lin", "med"))
         .filter(pl.col("eps").is_not_null() & pl.col("norm").is_finite() & (pl.col("norm") > 0)))
    dtypes = sorted(set(c["dtype"]))
    fig, axes = _subplots(1, len(dtypes), figsize=(max(7, 5 * len(dtypes)), 4.2),
                             squeeze=False, sharey=True, constrained_layout=True)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        sub = c.filter(pl.col("dtype") == dtype)
        for part in sub.sort("eps").partition_by("gkey"):
            ax.plot(part["eps"], part["norm"], color="tab:blue", lw=0.6, alpha=0.25)
        med = sub.group_by("eps").agg(pl.col("norm").median()).sort("eps")
        ax.plot(med["eps"], med["norm"], "k-o", ms=3, lw=1.5, label="median over groups")
        ax.axhspan(1 - tol, 1 + tol, color="tab:green", alpha=0.15, label=f"±{tol:.0%} of linear")
        ax.set_xscale("log")
        ax.set_ylim(0.3, 3)
        _plain_log_y(ax)
        ax.set_title(f"{dtype}  ({sub['gkey'].n_unique()} curves)")
        ax.set_xlabel(EPS_LABEL, fontsize=8)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8, loc="upper right")
    axes[0][0].set_ylabel(r"$\chi(\varepsilon) / \chi_{\mathrm{linear}}$")
    fig.suptitle(title)
    return _save(fig, path)


def chi_maps(maps: dict[tuple[str, int], pl.DataFrame], T: int, path: Path, title: str) -> Path:
    """chi(i, j) heatmaps, rows = prompt kind, columns = layer, shared log colour scale.

    One column per perturbed position j of the sweep (sparse grids stay readable); the
    induction stripe cells i = j + T - 1 and i = j + T are outlined in white."""
    kinds = sorted({k for k, _ in maps}, key=lambda k: (k != "repeat", k))
    layers = sorted({layer for _, layer in maps})
    js = sorted({j for m in maps.values() for j in m["j"].to_list()})
    col = {j: k for k, j in enumerate(js)}
    vals = np.concatenate([m["chi"].to_numpy() for m in maps.values() if len(m)] or [[]])
    pos = vals[vals > 0]
    norm = LogNorm(vmin=max(pos.min(), pos.max() * 1e-4), vmax=pos.max()) if len(pos) else None
    n = 2 * T + 1
    width = 1.2 + 0.16 * len(js)
    fig, axes = _subplots(len(kinds), len(layers),
                             figsize=(max(2.6, width) * len(layers) + 1.2, 3.4 * len(kinds)),
                             squeeze=False, constrained_layout=True)
    im = None
    for r, kind in enumerate(kinds):
        for c, layer in enumerate(layers):
            ax = axes[r][c]
            grid = np.full((n, len(js)), np.nan)
            m = maps.get((kind, layer))
            if m is not None and len(m):
                grid[m["i"].to_numpy(), [col[j] for j in m["j"].to_list()]] = m["chi"].to_numpy()
            grid[grid <= 0] = np.nan
            im = ax.imshow(grid, origin="lower", norm=norm, cmap="magma", aspect="auto",
                           interpolation="nearest")
            for k, j in enumerate(js):
                for i in (j + T - 1, j + T):
                    if 1 <= j <= T and i < n:
                        ax.add_patch(Rectangle((k - 0.5, i - 0.5), 1, 1, fill=False,
                                                   ec="white", lw=0.9))
            ax.set_title(f"{kind}, l = {layer}", fontsize=9)
            ax.set_xticks(range(len(js)), [str(j) for j in js], fontsize=7)
            ax.set_xlabel("perturbed position j", fontsize=8)
            ax.set_ylabel("response position i", fontsize=8)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label=r"$\chi_l(i; j)$ (log scale)")
    fig.suptitle(title + f"\nwhite boxes: induction stripes i = j+T-1 and i = j+T (T = {T})",
                 fontsize=10)
    return _save(fig, path)


def induction_vs_depth(scores: pl.DataFrame, path: Path, threshold: float, title: str) -> Path:
    """Induction score vs normalised depth l / L, one line per (model, dtype, lp); each
    emergence layer marked by a vertical dotted line in the line's colour."""
    fig, ax = _subplots(figsize=(7.5, 4.2))
    parts = sorted(scores.partition_by(["model", "dtype", "lp"], as_dict=True).items())
    colors = colormaps["tab10"](np.arange(max(len(parts), 1)) % 10)
    for color, ((model, dtype, lp), part) in zip(colors, parts):
        part = part.filter(pl.col("score").is_not_null() & (pl.col("score") > 0)).sort("l")
        if part.is_empty():
            continue
        em = part["emergence_layer"][0]
        label = (f"{model} {dtype} lp = {lp}: emergence "
                 + ("none" if em is None else f"l = {em}"))
        ax.plot(part["depth"], part["score"], _DTYPE_STYLE.get(dtype, "-"), marker="o", ms=3,
                color=color, label=label)
        if em is not None:
            ax.axvline(em / part["n_layers"][0], color=color, ls=":", lw=1.2)
    ax.axhline(threshold, color="grey", ls="--", lw=1, label=f"threshold = {threshold:g}")
    _plain_log_y(ax)
    ax.set_xlabel("normalised depth l / L")
    ax.set_ylabel("induction score\n(stripe chi, repeat / control)")
    ax.set_xlim(0, 1)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def chi_vs_offset(offsets: pl.DataFrame, layers: list[int], T: int, path: Path,
                  title: str) -> Path:
    """Mean chi against the offset i - j at a few layers, repeat (solid) vs control (dashed)
    prompts: induction shows as peaks of the repeat curves at i - j = T - 1 and T."""
    fig, ax = _subplots(figsize=(7.5, 4.2))
    colors = colormaps["viridis"](np.linspace(0, 0.9, max(len(layers), 1)))
    for color, layer in zip(colors, layers):
        for kind, ls in (("repeat", "-"), ("control", "--")):
            c = offsets.filter((pl.col("l") == layer) & (pl.col("prompt_kind") == kind)
                               & (pl.col("chi") > 0)).sort("delta")
            if c.is_empty():
                continue
            ax.plot(c["delta"], c["chi"], ls, marker="o" if kind == "repeat" else None, ms=3,
                    color=color, label=f"l = {layer}, {kind}")
    for x in (T - 1, T):
        ax.axvline(x, color="tab:red", lw=0.8, alpha=0.5)
    ax.text(T - 0.5, 1.0, f"i - j = T-1, T (T = {T})", transform=ax.get_xaxis_transform(),
            ha="center", va="bottom", fontsize=8, color="tab:red")
    _plain_log_y(ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("offset i - j (response position - perturbed position)")
    ax.set_ylabel(CHI_LABEL, fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=10, pad=16)
    return _save(fig, path)


def section_bars(sec: pl.DataFrame, path: Path, title: str) -> Path:
    """Per block: attention and MLP chi on the stripes (repeat prompts, solid) and at the
    same offsets on control prompts (hatched), one panel per (model, dtype)."""
    parts = sorted(sec.partition_by(["model", "dtype"], as_dict=True).items())
    fig, axes = _subplots(len(parts), 1, figsize=(10, 3.2 * len(parts)), squeeze=False)
    w = 0.2
    for ax, ((model, dtype), p) in zip(axes[:, 0], parts, strict=True):
        p = p.sort("l")
        x = p["l"].to_numpy().astype(float)
        for k, (col, color, hatch, label) in enumerate([
            ("attn_stripe", "tab:blue", None, "attention, repeat (stripes)"),
            ("attn_control", "tab:blue", "//", "attention, control"),
            ("mlp_stripe", "tab:orange", None, "MLP, repeat (stripes)"),
            ("mlp_control", "tab:orange", "//", "MLP, control"),
        ]):
            y = p[col].fill_null(np.nan).to_numpy()
            ax.bar(x + (k - 1.5) * w, y, w, color=color, alpha=1.0 if hatch is None else 0.35,
                   hatch=hatch, label=label, edgecolor=color if hatch else None)
        for col, color, name in [("first_attn_block", "tab:blue", "first attention block"),
                                 ("first_mlp_block", "tab:orange", "first MLP block")]:
            b = p[col][0]
            if b is not None:
                ax.axvline(b, color=color, ls=":", lw=1.2, label=f"{name}: {b}")
        _plain_log_y(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("block l (its output enters the residual stream at level l + 1)")
        ax.set_ylabel(r"section $\chi$ (‖Δ out‖ / ‖x_l‖ / ε)", fontsize=8)
        ax.set_title(f"{model} {dtype}", fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.25)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
