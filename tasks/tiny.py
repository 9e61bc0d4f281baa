"""Tiny random-initialised configs of every tested architecture family (`tiny:<name>`).

Built from transformers' own config classes, no download; each exercises its family's
quirks (parallel blocks, post-norms, residual and logit multipliers, mixtures of experts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tasks.errors import InvalidInput

_IDS = dict(vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# The shared small decoder shape: 3 blocks, d 32, 4 query heads in 2 KV groups, context 64.
_SMALL = dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, **_IDS)


def _cfg(cls_name: str, **kw: Any) -> Callable[[], Any]:
    def build():
        import transformers

        return getattr(transformers, cls_name)(**kw)
    return build


def _small(cls_name: str, **kw: Any) -> Callable[[], Any]:
    return _cfg(cls_name, **{**_SMALL, **kw})


# name -> config builder. The first four are the paper's families at the 4-block size the
# original tests used (their config hashes, hence unit keys, must not change).
TINY: dict[str, Callable[[], Any]] = {
    "gpt2": _cfg("GPT2Config", n_layer=4, n_embd=32, n_head=4, n_positions=128, **_IDS),
    "llama": _cfg("LlamaConfig", num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  **_IDS),
    # A sliding window shorter than the test prompts exercises the hybrid attention path.
    # No attention soft-capping: HF runs that only in eager attention, whose float32
    # softmax would break the float64 exactness tests; logit soft-capping stays.
    "gemma2": _cfg("Gemma2Config", num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=128, sliding_window=8, final_logit_softcapping=30.0,
                   attn_logit_softcapping=None, **_IDS),
    "gemma3": _cfg("Gemma3TextConfig", num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=128, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention"] * 2, **_IDS),
    "mistral": _small("MistralConfig", sliding_window=8),
    "qwen2": _small("Qwen2Config"),
    "qwen3": _small("Qwen3Config", head_dim=8),
    "gemma": _small("GemmaConfig", head_dim=8),
    "phi3": _small("Phi3Config"),
    "olmo": _small("OlmoConfig"),
    "olmo2": _small("Olmo2Config"),
    "gpt_neox": _small("GPTNeoXConfig", rotary_pct=0.25),  # Pythia: parallel residual
    "gpt_neox_seq": _small("GPTNeoXConfig", rotary_pct=0.25, use_parallel_residual=False),
    # Falcon-7B style (one norm, parallel attention, multi-query) and Falcon-40B style.
    "falcon": _small("FalconConfig", num_kv_heads=1),
    "falcon_new": _small("FalconConfig", new_decoder_architecture=True, num_kv_heads=2),
    "stablelm": _small("StableLmConfig", partial_rotary_factor=0.5, qk_layernorm=True),
    # Multipliers away from 1 so that a missed one shows.
    "granite": _small("GraniteConfig", embedding_multiplier=3.0, residual_multiplier=0.5,
                      attention_multiplier=0.3, logits_scaling=2.0),
    "cohere": _small("CohereConfig", logit_scale=0.5),
    "phi": _small("PhiConfig", partial_rotary_factor=0.5),
    "gptj": _cfg("GPTJConfig", n_layer=3, n_embd=32, n_head=4, rotary_dim=4, n_positions=64,
                 **_IDS),
    "gpt_bigcode": _cfg("GPTBigCodeConfig", n_layer=3, n_embd=32, n_head=4, n_positions=64,
                        **_IDS),
    "mixtral": _small("MixtralConfig", num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": _small("Qwen2MoeConfig", num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=16, shared_expert_intermediate_size=16),
    "qwen3_moe": _small("Qwen3MoeConfig", num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=16, head_dim=8),
}


def tiny_config(name: str):
    """The config of `tiny:<name>`; InvalidInput listing the names when it is not one."""
    if name not in TINY:
        raise InvalidInput("model", "tiny:<" + "|".join(TINY) + ">", f"tiny:{name}")
    return TINY[name]()
