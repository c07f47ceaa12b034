#!/usr/bin/env bash
# Install seektune into ./.venv. Used by the README's two commands and by CI.
#   bash scripts/setup.sh          the package and what it needs
#   bash scripts/setup.sh --dev    the same plus the test tools
# Where no torch is installed yet, the pinned build is installed first (TORCH_SPEC overrides it): a bare
# `torch` requirement would pull a multi-GB CUDA build on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "installing ${TORCH_SPEC:-torch==2.13.0} ..."
  pip install "${TORCH_SPEC:-torch==2.13.0}"
fi
pip install -e ".${extras}"
echo "seektune installed in .venv ($(.venv/bin/python -c 'import seektune; print(seektune.__version__)'))"
