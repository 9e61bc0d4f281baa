"""Model loading: offline aliases, tiny random configs, hub names, local folders and GGUF files.

Returns a LoadedModel that carries the HF model, its token space, its family adapter and
an identity (name + revision, or the file's sha256) that goes into every unit key; the start-up
check runs on it. What a name means (files, configs, identities) is tasks.model_catalog's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks import hub
from tasks.adapters import adapter_for
from tasks.check import startup_check
from tasks.errors import InvalidInput
from tasks.model_catalog import (
    ALIASES,
    TINY_PREFIX,
    ModelInfo,
    file_sha256_cached,
    gguf_identity,
    gguf_path,
    install_alias,
    model_info,
    tiny_config,
    tiny_identity,
    unknown_model,
)
from tasks.model_handle import LoadedModel, TokenSpace, check_device, check_dtype
from tasks.precision import keep_norms_in_float64, use_eager_experts, use_float64_attention
from tasks.shapes import load_shape
from tasks.user_cache import cache_dir

# Re-exported: what a name means lives in tasks.model_catalog; callers may import it from here.
__all__ = ["ALIASES", "LoadedModel", "ModelInfo", "TokenSpace", "install_alias", "load_model", "model_info"]


def _token_space_from_tokenizer(tok, vocab_size: int) -> TokenSpace:
    special = {int(t) for t in getattr(tok, "all_special_ids", []) if t is not None}
    # Added tokens (chat markers and the like) are special for our purpose too.
    for tid, added in getattr(tok, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(int(tid))
    size = min(vocab_size, len(tok))
    return TokenSpace(size, tok.bos_token_id, frozenset(t for t in special if t < size))


def _token_space_from_config(cfg) -> TokenSpace:
    ids = (getattr(cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
    special = frozenset(int(t) for t in ids if isinstance(t, int))
    return TokenSpace(int(cfg.vocab_size), getattr(cfg, "bos_token_id", None), special)


def _load_tiny(family: str, dtype: torch.dtype, device: torch.device):
    cfg = tiny_config(family)
    torch.manual_seed(0)  # the same tiny weights everywhere
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.to(device=device, dtype=dtype).eval()
    space = TokenSpace(cfg.vocab_size, cfg.bos_token_id,
                       frozenset({cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id}))
    return model, None, space, tiny_identity(family, model.config)


def _materialized_folder(digest: str) -> Path:
    """De-quantising a GGUF takes ~20 s; keep a safetensors copy keyed by the file's sha256."""
    return cache_dir() / "materialized" / digest[:16]


def _load_gguf(path: Path, dtype: torch.dtype, device: torch.device):
    digest = file_sha256_cached(path)
    folder = _materialized_folder(digest)
    if (folder / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        try:
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            # The weights are de-quantised already; save them as a plain float checkpoint.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, folder)
        except (OSError, ValueError):
            pass  # a cache is an optimisation; another process may have won the race
    model.to(device=device, dtype=dtype).eval()
    return model, tok, gguf_identity(path, digest)


def _load_pretrained(name: str, dtype: torch.dtype, device: torch.device, spread: bool = False):
    """A folder or hub name from the local HF cache, optionally NAME@REVISION (tasks.hub).

    Returns (model, tokenizer or None when the checkpoint has none, identity). `spread`:
    too large for one GPU, accelerate places the blocks over every visible GPU and moves
    activations between them (device_map="auto"); the first block's GPU is the model's device.
    """
    base, revision = hub.split_revision(name)
    src = hub.resolve(base, revision)  # unknown names fail here, without network retries
    where = dict(revision=src.revision, cache_dir=src.cache_dir, local_files_only=src.local_only)
    placement = {"device_map": "auto"} if spread else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(src.location, dtype=dtype, **where, **placement)
    except (OSError, ValueError) as exc:
        raise unknown_model(name, exc) from exc
    tok = None  # a bare checkpoint (e.g. random-init): the config's special ids are used
    if hub.has_tokenizer(src):
        try:
            tok = AutoTokenizer.from_pretrained(src.location, **where)
        except (OSError, ValueError) as exc:
            raise InvalidInput("model", "a checkpoint whose tokenizer loads", name,
                               detail=str(exc).splitlines()[0][:200]) from exc
    if not spread:
        model.to(device=device)
    model.eval()
    return model, tok, hub.identity(base, src, revision)


def load_model(name: str, dtype: str = "float32", device: str = "cpu",
               check: bool = True, gpus: int = 1) -> LoadedModel:
    """Load a causal LM by alias, tiny:<family>, shape:<name>, hub name, folder or .gguf path.

    Hub names and folders may carry a revision, NAME@REVISION (tasks.hub).

    With check=True (default) the start-up check runs: the hooked residual stream must equal
    the plain HF forward, or the model is refused (tasks.check.StartupCheckFailed).
    gpus > 1 on CUDA spreads a hub or folder model over that many visible GPUs
    (device_map="auto"); the other kinds are small and stay on `device`.
    """
    if not isinstance(name, str) or not name:
        raise InvalidInput("model", "a non-empty model name", name)
    torch_dtype = check_dtype(dtype)
    dev = check_device(device)
    tokenizer = None
    extra: dict[str, Any] = {}
    if name.startswith(TINY_PREFIX):
        model, tokenizer, space, identity = _load_tiny(name[len(TINY_PREFIX):], torch_dtype, dev)
    elif name.startswith("shape:"):
        model, space, identity = load_shape(name[len("shape:"):], torch_dtype, dev)
        extra["not_real_weights"] = True
    else:
        if name in ALIASES or name.endswith(".gguf"):
            model, tokenizer, identity = _load_gguf(gguf_path(name), torch_dtype, dev)
            if name in ALIASES:
                identity["alias"] = name
        else:
            spread = gpus > 1 and dev.type == "cuda" and torch.cuda.device_count() >= gpus
            model, tokenizer, identity = _load_pretrained(name, torch_dtype, dev, spread)
        space = (_token_space_from_tokenizer(tokenizer, model.config.vocab_size)
                 if tokenizer is not None else _token_space_from_config(model.config))
    identity["dtype"] = dtype
    if torch_dtype == torch.float64:
        keep_norms_in_float64(model)
        use_eager_experts(model)
        if model.config._attn_implementation == "eager":
            use_float64_attention(model)
    lm = LoadedModel(model=model, tokenizer=tokenizer, token_space=space,
                     adapter=adapter_for(model), model_id=name, identity=identity,
                     dtype_name=dtype, device=dev, extra=extra)
    if check:
        startup_check(lm)
    return lm


