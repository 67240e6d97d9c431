"""Per-step records of an engine run, taken through the engine's ``wrap_forward`` hook: tokens,
sequences, decode or not, distinct tenants, cache rows read and host time of every forward; on a
GPU, one chosen decode step is run under the torch profiler, its kernels grouped by part.

    rec = StepRecorder(dev, profile_decode_step=1, full_batch=32)   # the 2nd decode step of all 32
    engine = Engine(model, slots, ..., wrap_forward=rec)
    engine.step(); rec.of(engine.read_batch)   # {"tokens", "seqs", "decode", "tenants", "ctx", "host_s"}

A step may read the logits of a forward launched by the step before (decode steps launched ahead,
bitdelta.serving.lookahead), so records are looked up by the batch the engine says it read.
"""

from __future__ import annotations

import time


class StepRecorder:
    def __init__(self, dev, profile_decode_step: int | None = None, full_batch: int | None = None):
        self.dev = dev
        self.profile_decode_step = profile_decode_step  # the n-th decode step (0 = first) to profile
        # with full_batch, only decode steps of that many sequences count: a profile "at batch N"
        # is of a step that holds all N (in a burst, early requests decode beside later prompts)
        self.full_batch = full_batch
        self.records: list[dict] = []
        self.profile: dict | None = None
        self._by_batch: dict[int, dict] = {}  # id(batch) -> its record, until a step reads it

    def __call__(self, forward, batch):
        decode = not batch.has_prompt
        rec = {"tokens": sum(n for _, _, n in batch.seqs), "seqs": len(batch.seqs), "decode": decode,
               "tenants": len({s for s in batch.seq_delta_slots if s >= 0}),
               "ctx": sum(start for _, start, n in batch.seqs if n == 1)}  # cache rows read besides the new token
        counted = decode and (self.full_batch is None or rec["seqs"] == self.full_batch)
        rec["counted"] = counted
        n_dec = sum(r["counted"] for r in self.records)
        out = None
        if counted and n_dec == self.profile_decode_step and self.dev.on_gpu:
            try:
                out = self._profiled(forward, batch)
            except Exception as e:  # noqa: BLE001 (the profile is optional; the step is re-run plainly)
                self.profile = {"error": f"{type(e).__name__}: {e}"}
        if out is None:
            t = time.perf_counter()
            out = forward()
            rec["host_s"] = time.perf_counter() - t
        self.records.append(rec)
        self._by_batch[id(batch)] = rec
        return out

    def of(self, batch) -> dict | None:
        """The record of the forward over ``batch`` (once: it is forgotten here after)."""
        return self._by_batch.pop(id(batch), None) if batch is not None else None

    def _profiled(self, forward, batch):
        from torch.profiler import ProfilerActivity, profile

        self.dev.sync()
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            out = forward()
            host = time.perf_counter() - t
            self.dev.sync()
        wall = time.perf_counter() - t
        kernels = gpu_kernels(prof)
        top = sorted(kernels.items(), key=lambda kv_: -kv_[1][0])[:8]
        self.profile = {"gpu_busy_ms": sum(v[0] for v in kernels.values()) / 1e3,
                        "kernels": sum(v[1] for v in kernels.values()), "host_enqueue_ms_profiled": host * 1e3,
                        "wall_ms_profiled": wall * 1e3, "by_group_ms": by_group_ms(kernels),
                        "top_kernels": [{"name": n[:120], "ms": v[0] / 1e3, "count": v[1]} for n, v in top],
                        "batch_tokens": sum(n for _, _, n in batch.seqs)}
        return out


def gpu_kernels(prof) -> dict[str, list]:
    """Kernel name -> [GPU µs, launches] of a finished profile."""
    kernels = {}
    for e in prof.key_averages():
        if str(getattr(e, "device_type", "")).endswith("CUDA") and not getattr(e, "is_user_annotation", False):
            us = e.self_device_time_total
            if us > 0:
                k = kernels.setdefault(e.key, [0.0, 0])
                k[0] += us
                k[1] += e.count
    return kernels


def kernel_group(name: str) -> str:
    low = name.lower()
    if "bitdelta" in low or low.startswith("bd_"):  # bd_*: the popc kernels
        return "bitdelta ops"
    if any(s in low for s in ("flash", "fmha", "attention", "efficient")):
        return "attention"
    if any(s in low for s in ("gemm", "gemv", "cutlass", "sm90", "nvjet", "cublas")):
        return "cuBLAS GEMM/GEMV"
    return "other (norms, rope, gathers, elementwise)"


def by_group_ms(kernels: dict[str, list]) -> dict[str, float]:
    groups: dict[str, float] = {}
    for name, (us, _) in kernels.items():
        groups[kernel_group(name)] = groups.get(kernel_group(name), 0.0) + us / 1e3
    return groups
