"""Where each architecture family keeps its blocks, norms and section outputs.

One small table per family (TransformerLens-style names: resid_pre[l], attn_out[l],
mlp_out[l], resid_final); the engine hooks HF's own modules through it, never re-implements them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tasks.errors import UnisweepError


@dataclass(frozen=True)
class Adapter:
    """Attribute paths inside an HF causal LM for one architecture family.

    attn_out / mlp_out name the module (relative to a block) whose output is exactly what
    the block adds to the residual stream: for Gemma that is the post-norm, not the raw
    attention output.
    """

    family: str
    decoder: str  # the base model inside the *ForCausalLM
    blocks: str  # ModuleList of decoder blocks, relative to the base model
    final_norm: str  # relative to the base model; its input is resid_final (x_L)
    attn_out: str
    attn_out_is_tuple: bool
    mlp_out: str

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

    def logits(self, model: nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the final-normed hidden state, as the HF head computes them."""
        logits = model.get_output_embeddings()(normed)
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


# To support a new family: add one entry here (keyed by config.model_type), then run
# tests/test_engine_exact.py with a tiny config of it; the start-up check guards real models.
FAMILIES: dict[str, Adapter] = {
    "gpt2": Adapter("gpt2", "transformer", "h", "ln_f", "attn", True, "mlp"),
    "llama": Adapter("llama", "model", "layers", "norm", "self_attn", True, "mlp"),
    "gemma2": Adapter("gemma2", "model", "layers", "norm", "post_attention_layernorm", False,
                      "post_feedforward_layernorm"),
    "gemma3_text": Adapter("gemma3", "model", "layers", "norm", "post_attention_layernorm",
                           False, "post_feedforward_layernorm"),
}
# Families that share a block layout with one above.
FAMILIES["gemma3"] = FAMILIES["gemma3_text"]
FAMILIES["mistral"] = FAMILIES["llama"]
FAMILIES["qwen2"] = FAMILIES["llama"]


class UnsupportedArchitecture(UnisweepError):
    pass


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in FAMILIES:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}: supported families are "
            f"{', '.join(sorted(FAMILIES))}. To add one, add an Adapter entry to FAMILIES in "
            "tasks/adapters.py (block list, final norm, attention and MLP output modules) and "
            "run tests/test_engine_exact.py on a tiny config of it.")
    return FAMILIES[model_type]
