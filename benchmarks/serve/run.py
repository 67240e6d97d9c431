"""One serving benchmark run, phase by phase: device and base, artifacts, the full fine-tune's cold
start, the tenants' pool, the merged model's piece, per N the three modes, the delta cold start,
Poisson arrivals, the Zipf-tenant run, and the merged-per-tenant model. Returns the result serve.json holds.

    result = main_run(args, RunLog())
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bitdelta import __version__

from .._common import LLAMA2_7B, SMOKE, BenchDevice, meminfo_available
from .cold import full_finetune_cold_start
from .context import BenchRun, Served
from .measure import run_workload
from .merged import merged_model
from .modes import cold_start_run, merged_piece, per_n_runs, poisson_runs
from .setup import build_served, install_tenants, largest_n, release_slots, size_slot, write_artifacts
from .workload import tenant_counts
from .zipf import zipf_run


def main_run(args, log) -> dict:
    dev = BenchDevice("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    shape, dtype = (dict(SMOKE), torch.float32) if args.smoke else (dict(LLAMA2_7B), torch.bfloat16)
    if args.layers:
        shape["layers"] = args.layers
    meta = run_meta(args, dev, shape, dtype)
    run = BenchRun(args, dev, log, log.t0 + args.budget_s, {"meta": meta, "runs": [], "skipped": []})
    log(f"device {meta['device']}; torch {meta['torch']}; shape {shape}")
    served = build_served(run, shape, dtype)
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="bitdelta-serve-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        write_artifacts(run, served, scratch)
        before_pools(run, served, scratch)
        ns, pn = plan_tenants(run, served)
        single = merged_piece(run, served)
        per_n_runs(run, served, ns)
        if not args.skip_cold and run.left_s() > 5:
            cold_start_run(run, served)
        if args.poisson_rate > 0:
            poisson_runs(run, served, pn)
        if args.zipf_deltas > 0:  # last: it releases the tenants' pool for its own
            run.guarded("zipf", lambda: zipf_run(run, served))
            run.checkpoint()
        if single:
            run.result["merged"] = merged_model(run.result, ns, meta, single)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return run.result


def run_meta(args, dev: BenchDevice, shape: dict, dtype) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {"device": torch.cuda.get_device_name() if dev.on_gpu else "cpu (smoke)",
            "torch": torch.__version__, "triton": triton_version,
            "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "shape": shape, "dtype": str(dtype),
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "bitdelta": __version__,
            "host_mem_available": meminfo_available(), "cpu_count": os.cpu_count()}
    if dev.on_gpu:
        free, total = torch.cuda.mem_get_info()
        meta.update(gpu_total_bytes=total, gpu_free_at_start=free)
    return meta


def before_pools(run: BenchRun, served: Served, scratch: Path) -> None:
    """One slot's size and the roofline terms, then the full fine-tune's cold start and pinned swap
    copy (they need a model's worth of free GPU memory: before the pools)."""
    probe = size_slot(served)
    if not (run.args.skip_cold or run.args.skip_full_cold):
        # A base forward first, so the full model's first token pays no one-time library start-up.
        run_workload(run, served.model, probe, [None], new_tokens=2, label="warm")
        run.guarded("full fine-tune cold start", lambda: run.result.__setitem__(
            "full_cold", full_finetune_cold_start(run, served.model, scratch)))
        run.checkpoint()
    else:
        run.skip("full fine-tune cold start / pinned copy (--skip-cold or --skip-full-cold)")
    release_slots(run.dev, probe)


def plan_tenants(run: BenchRun, served: Served) -> tuple[list[int], int]:
    """The tenant counts to measure and the Poisson run's tenants; installs that many tenants."""
    args = run.args
    nmax = largest_n(run, served)
    ns, skipped = tenant_counts(args.ns, nmax)
    for note in skipped:
        run.log(f"{note.split(':')[0]} does not fit (largest {nmax}); skipped")
        run.skip(note)
    pn = min(args.poisson_n, nmax)
    install_tenants(run, served, max(ns + ([pn] if args.poisson_rate > 0 else []) + [1]))
    return ns, pn
