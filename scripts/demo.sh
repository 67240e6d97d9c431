#!/usr/bin/env bash
# Sets up .venv, then runs the main job on the bundled tiny models: compress both fine-tunes,
# show sizes and fidelity, and generate from each. Extra arguments go to examples/quickstart.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python examples/quickstart.py "$@"
