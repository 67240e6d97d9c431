#!/usr/bin/env bash
# Sets up .venv, then runs the main job on the bundled tiny models: compress both fine-tunes,
# show sizes and fidelity, generate from each, and finally serve base + both deltas through the
# OpenAI-compatible API on http://127.0.0.1:8000 (Ctrl-C stops it; DEMO_NO_SERVE=1 skips it).
# Extra arguments go to examples/quickstart.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python examples/quickstart.py "$@"
[ "${DEMO_NO_SERVE:-0}" = "1" ] && exit 0
PORT=${PORT:-8000}
cat <<MSG

Serving the tiny base and both fine-tunes on http://127.0.0.1:$PORT (Ctrl-C to stop). Query it with:
  curl -s http://127.0.0.1:$PORT/v1/models
  curl -s http://127.0.0.1:$PORT/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "shakespeare", "prompt": "ROMEO:", "max_tokens": 40}'
  .venv/bin/python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:$PORT/v1', api_key='-');
print(c.chat.completions.create(model='gsm8k', messages=[{'role': 'user', 'content': 'Tom has 3 apples.'}],
max_tokens=40).choices[0].message.content)"
  open http://127.0.0.1:$PORT/ in a browser to compare the fine-tunes side by side.
MSG
exec .venv/bin/bitdelta serve --base models/tiny/base --base-name base \
  --delta shakespeare=outputs/shakespeare.bitdelta --delta gsm8k=outputs/gsm8k.bitdelta --port "$PORT"
