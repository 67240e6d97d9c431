#!/usr/bin/env bash
# Sets up .venv and runs the test suite (CPU; Triton kernels run under TRITON_INTERPRET=1).
# Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the quick set for development
# (no Triton interpreter matrix, subprocesses, servers or Ray); without them, the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
