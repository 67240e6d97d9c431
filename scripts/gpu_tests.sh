#!/usr/bin/env bash
# The CUDA tests (`pytest -m cuda`) one file at a time, each under its own time limit, with one summary
# line per file: on a fresh GPU machine the first tests of a file compile Triton and NVRTC kernels for
# minutes, and one slow or hanging file must not hide the results of the others.
#
#   bash scripts/gpu_tests.sh                       # every file with CUDA tests, 240 s each
#   PER_FILE_S=120 bash scripts/gpu_tests.sh tests/serving/test_engine.py tests/ops/test_cuda_popc.py
#
# Uses the python on PATH with src/ on PYTHONPATH (the GPU machine's own environment), or .venv if present.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
PER_FILE_S=${PER_FILE_S:-240}
if [ "$#" -gt 0 ]; then
  files=("$@")
else
  mapfile -t files < <($PY -m pytest -m cuda --collect-only -q -p no:cacheprovider tests 2>/dev/null \
    | grep '::' | sed 's/::.*//' | sort -u)
fi
log=$(mktemp)
failed=0
for f in "${files[@]}"; do
  start=$(date +%s)
  timeout "$PER_FILE_S" $PY -m pytest -m cuda -q -p no:cacheprovider -rfE --tb=short "$f" >"$log" 2>&1
  rc=$?
  took=$(( $(date +%s) - start ))
  summary=$(grep -E '^[0-9]+ (passed|failed|skipped|deselected|error)|passed|failed' "$log" | tail -1)
  case $rc in
    0|5) echo "ok      ${took}s  $f  ${summary}" ;;
    124) echo "TIMEOUT ${took}s  $f  (over ${PER_FILE_S} s; raise PER_FILE_S)"; failed=1 ;;
    *) echo "FAILED  ${took}s  $f  ${summary}"; grep -E '^(FAILED|ERROR)|^E  ' "$log" | head -20 | sed 's/^/    /'; failed=1 ;;
  esac
done
rm -f "$log"
exit $failed
