"""Where a Hugging Face causal LM keeps its blocks, sections, final norm and head: discovered.

`adapter_for(model)` reads the loaded module tree and config (the decoder from
`get_decoder()`, the block list from `_no_split_modules`, each block's attention and MLP
children) and runs one probe forward on a few tokens to settle what names cannot: which
module's output the block adds to the residual stream (Gemma's and OLMo-2's post-norms),
whether attention and MLP read the same input (parallel blocks), which norm runs last.
The table EXCEPTIONS is only for models discovery gets wrong; the start-up check
(tasks.check) proves every discovered layout against HF's own forward.

The engine uses an Adapter through: base, block_list, n_layers, final_norm_module,
attn_module, mlp_module, section_output, passthrough and logits. Per-head work uses
attn_proj_module (whose input is the heads' outputs concatenated, [..., n_heads * head_dim]),
n_heads and head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tasks.errors import UnisweepError

# Child names / class-name fragments that mark a block's attention and MLP modules.
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")
_MLP_CLASS_MARKS = ("mlp", "moe", "expert", "feedforward")
# Children of an attention module that are its output projection, by family.
_PROJ_NAMES = ("o_proj", "c_proj", "dense", "out_proj", "wo")

# Per-model_type overrides of discovered fields, for models discovery gets wrong. Keys are
# Adapter fields (paths relative to the decoder or to a block, as in Adapter), or "attn" /
# "mlp": the block's attention / MLP module when its class name does not say so. To add one:
# put {model_type: {field: value}} here, add a tiny config of the family to tasks/tiny.py
# and run tests/test_families.py; the start-up check then guards real checkpoints.
# (None needed for the families in tasks/tiny.py. OPT, whose MLP is inline fc1/fc2 on rows
# flattened to [batch * seq, d], is refused: a section must keep the [batch, seq, d] layout.)
EXCEPTIONS: dict[str, dict[str, Any]] = {}


class UnsupportedArchitecture(UnisweepError):
    pass


@dataclass(frozen=True)
class Adapter:
    """Attribute paths and constants of one loaded HF causal LM.

    attn_out / mlp_out name the module (relative to a block) whose output is exactly what
    the block adds to the residual stream, up to residual_scale: for Gemma-2/3 and OLMo-2
    that is the post-norm, not the raw attention output. x_{l+1} = x_l + residual_scale *
    (attn + mlp) holds for every block, sequential or parallel.
    """

    family: str  # config.model_type
    decoder: str  # the base model inside the *ForCausalLM ("" when the model is the decoder)
    blocks: str  # ModuleList of decoder blocks, relative to the base model
    final_norm: str  # relative to the base model; its input is resid_final (x_L)
    attn_out: str
    mlp_out: str
    attn_proj: str | None  # attention's output projection relative to a block, if found
    n_heads: int
    head_dim: int
    parallel: bool  # attention and MLP read the same block input (GPT-NeoX, Falcon, Phi, ...)
    residual_scale: float = 1.0  # Granite's residual_multiplier
    block_tuple_len: int = 0  # blocks return a tuple of this length (Falcon, GPT-J); 0: a tensor
    logit_multiplier: float = 1.0  # Cohere's logit_scale; 1 / Granite's logits_scaling
    logit_softcap: float | None = None  # Gemma-2's final_logit_softcapping

    def base(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.decoder)

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return self.base(model).get_submodule(self.blocks)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.block_list(model))

    def final_norm_module(self, model: nn.Module) -> nn.Module:
        return self.base(model).get_submodule(self.final_norm)

    def attn_module(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.attn_out)

    def mlp_module(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.mlp_out)

    def attn_proj_module(self, block: nn.Module) -> nn.Module:
        if self.attn_proj is None:
            raise UnsupportedArchitecture(
                f"no attention output projection found for {self.family!r}: add "
                f"'attn_proj' to EXCEPTIONS[{self.family!r}] in tasks/adapters.py")
        return block.get_submodule(self.attn_proj)

    def section_output(self, out) -> torch.Tensor:
        """What the block adds to the residual stream, from a section module's output."""
        h = out[0] if isinstance(out, tuple) else out
        return h if self.residual_scale == 1.0 else h * self.residual_scale

    def passthrough(self, hidden_states, *args, **kwargs):
        """A block's forward that changes nothing, returning what the decoder loop expects."""
        if self.block_tuple_len:
            return (hidden_states,) + (None,) * (self.block_tuple_len - 1)
        return hidden_states

    def logits(self, model: nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the final-normed hidden state, as the HF head computes them."""
        logits = model.get_output_embeddings()(normed)
        if self.logit_multiplier != 1.0:
            logits = logits * self.logit_multiplier
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def describe(self) -> str:
        kind = "parallel" if self.parallel else "sequential"
        return (f"{self.family}: {self.decoder or '<model>'}.{self.blocks}[l] ({kind}), attn "
                f"{self.attn_out}, mlp {self.mlp_out}, final norm {self.final_norm}")


# ---------------------------------------------------------------------------------------------
# Discovery.


def _refuse(model: nn.Module, what: str, detail: str) -> UnsupportedArchitecture:
    model_type = getattr(model.config, "model_type", "?")
    return UnsupportedArchitecture(
        f"unsupported architecture {model_type!r} ({type(model).__name__}): {what} not found "
        f"({detail}). To add it, put an entry EXCEPTIONS[{model_type!r}] = {{field: path}} in "
        "tasks/adapters.py (fields: decoder, blocks, final_norm, attn, mlp, attn_out, mlp_out, "
        "attn_proj), "
        "add a tiny config to tasks/tiny.py and run tests/test_families.py.")


def _path_of(root: nn.Module, target: nn.Module) -> str | None:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    return None


def _n_layers(config) -> int | None:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(cfg, "num_hidden_layers", None)
    return int(n) if n is not None else None


def _find_decoder(model: nn.Module) -> str:
    get = getattr(model, "get_decoder", None)
    dec = None
    try:
        dec = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        dec = None
    if dec is None or dec is model:
        dec = getattr(model, "base_model", None)
    path = _path_of(model, dec) if isinstance(dec, nn.Module) else None
    if path is None:
        raise _refuse(model, "the decoder (base model)", "get_decoder() and base_model give none")
    return path


def _find_blocks(model: nn.Module, base: nn.Module) -> str:
    n = _n_layers(model.config)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    lists = [(name, mod) for name, mod in base.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    sized = [(name, mod) for name, mod in lists if n is None or len(mod) == n]
    typed = [(name, mod) for name, mod in sized if type(mod[0]).__name__ in no_split]
    for cands in (typed, sized):
        if len(cands) == 1:
            return cands[0][0]
    found = ", ".join(f"{name} ({len(mod)} x {type(mod[0]).__name__})" for name, mod in lists)
    raise _refuse(model, f"the decoder block list ({n} blocks of {sorted(no_split) or '?'})",
                  f"module lists: {found or 'none'}")


def _is_norm(mod: nn.Module) -> bool:
    return "norm" in type(mod).__name__.lower()


def _find_child(model: nn.Module, block: nn.Module, names: tuple[str, ...],
                class_marks: tuple[str, ...], what: str) -> str:
    children = dict(block.named_children())
    by_class = [n for n, c in children.items()
                if any(m in type(c).__name__.lower() for m in class_marks) and not _is_norm(c)]
    by_name = [n for n in names if n in children]
    for cands in (by_class, by_name):
        if len(cands) == 1:
            return cands[0]
    listing = ", ".join(f"{n} ({type(c).__name__})" for n, c in children.items())
    raise _refuse(model, f"the {what} module of block {type(block).__name__}",
                  f"children: {listing}")


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None or a.numel() != b.numel() or a.shape[-1] != b.shape[-1]:
        return False
    a, b = a.reshape(b.shape), b  # OPT flattens [batch, seq] inside its blocks
    scale = float(b.double().norm()) or 1.0
    return float((a.double() - b.double()).norm()) <= 1e-6 * scale


@torch.no_grad()
def _probe(model: nn.Module, base: nn.Module, blocks: nn.ModuleList):
    """One forward on a few tokens recording block 0's input and its children's first inputs
    and outputs, the last block's output, and the inputs of the base model's children in
    the order they run."""
    block0, last = blocks[0], blocks[-1]
    rec: dict[str, Any] = {"inputs": {}, "outputs": {}, "base_order": []}
    handles = []

    def pre_block0(_m, args, kwargs):
        rec["x"] = (args[0] if args else kwargs["hidden_states"]).clone()

    def post_block(key):
        def hook(_m, _a, out):
            rec[key] = _first(out).clone()
            rec[key + "_tuple_len"] = len(out) if isinstance(out, tuple) else 0
        return hook

    handles.append(block0.register_forward_pre_hook(pre_block0, with_kwargs=True))
    handles.append(last.register_forward_hook(post_block("y_last")))
    for name, child in block0.named_children():
        def pre(_m, args, kwargs, name=name):
            h = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(h, torch.Tensor):
                rec["inputs"].setdefault(name, h.clone())

        def post(_m, _a, out, name=name):
            h = _first(out)
            if isinstance(h, torch.Tensor):
                rec["outputs"].setdefault(name, h.clone())
        handles.append(child.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(child.register_forward_hook(post))
    for name, child in base.named_children():
        if isinstance(child, nn.ModuleList):
            continue

        def pre_base(_m, args, kwargs, name=name):
            h = args[0] if args else next(iter(kwargs.values()), None)
            rec["base_order"].append((name, h.clone() if isinstance(h, torch.Tensor) else None))
        handles.append(child.register_forward_pre_hook(pre_base, with_kwargs=True))
    vocab = int(model.get_input_embeddings().num_embeddings)
    device = next(model.parameters()).device
    ids = (torch.arange(5, device=device) % vocab)[None]
    try:
        base(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return rec


def _post_norm(block: nn.Module, rec, section: str) -> str | None:
    """The norm child of the block that takes the section's output as its input, if any."""
    out = rec["outputs"].get(section)
    for name, h in rec["inputs"].items():
        if name != section and _is_norm(block.get_submodule(name)) and _same(h, out):
            return name
    return None


def _find_final_norm(model: nn.Module, base: nn.Module, rec) -> str:
    y_last = rec["y_last"]
    after = [name for name, h in rec["base_order"] if _same(h, y_last)]
    norms = [n for n in after if _is_norm(base.get_submodule(n))]
    if len(norms) == 1:
        return norms[0]
    listing = ", ".join(f"{n} ({type(c).__name__})" for n, c in base.named_children())
    raise _refuse(model, "the final norm (a norm of the base model whose input is the last "
                  "block's output)", f"base model children: {listing}")


def _find_attn_proj(block: nn.Module, attn: str, n_heads: int, head_dim: int) -> str | None:
    attn_mod = block.get_submodule(attn)
    for name in _PROJ_NAMES:
        proj = getattr(attn_mod, name, None)
        if not isinstance(proj, nn.Module):
            continue
        weight = getattr(proj, "weight", None)
        # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
        if weight is not None and n_heads * head_dim in tuple(weight.shape):
            return f"{attn}.{name}"
    return None


def _heads(model: nn.Module, block: nn.Module, attn: str) -> tuple[int, int]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_heads = int(cfg.num_attention_heads)
    head_dim = getattr(block.get_submodule(attn), "head_dim", None) or getattr(cfg, "head_dim", None)
    if not head_dim:
        head_dim = int(cfg.hidden_size) // n_heads
    return n_heads, int(head_dim)


def discover(model: nn.Module) -> Adapter:
    """The Adapter of a loaded HF causal LM, from its module tree, config and one probe pass.

    Raises UnsupportedArchitecture naming what was not found, before any sweep compute.
    """
    cfg = model.config
    model_type = str(getattr(cfg, "model_type", "?"))
    over = EXCEPTIONS.get(model_type, {})
    decoder = over.get("decoder") if "decoder" in over else _find_decoder(model)
    base = model.get_submodule(decoder)
    blocks_path = over.get("blocks") or _find_blocks(model, base)
    blocks = base.get_submodule(blocks_path)
    block0 = blocks[0]
    attn = over.get("attn") or _find_child(model, block0, _ATTN_NAMES, ("attention",), "attention")
    mlp = over.get("mlp") or _find_child(model, block0, _MLP_NAMES, _MLP_CLASS_MARKS, "MLP")
    rec = _probe(model, base, blocks)
    attn_out = over.get("attn_out") or _post_norm(block0, rec, attn) or attn
    mlp_out = over.get("mlp_out") or _post_norm(block0, rec, mlp) or mlp
    final_norm = over.get("final_norm") or _find_final_norm(model, base, rec)
    scale = float(over.get("residual_scale", getattr(cfg, "residual_multiplier", None) or 1.0))
    # Sequential blocks feed x + attn (through a norm) to the MLP; parallel blocks never form it.
    mid = None
    if rec.get("x") is not None and attn_out in rec["outputs"]:
        mid = rec["x"] + rec["outputs"][attn_out] * scale
    parallel = not any(_same(h, mid) for h in rec["inputs"].values())
    n_heads, head_dim = _heads(model, block0, attn)
    attn_proj = over.get("attn_proj") or _find_attn_proj(block0, attn, n_heads, head_dim)
    multiplier = float(getattr(cfg, "logit_scale", None) or 1.0)
    if getattr(cfg, "logits_scaling", None):
        multiplier /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return Adapter(
        family=model_type, decoder=decoder, blocks=blocks_path, final_norm=final_norm,
        attn_out=attn_out, mlp_out=mlp_out, attn_proj=attn_proj, n_heads=n_heads,
        head_dim=head_dim, parallel=parallel, residual_scale=scale,
        block_tuple_len=int(rec.get("y_last_tuple_len", 0)),
        logit_multiplier=float(over.get("logit_multiplier", multiplier)),
        logit_softcap=float(softcap) if softcap is not None else None)


def adapter_for(model: nn.Module) -> Adapter:
    """The discovered Adapter of `model` (see discover); kept as the loader's entry point."""
    return discover(model)
