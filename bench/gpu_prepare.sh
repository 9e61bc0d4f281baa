#!/usr/bin/env bash
# Fetch the wheels that bench/gpu_check.py needs on the GPU machine into .whl/ (git-ignored; it
# travels with the working tree). That machine has Python 3.12, torch, transformers, pyarrow,
# numpy, PyYAML, requests, tqdm and MarkupSafe, but no network and none of: gguf (tasks.models
# reads GGUF headers with it: every part), SQLAlchemy, Alembic, pydantic (the sweep, part d). The versions are the ones installed in this checkout's .venv, so the GPU run
# uses what the tests here ran with. Then, on the GPU machine (BENCHMARKS.md has the command):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site python3 bench/gpu_check.py OUT
#
#   bash bench/gpu_prepare.sh            # download, check the set installs for cp312, sizes
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# Distribution names (as pip knows them): what part (d) imports beyond the machine's own set.
# typing-extensions: pydantic 2.14 needs >= 4.16, newer than some images carry.
NAMES=(sqlalchemy alembic mako pydantic pydantic-core annotated-types typing-inspection gguf
       typing-extensions)
LIMIT_MIB=50  # the working tree may carry 64 MiB in all

PINS=$("$PY" - "${NAMES[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
pins = []
for name in sys.argv[1:]:
    try:
        pins.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"gpu_prepare: {name} is not installed in this venv; run setup.sh first")
print(" ".join(pins))
EOF
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086  # PINS is a list of name==version words
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d .whl $PINS
# The set must install on its own for cp312 (no index, no dependencies fetched): what the
# GPU machine will do, into a scratch folder here.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$PY" -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: \
    --python-version 3.12 --implementation cp "${PLATFORMS[@]}" --target "$scratch" .whl/*.whl
size=$(du -sb .whl | cut -f1)
echo "gpu_prepare: $(ls .whl | wc -l) wheels in .whl/, $((size / 1024)) KiB: $PINS"
if [ "$size" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "gpu_prepare: .whl/ is over ${LIMIT_MIB} MiB" >&2
  exit 1
fi
