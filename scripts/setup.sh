#!/usr/bin/env bash
# Create .venv and install the project with its test tools.
#
# torch is installed first, pinned: with no torch present, a plain `torch` requirement pulls a
# multi-GB CUDA build. The pin alone does not choose the build: from a CPU-only index (as on the
# project's CI machines) it is the CPU build, from PyPI on Linux x86-64 it is the CUDA build.
# Set TORCH_SPEC to the build you want, e.g. the CPU one anywhere:
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" bash scripts/setup.sh
# or a CUDA one:
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options on purpose
.venv/bin/python -m pip install --quiet $TORCH_SPEC
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
