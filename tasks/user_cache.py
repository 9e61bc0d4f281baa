"""Where unisweep keeps its per-user caches: UNISWEEP_CACHE, else ~/.cache/unisweep.

Read on every call, so a process (or a test) that moves UNISWEEP_CACHE moves every cache:
de-quantised weights, weight-file hashes, the assembled Gemma-3 GGUF, the fused-KL gate.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("UNISWEEP_CACHE", Path.home() / ".cache" / "unisweep"))
