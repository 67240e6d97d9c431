"""Serving benchmark at 7B scale: throughput, latency, memory and cold start, against the alternatives.

One GPU run builds a Llama-2-7B-shaped base (random bf16 weights made on the GPU: speed does not
depend on values), writes random 1-bit deltas of the same shapes to disk with the real artifact
writer (a few distinct artifacts; N tenants are registered under distinct names pointing at them,
each tenant in its own device slot), and serves through the real engine (continuous batching,
bitdelta ops). Workload: N requests at once, each a distinct tenant, 128-token prompts, 128 new
tokens (greedy); plus a Poisson-arrival run at a fixed rate. For each N it measures
  * bitdelta: tokens/s, time to first token and per-token latency (p50/p99), GPU memory by part
    (base, deltas, KV cache), host enqueue vs GPU time per decode step, and the mix's memory
    roofline (batch tokens per step over (base + N deltas + KV bytes read per step) / copy
    bandwidth, the 1 GiB device-to-device copy measured in the same run);
  * base alone with the same batch (the single-model ceiling);
  * the unfused reference-style mode (``bitdelta.serving.unfused``: base GEMM + per-tenant binary
    matmul + scale + add); its decode is cut after ``--ref-steps`` steps and the rest extrapolated;
  * merged dense models per tenant: one merged model's request is measured (it is the base's
    forward at batch 1), one 13.5 GB pinned host -> GPU copy and the disk read rate are measured,
    and the serving schedule is modelled (see ``merged_schedule``);
  * cold start: a never-loaded delta on disk (page cache dropped) to its first token, against a
    full fp16 fine-tune read from disk to its first token.
A time budget (``--budget-s``) cuts decode short (extrapolating, and saying so) rather than
overrun. Writes serve.json / serve.md / serve.log to ``--out`` (or $OUT) and prints a short table.

    python benchmarks/serve.py --ns 1,8,32 --out $OUT                      # GPU
    python benchmarks/serve.py --ns 64,max --skip-cold --poisson-rate 0 --out $OUT
    python benchmarks/serve.py --report a/serve.json b/serve.json --out docs/ --docs docs/benchmarks.md
    python benchmarks/serve.py --smoke --out /tmp/serve-smoke             # CPU, tiny shapes, < 1 min
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bitdelta import __version__  # noqa: E402
from bitdelta.artifact import load_delta  # noqa: E402
from bitdelta.delta import Delta, PackedModule  # noqa: E402
from bitdelta.fingerprint import Fingerprint, sample_weight  # noqa: E402
from bitdelta.safetensors_io import write_sharded  # noqa: E402
from bitdelta.serving.engine import Engine, Request, SamplingParams  # noqa: E402
from bitdelta.serving.model import DeltaLlama, KVCache  # noqa: E402
from bitdelta.serving.slots import DeltaSlots  # noqa: E402
from bitdelta.serving.unfused import unfused_linear  # noqa: E402
from bitdelta.targets import EMBEDDING, LINEAR  # noqa: E402
from serve_report import merge_results, short_table, write_outputs  # noqa: E402  (benchmarks/serve_report.py)

GiB = 2**30
LLAMA2_7B = dict(vocab=32000, hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32, max_pos=4096)
SMOKE = dict(vocab=256, hidden=64, inter=128, layers=2, heads=4, kv_heads=2, max_pos=512)
LINEARS = {"self_attn.q_proj": ("h", "h"), "self_attn.k_proj": ("kv", "h"), "self_attn.v_proj": ("kv", "h"),
           "self_attn.o_proj": ("h", "h"), "mlp.gate_proj": ("i", "h"), "mlp.up_proj": ("i", "h"),
           "mlp.down_proj": ("h", "i")}
T0 = time.perf_counter()
LOG: list[str] = []


def log(msg: str) -> None:
    line = f"[{time.perf_counter() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    LOG.append(line)


ON_GPU = False  # set by main_run: the run's device is a CUDA GPU


def cuda() -> bool:
    return ON_GPU


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


# ---------------------------------------------------------------------------------- model, artifacts


def build_base(shape: dict, dtype, device, seed=0) -> DeltaLlama:
    """A Llama-shaped DeltaLlama with random weights made directly on ``device`` (no HF model)."""
    h, kvd, i = shape["hidden"], shape["hidden"] // shape["heads"] * shape["kv_heads"], shape["inter"]
    dims = {"h": h, "kv": kvd, "i": i}
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(s, generator=g, device=device, dtype=dtype) * 0.02  # noqa: E731
    weights, params1d = {}, {}
    for layer in range(shape["layers"]):
        for sub, (o, k) in LINEARS.items():
            weights[f"model.layers.{layer}.{sub}"] = rnd(dims[o], dims[k])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            params1d[f"model.layers.{layer}.{norm}.weight"] = torch.ones(h, device=device, dtype=dtype)
    params1d["model.norm.weight"] = torch.ones(h, device=device, dtype=dtype)
    weights["model.embed_tokens"] = rnd(shape["vocab"], h)
    weights["lm_head"] = rnd(shape["vocab"], h)
    head_dim = h // shape["heads"]
    cfg = SimpleNamespace(model_type="llama", num_hidden_layers=shape["layers"], hidden_size=h,
                          num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], head_dim=head_dim,
                          rms_norm_eps=1e-5, max_position_embeddings=shape["max_pos"], _name_or_path="random-llama-base")
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return DeltaLlama(cfg, weights, params1d, inv_freq, 1.0, False, dtype, device)


def model_bytes(model: DeltaLlama) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.weights.values(), *model.params1d.values()])


def synthetic_delta(model: DeltaLlama, seed: int) -> Delta:
    """The tensor set ``bitdelta.compress`` writes for this base (random signs and scales)."""
    dev = model.device
    g = torch.Generator(device=dev).manual_seed(1000 + seed)
    modules, samples = {}, {}
    for name, (n, k) in model.delta_modules().items():
        vocab = name in (model.embed_name, model.head_name)
        mode = "row" if vocab else "scalar"
        sign = torch.randint(0, 256, (1, n, (k + 7) // 8), generator=g, device=dev, dtype=torch.uint8).cpu()
        scale = (torch.rand((1, n) if vocab else (1,), generator=g, device=dev) * 1e-3 + 5e-4).cpu()
        modules[name] = PackedModule(EMBEDDING if name == model.embed_name else LINEAR, mode, sign, scale, k, vocab)
        samples[name] = ((n, k), sample_weight(model.weights[name]))
    dense = {n: (p * (1 + 0.01 * seed)).cpu() for n, p in model.params1d.items()}
    num_params = sum(t.numel() for t in [*model.weights.values(), *model.params1d.values()])
    info = {"bitdelta_version": __version__, "base_model_name_or_path": "random-llama-base",
            "finetuned_model_name_or_path": f"random-finetune-{seed}", "finetuned_num_parameters": num_params,
            "model_type": "llama", "vocab_size": model.vocab_size, "compression": {"scale": "scalar", "bits": 1}}
    return Delta(modules, dense, Fingerprint.from_samples(samples), info)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def drop_page_cache(path: Path) -> None:
    """Asks the kernel to forget the cached pages of every file under ``path`` (clean pages only)."""
    for f in Path(path).rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def release_slots(slots: DeltaSlots) -> None:
    """Drops a pool's device tensors and its model now (its loader thread keeps the object alive)."""
    slots.on_ready = None
    slots.model = None
    slots.pools.clear()
    slots.tables.clear()
    slots.extra_embed = slots.extra_head = slots.n_extra = None
    free_memory()


def free_memory() -> None:
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()


def copy_bandwidth(device) -> float:
    """GB/s of a 1 GiB device copy (bytes read + written), median of 20."""
    n = GiB if device.type == "cuda" else 16 * 2**20
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        sync()
        t = time.perf_counter()
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    del src, dst
    return 2 * n / pct(times[5:], 50) / 1e9


# ---------------------------------------------------------------------------------- roofline


def roofline_terms(model: DeltaLlama, slots: DeltaSlots) -> dict:
    """Bytes a decode step must move: fixed base part, per distinct tenant, per token, per context token."""
    elem = torch.empty((), dtype=model.dtype).element_size()
    base = sum(w.numel() for n, w in model.weights.items() if n != model.embed_name) * elem
    base += sum(p.numel() for p in model.params1d.values()) * elem
    tenant = 0
    for name, pool in slots.pools.items():
        if name == model.embed_name:
            continue
        s = pool["signs"]
        tenant += s[0].numel() + pool["row"][0].numel() * 4  # sign planes + row scales of one slot
    per_token = model.hidden * elem + (model.hidden + 7) // 8 + 4  # embedding row, its delta row + scale
    kv_token = 2 * model.num_layers * model.kv_heads * model.head_dim * elem  # K and V, every layer
    return {"base": base, "tenant": tenant, "token": per_token, "kv_token": kv_token}


def step_bytes(terms: dict, tokens: int, tenants: int, ctx: int) -> int:
    """Base once + each distinct tenant's bits once + per-token rows + KV.

    KV: a decode token at position p reads p + 1 cache rows (its own, just written, included) and
    writes 1; ``ctx`` is the sum of p over the step's tokens.
    """
    return terms["base"] + tenants * terms["tenant"] + tokens * terms["token"] + (ctx + 2 * tokens) * terms["kv_token"]


# ---------------------------------------------------------------------------------- engine runs


class Probe:
    """Stands in for the model inside the engine: times each forward on the host, records the step."""

    def __init__(self, model: DeltaLlama):
        self._model = model
        self.records: list[dict] = []
        self.profile_decode_step: int | None = None
        self.profile: dict | None = None

    def __getattr__(self, name):
        return getattr(self._model, name)

    def forward(self, batch, kv, deltas=None):
        decode = all(n == 1 for _, _, n in batch.seqs)
        rec = {"tokens": sum(n for _, _, n in batch.seqs), "seqs": len(batch.seqs), "decode": decode,
               "tenants": len({s for s in batch.seq_slots if s >= 0}),
               "ctx": sum(start for _, start, n in batch.seqs if n == 1)}  # cache rows read besides the new token
        n_dec = sum(r["decode"] for r in self.records)
        out = None
        if decode and self.profile_decode_step is not None and n_dec == self.profile_decode_step and cuda():
            try:
                out = self._profiled(batch, kv, deltas)
            except Exception as e:  # noqa: BLE001 (the profile is optional; the step is re-run plainly)
                self.profile = {"error": f"{type(e).__name__}: {e}"}
        if out is None:
            t = time.perf_counter()
            out = self._model.forward(batch, kv, deltas)
            rec["host_s"] = time.perf_counter() - t
        self.records.append(rec)
        return out

    def _profiled(self, batch, kv, deltas):
        from torch.profiler import ProfilerActivity, profile

        sync()
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            out = self._model.forward(batch, kv, deltas)
            host = time.perf_counter() - t
            sync()
        wall = time.perf_counter() - t
        kernels = {}
        for e in prof.key_averages():
            if str(getattr(e, "device_type", "")).endswith("CUDA") and not getattr(e, "is_user_annotation", False):
                us = e.self_device_time_total
                if us > 0:
                    k = kernels.setdefault(e.key, [0.0, 0])
                    k[0] += us
                    k[1] += e.count
        groups = {}
        for name, (us, _) in kernels.items():
            low = name.lower()
            grp = ("bitdelta ops" if "bitdelta" in low or low.startswith("bd_") else  # bd_*: the popc kernels
                   "attention" if any(s in low for s in ("flash", "fmha", "attention", "efficient")) else
                   "cuBLAS GEMM/GEMV" if any(s in low for s in ("gemm", "gemv", "cutlass", "sm90", "nvjet", "cublas")) else
                   "other (norms, rope, gathers, elementwise)")
            groups[grp] = groups.get(grp, 0.0) + us / 1e3
        top = sorted(kernels.items(), key=lambda kv_: -kv_[1][0])[:8]
        self.profile = {"gpu_busy_ms": sum(v[0] for v in kernels.values()) / 1e3,
                        "kernels": sum(v[1] for v in kernels.values()), "host_enqueue_ms_profiled": host * 1e3,
                        "wall_ms_profiled": wall * 1e3, "by_group_ms": groups,
                        "top_kernels": [{"name": n[:120], "ms": v[0] / 1e3, "count": v[1]} for n, v in top],
                        "batch_tokens": sum(n for _, _, n in batch.seqs)}
        return out


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def run_workload(model, slots, tenants, args, *, arrivals=None, max_batch=None, new_tokens=None, deadline=None,
                 max_decode_steps=None, profile_step=None, terms=None, bw=None, label="") -> dict:
    """Serves ``len(tenants)`` requests (tenant names, None = base) and measures them.

    ``arrivals``: offsets in seconds (default: all at 0). Decode stops early at ``deadline`` or
    after ``max_decode_steps``; the rest is then extrapolated from the mean measured decode step.
    """
    new = new_tokens or args.new_tokens
    n_req = len(tenants)
    arrivals = arrivals or [0.0] * n_req
    max_batch = max_batch or n_req
    max_len = args.prompt_len + new
    per_seq = KVCache.bytes_per_sequence(model.num_layers, max_len, model.kv_heads, model.head_dim, model.dtype)
    probe = Probe(model)
    probe.profile_decode_step = profile_step
    if cuda():
        torch.cuda.reset_peak_memory_stats()
    engine = Engine(probe, slots, max_batch=max_batch, max_queue=n_req + 1, max_len=max_len,
                    kv_cache_mb=(per_seq * max_batch + 2**20) / 2**20, cuda_graphs=False if args.no_cuda_graphs else None)
    graphs = engine.graphs.stats() if engine.graphs is not None else None
    if graphs and label != "warm":
        log(f"{label}: {graphs['graphs']} CUDA graphs (batch buckets {graphs['batch_buckets']}, spans "
            f"{graphs['span_buckets']}) captured in {graphs['capture_s']:.2f}s")
    prompts = make_prompts(n_req, args.prompt_len, model.vocab_size, seed=len(tenants) + len(label))
    token_times: dict[int, list[float]] = {}
    arrival_at: dict[int, float] = {}
    reqs, steps = [], []
    order = sorted(range(n_req), key=lambda i: arrivals[i])
    truncated = None
    start = time.perf_counter()
    while True:
        now = time.perf_counter()
        while order and start + arrivals[order[0]] <= now:
            i = order.pop(0)
            times = []
            r = Request(prompt=prompts[i], tenant=tenants[i],
                        params=SamplingParams(max_tokens=new, temperature=0, ignore_eos=True),
                        on_event=lambda ev, times=times: times.append(time.perf_counter()) if ev.token is not None else None)
            engine.submit(r)
            token_times[r.id] = times
            arrival_at[r.id] = start + arrivals[i]
            reqs.append(r)
        if engine.running or engine.waiting:
            t = time.perf_counter()
            n_rec = len(probe.records)
            engine.step()
            te = time.perf_counter()
            if len(probe.records) > n_rec:
                steps.append({**probe.records[-1], "wall_s": te - t, "end": te})
            n_dec = sum(s["decode"] for s in steps)
            over_time = deadline is not None and te > deadline
            if (over_time or (max_decode_steps is not None and n_dec >= max_decode_steps)) and (engine.running or engine.waiting or order):
                truncated = "time budget" if over_time else f"{max_decode_steps} decode steps"
                break
        elif order:
            time.sleep(max(0.0, min(0.005, start + arrivals[order[0]] - time.perf_counter())))
        else:
            break
    remaining = max((new - len(r.output) for r in reqs), default=0) if truncated else 0
    for r in reqs:
        engine.cancel(r)
    engine.step()
    kv_bytes = engine.kv.k.numel() * engine.kv.k.element_size() * 2
    if graphs is not None:
        graphs["replays"] = engine.graphs.replays
    peak = torch.cuda.max_memory_allocated() if cuda() else None
    slots.on_ready = None
    del engine
    free_memory()

    dec = [s for s in steps if s["decode"]]
    firsts = [token_times[r.id][0] - arrival_at[r.id] for r in reqs if token_times[r.id]]
    itl = [b - a for r in reqs for a, b in zip(token_times[r.id], token_times[r.id][1:])]
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in (token_times[r.id] for r in reqs) if len(t) > 1]
    produced = sum(len(t) for t in token_times.values())
    end = max((t[-1] for t in token_times.values() if t), default=start)
    wall = end - start
    dec_time = sum(s["wall_s"] for s in dec)
    res = {"label": label, "requests": n_req, "max_batch": max_batch, "new_tokens": new, "prompt_len": args.prompt_len,
           "tokens": produced, "wall_s": wall, "tok_s": produced / wall if wall > 0 else None,
           "steps": len(steps), "decode_steps": len(dec), "prefill_steps": len(steps) - len(dec),
           "decode_tok_s": sum(s["tokens"] for s in dec) / dec_time if dec_time else None,
           "decode_step_ms_mean": 1e3 * dec_time / len(dec) if dec else None,
           "host_enqueue_ms_mean": 1e3 * sum(s.get("host_s", 0) for s in dec) / len(dec) if dec else None,
           "ttft_ms_p50": _ms(pct(firsts, 50)), "ttft_ms_p99": _ms(pct(firsts, 99)),
           "itl_ms_p50": _ms(pct(itl, 50)), "itl_ms_p99": _ms(pct(itl, 99)),
           "tpot_ms_p50": _ms(pct(tpot, 50)), "tpot_ms_p99": _ms(pct(tpot, 99)),
           "kv_cache_bytes": kv_bytes, "peak_allocated_bytes": peak, "truncated": truncated,
           "profile": probe.profile, "cuda_graphs": graphs}
    if truncated and dec:
        est = wall + remaining * dec_time / len(dec)
        res.update(extrapolated=True, remaining_steps=remaining, est_wall_s=est, est_tok_s=n_req * new / est)
    if terms and bw and dec:
        roof = sum(step_bytes(terms, s["tokens"], s["tenants"], s["ctx"]) for s in dec) / (bw * 1e9)
        res["roofline"] = {"decode_time_s": dec_time, "roofline_time_s": roof, "pct": 100 * roof / dec_time,
                           "roofline_tok_s": sum(s["tokens"] for s in dec) / roof,
                           "bytes_per_step_mean": sum(step_bytes(terms, s["tokens"], s["tenants"], s["ctx"]) for s in dec) / len(dec)}
    return res


def _ms(v):
    return None if v is None else 1e3 * v


def summary_line(mode, n, r) -> str:
    tok = r.get("est_tok_s") or r.get("tok_s") or 0
    roof = r.get("roofline", {}).get("pct")
    return (f"{mode:8s} N={n:<3d} {tok:9.1f} tok/s{' (extrap.)' if r.get('extrapolated') else ''}"
            f"  decode step {r.get('decode_step_ms_mean') or 0:8.1f} ms (host {r.get('host_enqueue_ms_mean') or 0:6.1f})"
            f"  TTFT p50/p99 {r.get('ttft_ms_p50') or 0:.0f}/{r.get('ttft_ms_p99') or 0:.0f} ms"
            f"  ITL p50/p99 {r.get('itl_ms_p50') or 0:.1f}/{r.get('itl_ms_p99') or 0:.1f} ms"
            + (f"  {roof:.1f}% of roofline" if roof else ""))


# ---------------------------------------------------------------------------------- merged baseline


def merged_schedule(n: int, t_req: float, ttft1: float, resident: int, load_times: list[float]) -> dict:
    """Merged dense model per tenant, one request each (every request is a distinct tenant).

    Policy: the GPU serves one merged model at a time (its single request at batch 1: prefill,
    then decode; measured as the base alone at batch 1). The first ``resident`` models are on the
    GPU already; model i >= resident is copied in over one link, one copy at a time, into the
    buffer of model i - resident once that one has finished, overlapping the models running
    meanwhile (double buffering, the best case for this baseline). ``load_times[i]`` is model i's
    copy time (pinned host -> GPU, or disk -> host -> GPU).
    """
    end_prev, link_free, ends, starts = 0.0, 0.0, [], []
    for i in range(n):
        if i < resident:
            ready = 0.0
        else:
            buf_free = ends[i - resident]
            load_start = max(link_free, buf_free)
            link_free = ready = load_start + load_times[i]
        s = max(end_prev, ready)
        starts.append(s)
        end_prev = s + t_req
        ends.append(end_prev)
    ttft = [s + ttft1 for s in starts]
    return {"total_s": ends[-1], "ttft_ms_p50": 1e3 * pct(ttft, 50), "ttft_ms_p99": 1e3 * pct(ttft, 99),
            "stall_s": ends[-1] - n * t_req}


def measure_full_cold(model: DeltaLlama, args, scratch: Path) -> dict:
    """Writes the base as a full fp16/bf16 fine-tune (HF key names), drops its page cache, then times
    request -> weights read from disk onto the GPU -> first token; also one pinned host -> GPU copy
    of the same size (the merged baseline's swap)."""
    out = {}
    path = scratch / "full-finetune"
    path.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    tensors = {f"{n}.weight": w.cpu() for n, w in model.weights.items()}
    tensors.update({n: p.cpu() for n, p in model.params1d.items()})
    write_sharded(tensors, path, "model", 5_000_000_000, {"format": "pt"})
    del tensors
    drop_page_cache(path)
    nbytes = dir_bytes(path)
    out.update(bytes=nbytes, write_s=time.perf_counter() - t)
    log(f"full fine-tune written: {nbytes / 1e9:.2f} GB in {out['write_s']:.1f}s; page cache dropped")
    dev = model.device
    try:
        from safetensors.torch import load_file
    except ImportError:  # the repo's own reader (positioned reads) does the same work
        load_file = None
    sync()
    t0 = time.perf_counter()
    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        if load_file is not None:
            weights.update(load_file(str(f), device=str(dev)))
        else:
            from bitdelta.safetensors_io import SafetensorsCheckpoint

            ck = SafetensorsCheckpoint.open(f)
            weights.update({k: ck.get(k).to(dev) for k in ck.keys()})
    sync()
    t1 = time.perf_counter()
    full = DeltaLlama(model.config, {n: weights[f"{n}.weight"] for n in model.weights},
                      {n: weights[n] for n in model.params1d}, model.inv_freq, 1.0, False, model.dtype, dev)
    fslots = DeltaSlots(full, max_gpu_deltas=1)
    kv_mb = KVCache.bytes_per_sequence(full.num_layers, args.prompt_len + 2, full.kv_heads, full.head_dim, full.dtype) / 2**20
    # One token, no decode step: no CUDA graphs to capture (their capture would count as load time).
    engine = Engine(full, fslots, max_batch=1, max_len=args.prompt_len + 2, kv_cache_mb=kv_mb + 1, cuda_graphs=False)
    first = []
    engine.submit(Request(prompt=make_prompts(1, args.prompt_len, model.vocab_size, 7)[0],
                          params=SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
                          on_event=lambda ev: first.append(time.perf_counter()) if ev.token is not None else None))
    while not first and (engine.running or engine.waiting):
        engine.step()
    if not first:
        raise RuntimeError("the full fine-tune's request ended without a token")
    t2 = first[0]
    out.update(read_s=t1 - t0, read_gbps=nbytes / (t1 - t0) / 1e9, first_token_after_load_s=t2 - t1,
               cold_start_s=t2 - t0, reader="safetensors.load_file" if load_file else "bitdelta reader")
    log(f"full fine-tune cold start: {out['cold_start_s']:.2f}s (disk -> GPU {out['read_s']:.2f}s at "
        f"{out['read_gbps']:.2f} GB/s, then first token {1e3 * out['first_token_after_load_s']:.0f} ms)")
    fslots.on_ready = None
    del engine, full, weights
    release_slots(fslots)
    shutil.rmtree(path, ignore_errors=True)
    # One pinned host -> GPU copy of a whole model (what a swap costs).
    nb = model_bytes(model)
    t = time.perf_counter()
    host = torch.empty(nb, dtype=torch.uint8, pin_memory=cuda())
    host[:: 4096] = 1  # touch the pages
    alloc_s = time.perf_counter() - t
    dst = torch.empty(nb, dtype=torch.uint8, device=dev)
    times = []
    for _ in range(2):
        sync()
        t = time.perf_counter()
        dst.copy_(host, non_blocking=True)
        sync()
        times.append(time.perf_counter() - t)
    out.update(h2d_bytes=nb, h2d_s=min(times), h2d_gbps=nb / min(times) / 1e9, pinned_alloc_s=alloc_s,
               pinned=cuda())
    log(f"pinned host -> GPU copy of {nb / 1e9:.2f} GB: {out['h2d_s']:.2f}s ({out['h2d_gbps']:.1f} GB/s)")
    del host, dst
    free_memory()
    return out


def meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------- main run


def guarded(result: dict, what: str, fn) -> None:
    """Runs one phase; a failure is logged and recorded, and the run goes on with the next phase."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (a benchmark reports what it could measure)
        import traceback

        log(f"FAILED {what}: {type(e).__name__}: {e}")
        result.setdefault("errors", []).append({"phase": what, "error": f"{type(e).__name__}: {e}",
                                                "traceback": traceback.format_exc()[-3000:]})
    free_memory()  # after the except block, whose traceback kept the failed phase's tensors alive


def checkpoint(result: dict, args) -> None:
    """Writes what is measured so far (a run killed at its time limit still leaves its numbers)."""
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "serve.json").write_text(json.dumps({**result, "log": LOG}, indent=1, default=str))


def main_run(args) -> dict:
    global ON_GPU
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    ON_GPU = dev.type == "cuda"
    if args.smoke:
        shape, dtype = dict(SMOKE), torch.float32
    else:
        shape, dtype = dict(LLAMA2_7B), torch.bfloat16
    if args.layers:
        shape["layers"] = args.layers
    deadline = T0 + args.budget_s
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)",
            "torch": torch.__version__, "triton": triton_version,
            "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "shape": shape, "dtype": str(dtype),
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "bitdelta": __version__,
            "host_mem_available": meminfo_available(), "cpu_count": os.cpu_count()}
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        meta.update(gpu_total_bytes=total, gpu_free_at_start=free)
    log(f"device {meta['device']}; torch {meta['torch']}; shape {shape}")
    bw = copy_bandwidth(dev)
    meta["copy_gbps"] = bw
    log(f"copy bandwidth {bw:.0f} GB/s (device copy, bytes read + written)")

    model = build_base(shape, dtype, dev)
    base_bytes = model_bytes(model)
    meta["base_bytes"] = base_bytes
    log(f"base built: {base_bytes / 1e9:.2f} GB")

    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="bitdelta-serve-"))
    scratch.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "runs": [], "skipped": []}
    try:
        # ---- artifacts: a few distinct ones (tenants share them on disk, not on the GPU) + one never seen
        paths, art = [], {"distinct": args.distinct}
        t = time.perf_counter()
        for i in range(args.distinct + 1):
            d = synthetic_delta(model, seed=i)
            p = scratch / (f"delta-{i}" if i < args.distinct else "delta-cold")
            d.save_pretrained(p)
            paths.append(p)
            del d
        art.update(write_s=time.perf_counter() - t, bytes=dir_bytes(paths[0]))
        drop_page_cache(paths[-1])
        result["artifacts"] = art
        log(f"wrote {args.distinct} + 1 delta artifacts of {art['bytes'] / 1e9:.3f} GB each in {art['write_s']:.1f}s")

        # ---- one slot's size and the roofline terms, from a one-slot pool
        probe_slots = DeltaSlots(model, max_gpu_deltas=1)
        slot_bytes = sum(v.numel() * v.element_size() for pool in probe_slots.pools.values()
                         for v in pool.values() if isinstance(v, torch.Tensor))
        slot_bytes += sum(t_.numel() * t_.element_size() for t_ in probe_slots.tables.values()) // 2
        terms = roofline_terms(model, probe_slots)

        # ---- full fine-tune cold start + pinned swap copy (needs a model's worth of free GPU memory: before the pools)
        if not args.skip_cold:
            # A base forward first, so the full model's first token pays no one-time library start-up.
            run_workload(model, probe_slots, [None], args, new_tokens=2, label="warm")
            guarded(result, "full fine-tune cold start", lambda: result.__setitem__(
                "full_cold", measure_full_cold(model, args, scratch)))
            checkpoint(result, args)
        else:
            result["skipped"].append("full fine-tune cold start / pinned copy (--skip-cold)")
        release_slots(probe_slots)
        del probe_slots
        max_len = args.prompt_len + args.new_tokens
        kv_seq = KVCache.bytes_per_sequence(model.num_layers, max_len, model.kv_heads, model.head_dim, dtype)
        if dev.type == "cuda":
            free_now = torch.cuda.mem_get_info()[0]
            nmax = int((free_now - args.reserve_gib * GiB) // (slot_bytes + kv_seq))
        else:
            free_now, nmax = None, 4
        meta.update(slot_bytes=slot_bytes, kv_bytes_per_seq=kv_seq, nmax=nmax, free_before_pools=free_now,
                    roofline_terms=terms)
        log(f"one delta slot {slot_bytes / 1e9:.3f} GB, KV per sequence {kv_seq / 1e9:.3f} GB: "
            f"largest N that fits = {nmax} (reserving {args.reserve_gib} GiB)")
        ns = []
        for tok in args.ns.split(","):
            n = nmax if tok.strip() == "max" else int(tok)
            if n > nmax:
                log(f"N={n} does not fit (largest {nmax}); skipped")
                result["skipped"].append(f"N={n}: does not fit (largest N {nmax})")
                continue
            if n not in ns:
                ns.append(n)
        ns.sort()
        pn = min(args.poisson_n, nmax)
        n_slots = max(ns + ([pn] if args.poisson_rate > 0 else []) + [1])
        slots = DeltaSlots(model, max_gpu_deltas=n_slots, max_cpu_deltas=n_slots + args.distinct + 2)
        real_prepare, memo = slots.prepare, {}
        shared = {str(p) for p in paths[:-1]}

        def prepare(delta, name="?"):
            # Tenants sharing an artifact share its prepared host copy; each still gets its own slot.
            key = delta.info.get("artifact_path")
            if key not in shared:
                return real_prepare(delta, name)
            if key not in memo:
                memo[key] = real_prepare(delta, name)
            return memo[key]

        slots.prepare = prepare
        t = time.perf_counter()
        loaded = [load_delta(p) for p in paths[:-1]]
        warm_load_s = (time.perf_counter() - t) / len(loaded)
        tenants = [f"tenant-{i:03d}" for i in range(n_slots)]
        for i, name in enumerate(tenants):
            slots.register(name, paths[i % args.distinct], delta=loaded[i % args.distinct])
            assert slots.load(name) is not None
        sync()
        del loaded
        meta.update(n_slots=n_slots, tenants_install_s=time.perf_counter() - t, warm_artifact_load_s=warm_load_s)
        log(f"{n_slots} tenants registered and installed in {meta['tenants_install_s']:.1f}s "
            f"({warm_load_s:.2f}s per warm artifact load)")

        # ---- merged baseline's measured piece: one merged model serving one request (= base at batch 1)
        single = {}

        def merged_piece():
            run_workload(model, slots, [None], args, new_tokens=4, label="warm")
            single.update(run_workload(model, slots, [None], args, terms=terms, bw=bw, label="base-b1"))
            single["mode"], single["n"] = "base-b1", 1
            result["runs"].append(single)
            log(summary_line("merged1", 1, single))

        guarded(result, "merged model, one request at batch 1", merged_piece)

        # ---- per N: bitdelta, base alone, unfused reference-style
        for n in ns:
            for mode in ("base", "bitdelta", "unfused"):  # the cheap one first: a long run may use up the budget
                if mode == "unfused" and args.skip_reference:
                    continue
                left = deadline - time.perf_counter()
                if left < 10:
                    result["skipped"].append(f"{mode} N={n}: time budget")
                    log(f"skip {mode} N={n}: time budget")
                    continue
                names = tenants[:n] if mode != "base" else [None] * n

                def one(mode=mode, n=n, names=names):
                    slots.linear_fn = unfused_linear if mode == "unfused" else None
                    try:  # warm-up: compiles every kernel shape of the run; profiles its second full-batch decode step
                        w = run_workload(model, slots, names, args, new_tokens=3 if mode == "unfused" else 6,
                                         label="warm", profile_step=1 if args.profile and mode != "unfused" else None,
                                         deadline=deadline)
                        r = run_workload(model, slots, names, args, deadline=deadline - args.reserve_tail_s,
                                         terms=terms, bw=bw, label=f"{mode}-{n}",
                                         max_decode_steps=args.ref_steps if mode == "unfused" else None)
                    finally:
                        slots.linear_fn = None
                    r.update(mode=mode, n=n, delta_bytes=n * slot_bytes if mode != "base" else 0, base_bytes=base_bytes,
                             profile=w["profile"])
                    result["runs"].append(r)
                    log(summary_line(mode, n, r))

                guarded(result, f"{mode} N={n}", one)
                checkpoint(result, args)

        # ---- cold start of a never-loaded delta (page cache dropped), evicting an idle tenant's slot
        if not args.skip_cold and deadline - time.perf_counter() > 5:
            # Every kernel shape a one-request step uses is compiled by a request of a resident tenant first.
            run_workload(model, slots, tenants[:1], args, new_tokens=2, label="warm")
            guarded(result, "delta cold start", lambda: result.__setitem__(
                "delta_cold", delta_cold_start(model, slots, paths[-1], args)))
            # Back to every tenant resident: the cold one leaves, the one it evicted returns.
            if slots.get("cold-tenant") is not None:
                slots.unregister("cold-tenant")
            for name in tenants:
                if slots.get(name).slot is None:
                    slots.load(name)
            checkpoint(result, args)
        # ---- Poisson arrivals at a fixed rate
        if args.poisson_rate > 0:
            g = torch.Generator().manual_seed(5)
            nreq = args.poisson_requests or 2 * pn
            gaps = torch.empty(nreq).exponential_(args.poisson_rate, generator=g).tolist()
            arr = [sum(gaps[:i]) for i in range(nreq)]
            for mode in ("bitdelta", "base"):
                if deadline - time.perf_counter() < arr[-1] + 10:
                    result["skipped"].append(f"poisson {mode}: time budget")
                    continue
                names = [tenants[i % pn] for i in range(nreq)] if mode == "bitdelta" else [None] * nreq

                def one(mode=mode, names=names):
                    r = run_workload(model, slots, names, args, arrivals=arr, max_batch=pn, terms=terms, bw=bw,
                                     deadline=deadline - args.reserve_tail_s, label=f"poisson-{mode}")
                    r.update(mode=f"poisson-{mode}", n=pn, rate=args.poisson_rate)
                    result["runs"].append(r)
                    log(f"poisson {args.poisson_rate}/s x {nreq} over {pn} tenants: " + summary_line(mode, pn, r))

                guarded(result, f"poisson {mode}", one)
                checkpoint(result, args)

        # ---- merged per tenant, modelled from the measured pieces
        if single:
            result["merged"] = merged_model(result, ns, meta, single)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def delta_cold_start(model, slots, path: Path, args) -> dict:
    drop_page_cache(path)
    engine = Engine(model, slots, max_batch=1, max_len=args.prompt_len + 2,
                    kv_cache_mb=KVCache.bytes_per_sequence(model.num_layers, args.prompt_len + 2, model.kv_heads,
                                                           model.head_dim, model.dtype) / 2**20 + 1,
                    cuda_graphs=False)  # one token: no decode step
    first = []
    sync()
    t0 = time.perf_counter()
    d = load_delta(path)  # what registering a new delta reads from disk (validated)
    t1 = time.perf_counter()
    slots.register("cold-tenant", path, delta=d)  # base check + host copy (pinned on CUDA)
    t2 = time.perf_counter()
    req = engine.submit(Request(prompt=make_prompts(1, args.prompt_len, model.vocab_size, 9)[0], tenant="cold-tenant",
                                params=SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
                                on_event=lambda ev: first.append(time.perf_counter()) if ev.token is not None else None))
    while not first and (engine.running or engine.waiting):
        engine.step()
    if not first:
        raise RuntimeError(f"the cold tenant's request ended without a token: {req.finish_reason}")
    t3 = first[0]
    nbytes = dir_bytes(path)
    out = {"bytes": nbytes, "read_validate_s": t1 - t0, "read_gbps": nbytes / (t1 - t0) / 1e9,
           "register_s": t2 - t1, "install_prefill_first_token_s": t3 - t2, "cold_start_s": t3 - t0,
           "evictions": slots.totals["evictions"]}
    log(f"delta cold start: {out['cold_start_s']:.2f}s (read+validate {out['read_validate_s']:.2f}s at "
        f"{out['read_gbps']:.2f} GB/s, base check + host copy {out['register_s']:.2f}s, slot install + prefill "
        f"+ first token {1e3 * out['install_prefill_first_token_s']:.0f} ms)")
    slots.on_ready = None
    del engine
    free_memory()
    return out


def merged_model(result: dict, ns: list[int], meta: dict, single: dict) -> dict:
    full = result.get("full_cold") or {}
    nb = meta["base_bytes"]
    t_req, ttft1 = single["wall_s"], (single["ttft_ms_p50"] or 0) / 1e3
    h2d_s = full.get("h2d_s") or nb / (25e9)
    disk_gbps = full.get("read_gbps") or (result.get("delta_cold") or {}).get("read_gbps") or 2.0
    per_seq = meta["kv_bytes_per_seq"]
    gpu = meta.get("gpu_free_at_start") or 0
    resident = max(1, int((gpu - 2 * GiB) // (nb + per_seq))) if gpu else 1
    host = meta.get("host_mem_available") or 0
    in_host = max(0, int((host - 8 * GiB) // nb))
    out = {"measured": {"t_request_s": t_req, "ttft_ms": 1e3 * ttft1, "itl_ms_p50": single["itl_ms_p50"],
                        "itl_ms_p99": single["itl_ms_p99"], "h2d_s": h2d_s, "h2d_measured": bool(full.get("h2d_s")),
                        "disk_gbps": disk_gbps},
           "resident_models": resident, "host_models": in_host, "per_n": {}}
    for n in ns:
        opt = merged_schedule(n, t_req, ttft1, resident, [h2d_s] * n)
        loads = [h2d_s if i < resident + in_host else nb / (disk_gbps * 1e9) + h2d_s for i in range(n)]
        here = merged_schedule(n, t_req, ttft1, resident, loads)
        tokens = n * single["new_tokens"]
        out["per_n"][n] = {"all_in_host_ram": {**opt, "tok_s": tokens / opt["total_s"]},
                           "this_machine": {**here, "tok_s": tokens / here["total_s"]},
                           "itl_ms_p50": single["itl_ms_p50"], "itl_ms_p99": single["itl_ms_p99"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="1,8,32,64", help="tenant counts; 'max' = the largest N that fits")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for quick runs (default: the model's)")
    ap.add_argument("--distinct", type=int, default=4, help="distinct delta artifacts written to disk")
    ap.add_argument("--skip-merged", action="store_true", help="no merged-per-tenant model in the tables")
    ap.add_argument("--skip-reference", action="store_true", help="no unfused reference-style runs")
    ap.add_argument("--skip-cold", action="store_true", help="no cold-start and pinned-copy measurements")
    ap.add_argument("--ref-steps", type=int, default=16, help="decode steps measured for the unfused mode (rest extrapolated)")
    ap.add_argument("--poisson-rate", type=float, default=4.0, help="requests/s of the Poisson run (0 = none)")
    ap.add_argument("--poisson-n", type=int, default=32, help="tenants (and engine batch) of the Poisson run")
    ap.add_argument("--poisson-requests", type=int, default=None, help="requests of the Poisson run (default 2 x tenants)")
    ap.add_argument("--profile", type=int, default=1, help="1: profile one decode step of each warm-up run; 0: off")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole run")
    ap.add_argument("--reserve-tail-s", type=float, default=20.0, help="budget kept for the phases after a run")
    ap.add_argument("--reserve-gib", type=float, default=3.0, help="GPU memory kept free when sizing the largest N")
    ap.add_argument("--scratch", default=None, help="where artifacts are written (default: a temp dir, removed)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="output directory (default $OUT)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, end to end in under a minute")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly (default: CUDA-graph decode steps on GPU)")
    ap.add_argument("--report", nargs="+", default=None, help="serve.json files/dirs to combine into table + plot")
    ap.add_argument("--docs", default=None, help="with --report: markdown file whose serve:begin/end block is replaced")
    ap.add_argument("--docs-block", default="serve", help="with --docs: the block's marker name (and the plot's file name)")
    args = ap.parse_args()
    if args.report:
        result = merge_results(args.report)
        out = Path(args.out or ".")
        write_outputs(result, out, args.docs, args.docs_block)
        print(short_table(result))
        return
    if args.smoke:
        args.ns = "1,2" if args.ns == ap.get_default("ns") else args.ns
        args.prompt_len, args.new_tokens, args.ref_steps = min(args.prompt_len, 8), min(args.new_tokens, 6), 3
        args.poisson_rate, args.poisson_n, args.poisson_requests = args.poisson_rate and 40.0, 2, 4
        args.budget_s, args.distinct = min(args.budget_s, 120), 2
    if args.smoke:
        torch.set_num_threads(1)  # tiny shapes: threads only contend
    torch.manual_seed(0)
    result = main_run(args)
    if args.skip_merged:
        result.pop("merged", None)
    result["log"] = LOG
    if args.out:
        write_outputs(result, Path(args.out))
        Path(args.out, "serve.log").write_text("\n".join(LOG) + "\n")
    print("\n" + short_table(result))


if __name__ == "__main__":
    main()
