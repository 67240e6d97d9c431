"""Serving benchmark at 7B scale: throughput, latency, memory and cold start, against the alternatives.

One GPU run builds a Llama-2-7B-shaped base (random bf16 weights made on the GPU: speed does not
depend on values), writes random 1-bit deltas of the same shapes to disk with the real artifact
writer (a few distinct artifacts; N tenants are registered under distinct names pointing at them,
each tenant in its own device slot), and serves through the real engine (continuous batching,
bitdelta ops). Workload: N requests at once, each a distinct tenant, 128-token prompts, 128 new
tokens (greedy); plus a Poisson-arrival run at a fixed rate, and a Zipf-tenant run. For each N it measures
  * bitdelta: tokens/s, time to first token and per-token latency (p50/p99), GPU memory by part
    (base, deltas, KV cache), host enqueue vs GPU time per decode step, and the mix's memory
    roofline (batch tokens per step over (base + N deltas + KV bytes read per step) / copy
    bandwidth, the 1 GiB device-to-device copy measured in the same run);
  * base alone with the same batch (the single-model ceiling);
  * the unfused reference-style mode (``bitdelta.serving.unfused``: base GEMM + per-tenant binary
    matmul + scale + add); its decode is cut after ``--ref-steps`` steps and the rest extrapolated;
  * merged dense models per tenant: one merged model's request is measured (it is the base's
    forward at batch 1), one 13.5 GB pinned host -> GPU copy and the disk read rate are measured,
    and the serving schedule is modelled (see ``merged.merged_schedule``);
  * cold start: a never-loaded delta on disk (page cache dropped) to its first token, against a
    full fp16 fine-tune read from disk to its first token;
  * Zipf tenants (``zipf``): ``--zipf-deltas`` registered deltas, ``--zipf-slots`` device slots, a
    host LRU of ``--zipf-host``, Poisson requests whose tenant is drawn Zipf(``--zipf-s``): tokens/s,
    TTFT / TPOT p50/p99 overall and by where each request's delta was when it arrived (device slot,
    host memory, disk), slot and host hit rates, loads per second, and what one LRU of the same size
    predicts for the same trace (``benchmarks.routing_sim``).
A time budget (``--budget-s``) cuts decode short (extrapolating, and saying so) rather than
overrun. Writes serve.json / serve.md / serve.log to ``--out`` (or $OUT) and prints a short table.

    python -m benchmarks.serve --ns 1,8,32 --out $OUT                      # GPU
    python -m benchmarks.serve --ns 64,max --skip-cold --poisson-rate 0 --zipf-deltas 0 --out $OUT
    python -m benchmarks.serve --ns '' --skip-cold --poisson-rate 0 --zipf-deltas 1000 --zipf-slots 32 \
        --zipf-s 1.0 --out $OUT                                            # the Zipf-tenant run alone
    python -m benchmarks.serve --report a/serve.json b/serve.json --out docs/ --docs docs/benchmarks.md
    python -m benchmarks.serve --smoke --out /tmp/serve-smoke             # CPU, tiny shapes, < 1 min

The parts: ``cli`` (flags), ``run`` (the phases in order), ``setup`` (base, artifacts, tenants),
``workload`` (prompts, tenants, arrivals), ``measure`` (one served workload, timed),
``modes`` (base alone, bitdelta, unfused, Poisson), ``cold`` (cold starts), ``zipf`` (the Zipf-tenant
run), ``merged`` (the merged-per-tenant model), ``report`` and ``plot`` (tables, goals, the figure).
"""
