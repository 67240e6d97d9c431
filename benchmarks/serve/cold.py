"""Cold starts: a never-loaded delta on disk to its first token, against a full fp16 fine-tune read
from disk to its first token, and one pinned host -> GPU copy of a whole model (a merged model's swap).
Page caches are dropped first, so the disk is read.

    out = delta_cold_start(run, model, slots, path)       # register (read, checks, host copy), first token
    out = full_finetune_cold_start(run, model, scratch)   # write, read to GPU, first token, pinned copy
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from bitdelta.safetensors_io import write_sharded
from bitdelta.serving.engine import Engine, Request, SamplingParams
from bitdelta.serving.model import DeltaLlama
from bitdelta.serving.slots import DeltaSlots

from .._common import dir_bytes, drop_page_cache, model_bytes
from .setup import release_slots
from .workload import kv_bytes_per_seq, make_prompts


def one_token_engine(run, model, slots) -> Engine:
    """An engine for one request of one new token: no decode step, so no CUDA graphs to capture
    (their capture would count as load time)."""
    prompt_len = run.args.prompt_len
    return Engine(model, slots, max_batch=1, max_len=prompt_len + 2,
                  kv_cache_mb=kv_bytes_per_seq(model, prompt_len + 2) / 2**20 + 1, cuda_graphs=False)


def first_token_time(run, engine, prompt_seed: int, tenant=None) -> float:
    """Submits one request and steps ``engine`` until its first token: that token's time."""
    first = []
    prompt = make_prompts(1, run.args.prompt_len, engine.model.vocab_size, prompt_seed)[0]

    def on_event(ev):
        if ev.token is not None:
            first.append(time.perf_counter())

    req = engine.submit(Request(prompt=prompt,
                                tenant=tenant, params=SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
                                on_event=on_event))
    while not first and (engine.running or engine.waiting):
        engine.step()
    if not first:
        raise RuntimeError(f"the request of {tenant or 'the base'} ended without a token: {req.finish_reason}")
    return first[0]


def delta_cold_start(run, model, slots, path: Path) -> dict:
    """Times a request for a delta on disk: registration as a server does it (read into pinned memory on
    CUDA and validated, base check, host copy: phases from ``slots.last_load``), then the engine's
    install into a slot, the prefill and the first token."""
    drop_page_cache(path)
    engine = one_token_engine(run, model, slots)  # before the clock: a running server has its engine
    run.dev.sync()
    t0 = time.perf_counter()
    slots.register("cold-tenant", path)  # read + validate, base check, host copy (pinned on CUDA)
    t2 = time.perf_counter()
    phases = dict(slots.last_load)
    t1 = t0 + phases["read_validate_s"]
    t3 = first_token_time(run, engine, 9, tenant="cold-tenant")
    nbytes = dir_bytes(path)
    out = {"bytes": nbytes, "read_validate_s": t1 - t0, "read_gbps": nbytes / (t1 - t0) / 1e9,
           "register_s": t2 - t1, "base_check_s": phases.get("base_check_s"), "host_copy_s": phases.get("host_copy_s"),
           "read_threads": slots.read_threads, "install_prefill_first_token_s": t3 - t2, "cold_start_s": t3 - t0,
           "beyond_read_s": t3 - t1, "evictions": slots.totals["evictions"]}
    run.log(f"delta cold start: {out['cold_start_s']:.2f}s (read+validate {out['read_validate_s']:.2f}s at "
            f"{out['read_gbps']:.2f} GB/s, base check + host copy {out['register_s']:.2f}s [base check "
            f"{1e3 * out['base_check_s']:.0f} ms, host copy {1e3 * out['host_copy_s']:.0f} ms], slot install + prefill "
            f"+ first token {1e3 * out['install_prefill_first_token_s']:.0f} ms; {out['beyond_read_s']:.2f}s beyond "
            "the read)")
    slots.on_ready = None
    del engine
    run.dev.free_memory()
    return out


def full_finetune_cold_start(run, model, scratch: Path) -> dict:
    """Writes the base as a full fp16/bf16 fine-tune (HF key names), drops its page cache, then times
    request -> weights read from disk onto the GPU -> first token; also one pinned host -> GPU copy
    of the same size (the merged baseline's swap)."""
    path = scratch / "full-finetune"
    out = write_full_finetune(run, model, path)
    t0 = time.perf_counter()
    weights, reader = read_to_device(run, path)
    t1 = time.perf_counter()
    full = DeltaLlama(model.config, {n: weights[f"{n}.weight"] for n in model.weights},
                      {n: weights[n] for n in model.params1d}, model.inv_freq, 1.0, False, model.dtype, model.device)
    fslots = DeltaSlots(full, max_gpu_deltas=1)
    engine = one_token_engine(run, full, fslots)
    t2 = first_token_time(run, engine, 7)
    out.update(read_s=t1 - t0, read_gbps=out["bytes"] / (t1 - t0) / 1e9, first_token_after_load_s=t2 - t1,
               cold_start_s=t2 - t0, reader=reader)
    run.log(f"full fine-tune cold start: {out['cold_start_s']:.2f}s (disk -> GPU {out['read_s']:.2f}s at "
            f"{out['read_gbps']:.2f} GB/s, then first token {1e3 * out['first_token_after_load_s']:.0f} ms)")
    fslots.on_ready = None
    del engine, full, weights
    release_slots(run.dev, fslots)
    shutil.rmtree(path, ignore_errors=True)
    out.update(pinned_copy(run, model))
    return out


def write_full_finetune(run, model, path: Path) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    tensors = {f"{n}.weight": w.cpu() for n, w in model.weights.items()}
    tensors.update({n: p.cpu() for n, p in model.params1d.items()})
    write_sharded(tensors, path, "model", 5_000_000_000, {"format": "pt"})
    del tensors
    drop_page_cache(path)
    out = {"bytes": dir_bytes(path), "write_s": time.perf_counter() - t}
    run.log(f"full fine-tune written: {out['bytes'] / 1e9:.2f} GB in {out['write_s']:.1f}s; page cache dropped")
    return out


def read_to_device(run, path: Path) -> tuple[dict, str]:
    """Every tensor of the safetensors files under ``path``, on the run's device, and the reader used."""
    try:
        from safetensors.torch import load_file
    except ImportError:  # the repo's own reader (positioned reads) does the same work
        load_file = None
    dev = run.dev.device
    run.dev.sync()
    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        if load_file is not None:
            weights.update(load_file(str(f), device=str(dev)))
        else:
            from bitdelta.safetensors_io import SafetensorsCheckpoint

            ck = SafetensorsCheckpoint.open(f)
            weights.update({k: ck.get(k).to(dev) for k in ck.keys()})
    run.dev.sync()
    return weights, "safetensors.load_file" if load_file else "bitdelta reader"


def pinned_copy(run, model) -> dict:
    """One pinned host -> GPU copy of a whole model (what a swap costs), best of two."""
    nb = model_bytes(model)
    t = time.perf_counter()
    host = torch.empty(nb, dtype=torch.uint8, pin_memory=run.dev.on_gpu)
    host[:: 4096] = 1  # touch the pages
    alloc_s = time.perf_counter() - t
    dst = torch.empty(nb, dtype=torch.uint8, device=run.dev.device)
    times = []
    for _ in range(2):
        run.dev.sync()
        t = time.perf_counter()
        dst.copy_(host, non_blocking=True)
        run.dev.sync()
        times.append(time.perf_counter() - t)
    out = {"h2d_bytes": nb, "h2d_s": min(times), "h2d_gbps": nb / min(times) / 1e9, "pinned_alloc_s": alloc_s,
           "pinned": run.dev.on_gpu}
    run.log(f"pinned host -> GPU copy of {nb / 1e9:.2f} GB: {out['h2d_s']:.2f}s ({out['h2d_gbps']:.1f} GB/s)")
    del host, dst
    run.dev.free_memory()
    return out
