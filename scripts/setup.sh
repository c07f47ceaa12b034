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

# The browser test of the HTML evaluation report drives Debian's chromium through Playwright. Install it
# with --dev where it is missing and this script may (root, apt-get present); skip quietly otherwise.
if [ -n "$extras" ] && ! command -v chromium >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium (for the HTML report's browser test) ..."
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
      >/dev/null 2>&1; then
    echo "could not install chromium; the browser test will be skipped"
  fi
fi
echo "seektune installed in .venv ($(.venv/bin/python -c 'import seektune; print(seektune.__version__)'))"
