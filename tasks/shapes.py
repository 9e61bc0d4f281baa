"""Shape-only models: the published configs of the paper's models with seeded random weights.

A forward pass costs the same whatever the weights, so these stand in for Gemma-2-2B,
Llama-3.2-3B and GPT-2-XL in benchmarks and tests; they are never real weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from tasks.errors import InvalidInput

if TYPE_CHECKING:  # torch is imported where used: `unisweep models list` needs none of it
    import torch

INIT_SEED = 0
INIT_STD = 0.02  # HF's initializer_range for all three families
# Rows of a weight drawn at once on the CPU: bounds the float32 scratch to ~256 MiB.
_INIT_CHUNK_ELEMS = 1 << 26


def _gemma2(scale: int):
    from transformers import Gemma2Config

    head_dim = 256 // scale
    return Gemma2Config(
        vocab_size=256000 // scale, hidden_size=2304 // scale, intermediate_size=9216 // scale,
        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=head_dim,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6,
        # query_pre_attn_scalar = head_dim in the published config: keep the 1/sqrt(head_dim) scale.
        query_pre_attn_scalar=head_dim, sliding_window=4096, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=2)


def _llama32(scale: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256 // scale, hidden_size=3072 // scale, intermediate_size=8192 // scale,
        num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
        head_dim=128 // scale, hidden_act="silu", max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        bos_token_id=128000 // scale, eos_token_id=128001 // scale)


def _gpt2(n_layer: int, n_embd: int, n_head: int, scale: int = 1):
    from transformers import GPT2Config

    vocab = 50257 // scale
    return GPT2Config(n_layer=n_layer, n_embd=n_embd // scale, n_head=n_head, n_positions=1024,
                      vocab_size=vocab, activation_function="gelu_new",
                      tie_word_embeddings=True, bos_token_id=vocab - 1, eos_token_id=vocab - 1)


# name -> (config builder, published parameter count or None for the scaled-down variants).
# "/4" variants: the same architecture (layer count, head counts, KV groups, sliding window,
# soft-caps, tying) with every width divided by 4 (hidden, MLP, head_dim, vocab), so each
# matmul costs 1/16 and the grid over lp is the same; CPU-sized (100-200M parameters).
SHAPES: dict[str, tuple[Callable, float | None]] = {
    "gemma-2-2b": (lambda: _gemma2(1), 2.61e9),
    "llama-3.2-3b": (lambda: _llama32(1), 3.21e9),
    "gpt2-xl": (lambda: _gpt2(48, 1600, 25), 1.56e9),
    "gpt2-small": (lambda: _gpt2(12, 768, 12), 124e6),
    "gemma-2-2b/4": (lambda: _gemma2(4), None),
    "llama-3.2-3b/4": (lambda: _llama32(4), None),
    "gpt2-xl/4": (lambda: _gpt2(48, 1600, 25, scale=4), None),
}
# Llama 3 keeps its 256 reserved tokens at the top of the vocabulary, all special.
_LLAMA_RESERVED = 256


def shape_config(name: str):
    """The transformers config of a shape, with the attention implementation the engine uses."""
    if name not in SHAPES:
        raise InvalidInput("model", "shape:<name> with name one of " + ", ".join(SHAPES), name)
    cfg = SHAPES[name][0]()
    # Gemma-2 has no SDPA path in HF (soft-capped attention logits); the others use SDPA.
    cfg._attn_implementation = "eager" if cfg.model_type == "gemma2" else "sdpa"
    return cfg


def count_parameters(name: str) -> int:
    """Parameters of a shape (tied embeddings counted once), built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(name))
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


def _token_space(cfg):
    from tasks.model_handle import TokenSpace  # imports torch: see TYPE_CHECKING above

    special = {t for t in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) if t is not None}
    if cfg.model_type == "llama":
        reserved_from = cfg.bos_token_id  # 128000 in the published vocabulary
        special |= set(range(reserved_from, min(cfg.vocab_size, reserved_from + _LLAMA_RESERVED)))
    return TokenSpace(cfg.vocab_size, cfg.bos_token_id, frozenset(special))


def _seeded_init(model: torch.nn.Module, family: str) -> None:
    """N(0, 0.02) matrices, zero biases, unit norms (zero for Gemma's 1 + w norms).

    Drawn on the CPU from one seeded generator in parameter order, then cast and copied, so
    the weights are the same on every device and dtype.
    """
    import torch

    gen = torch.Generator().manual_seed(INIT_SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights appear once
            if p.ndim >= 2:
                flat = p.view(-1) if p.is_contiguous() else None
                if flat is None:
                    p.copy_(torch.randn(p.shape, generator=gen) * INIT_STD)
                    continue
                for k in range(0, flat.numel(), _INIT_CHUNK_ELEMS):
                    m = min(_INIT_CHUNK_ELEMS, flat.numel() - k)
                    flat[k:k + m].copy_(torch.randn(m, generator=gen).mul_(INIT_STD))
            elif "norm" in name or "ln_" in name:
                p.fill_(0.0 if family == "gemma2" else 1.0)
            else:
                p.zero_()


def load_shape(name: str, dtype: torch.dtype, device: torch.device):
    """(model, TokenSpace, identity) for a shape: random seeded weights, no download."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers import initialization as hf_init

    cfg = shape_config(name)
    # Before loading: from_config writes the dtype into the config.
    identity = shape_identity(name)
    # Allocate directly on the device in the target dtype; skip HF's per-module init (slow
    # on billions of parameters) and draw the seeded weights ourselves.
    with torch.device(device), hf_init.no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # no_init_weights also skips HF's tying (it lives in init_weights): tie explicitly.
    model.tie_weights()
    _seeded_init(model, cfg.model_type)
    model.eval()
    return model, _token_space(cfg), identity


def shape_identity(name: str) -> dict[str, str]:
    """The identity in a shape's unit keys: its published config (hashed) and init seed."""
    cfg_hash = hashlib.sha256(json.dumps(shape_config(name).to_dict(), sort_keys=True,
                                         default=str).encode())
    return {"name": f"shape:{name}", "not_real_weights": "true",
            "config_sha256": cfg_hash.hexdigest(), "init_seed": str(INIT_SEED)}
