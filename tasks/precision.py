"""float64 that is really float64: HF's RMSNorms compute in float32 whatever the input.

Only for the float64 mode (exactness tests); float32/bf16/fp16 models are left untouched.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _llama_style(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _gemma_style(self, x: torch.Tensor) -> torch.Tensor:
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
    return normed * (1.0 + self.weight)


def keep_norms_in_float64(model: nn.Module) -> int:
    """Rebind every RMSNorm's forward to the same formula without the float32 round trip.

    Llama-style norms scale by w (attribute variance_epsilon); Gemma-style by (1 + w).
    Returns the number of modules rebound.
    """
    count = 0
    for mod in model.modules():
        if not type(mod).__name__.endswith("RMSNorm"):
            continue
        if hasattr(mod, "variance_epsilon"):
            mod.forward = types.MethodType(_llama_style, mod)
        elif hasattr(mod, "eps") and "Gemma" in type(mod).__name__:
            mod.forward = types.MethodType(_gemma_style, mod)
        else:
            raise NotImplementedError(f"float64 mode does not know the norm {type(mod).__name__}")
        count += 1
    return count


def _attention_in_input_dtype(module, query, key, value, attention_mask, scaling=None,
                              dropout=0.0, softcap=None, **kwargs):
    """HF's eager attention, but with the softmax in the input dtype (HF's is float32).

    Registered for float64 models whose family has no SDPA path (Gemma-2).
    """
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


FLOAT64_ATTENTION = "unisweep_float64_eager"


def _gptj_attn_in_input_dtype(self, query, key, value, attention_mask=None):
    """GPT-J's eager attention (GPTJAttention._attn) without its float32 round trip."""
    weights = torch.matmul(query, key.transpose(-1, -2)) / self.scale_attn
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1)
    return torch.matmul(weights, value), weights


# Eager attentions outside HF's AttentionInterface that compute in float32: class -> method.
_OWN_EAGER_ATTENTION = {"GPTJAttention": ("_attn", _gptj_attn_in_input_dtype)}


def use_float64_attention(model: nn.Module) -> None:
    """Switch an eager-attention model to the float64-faithful eager attention."""
    from transformers import AttentionInterface

    if not model._can_set_attn_implementation():
        for mod in model.modules():
            if type(mod).__name__ in _OWN_EAGER_ATTENTION:
                name, fn = _OWN_EAGER_ATTENTION[type(mod).__name__]
                setattr(mod, name, types.MethodType(fn, mod))
        return
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(FLOAT64_ATTENTION, _attention_in_input_dtype)
    # Without a registered mask builder HF would pass no mask at all (non-causal attention).
    AttentionMaskInterface.register(FLOAT64_ATTENTION, eager_mask)
    model.set_attn_implementation(FLOAT64_ATTENTION)


def use_eager_experts(model: nn.Module) -> None:
    """Mixture-of-experts layers: the per-expert loop, as grouped matmul kernels lack float64."""
    impl = getattr(model.config, "_experts_implementation", None)
    if impl not in (None, "eager") and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
