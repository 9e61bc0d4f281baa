#!/usr/bin/env bash
# The test command (README, CI): the whole suite on SQLite and the local PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")"
exec .venv/bin/python -m pytest -q "$@"
