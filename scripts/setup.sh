#!/usr/bin/env bash
# Creates .venv (if needed) and installs bitdelta with its test and dev (ruff) extras. Safe to run repeatedly.
# PyTorch is installed explicitly first: a bare `torch` requirement would otherwise pull a
# CUDA build (several GB) on machines that have a local CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
fi
# The editable install is redone only when pyproject.toml changed since the last one (a repeat run is quick).
STAMP=.venv/.bitdelta-installed
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! "$VPY" -c "import bitdelta, pytest, ruff" 2>/dev/null; then
  "$VPY" -m pip install -q --disable-pip-version-check -e ".[test,dev]"
  echo "$WANT" > "$STAMP"
fi
echo "bitdelta $("$VPY" -c 'import bitdelta; print(bitdelta.__version__)') ready in .venv (torch $("$VPY" -c 'import torch; print(torch.__version__)'))"
