"""What a serving run builds before it measures: the random base, the delta artifacts on disk, one
delta slot's size and the roofline terms, the largest tenant count that fits, and the delta pool
with every tenant installed.

    served = build_served(run, shape, dtype)
    write_artifacts(run, served, scratch)         # served.paths: distinct artifacts + one never loaded
    probe = size_slot(served)                     # served.slot_bytes, served.terms
    install_tenants(run, served, n_slots)         # served.slots, served.tenants
"""

from __future__ import annotations

import time

import torch

from bitdelta.artifact import load_delta
from bitdelta.serving.memory_plan import kv_budget_from_free
from bitdelta.serving.slots import DeltaSlots

from .._common import (
    GiB,
    build_base,
    copy_bandwidth,
    dir_bytes,
    drop_page_cache,
    model_bytes,
    roofline_terms,
    synthetic_delta,
)
from .context import Served
from .workload import kv_bytes_per_seq, tenant_names


class SharedArtifactSlots(DeltaSlots):
    """A delta pool where tenants registered from one artifact share its prepared host copy (each
    still gets its own device slot): N tenants over a few artifacts fit in host memory."""

    def __init__(self, model, shared_paths, **kw):
        super().__init__(model, **kw)
        self.shared = {str(p) for p in shared_paths}
        self.prepared: dict[str, object] = {}

    def prepare(self, delta, name: str = "?"):
        key = delta.artifact_path
        if key not in self.shared:
            return super().prepare(delta, name)
        if key not in self.prepared:
            self.prepared[key] = super().prepare(delta, name)
        return self.prepared[key]


def build_served(run, shape: dict, dtype) -> Served:
    """Measures the copy bandwidth, then builds the random base on the run's device."""
    bw = copy_bandwidth(run.dev.device)
    run.result["meta"]["copy_gbps"] = bw
    run.log(f"copy bandwidth {bw:.0f} GB/s (device copy, bytes read + written)")
    model = build_base(shape, dtype, run.dev.device)
    served = Served(model=model, bw=bw, base_bytes=model_bytes(model))
    run.result["meta"]["base_bytes"] = served.base_bytes
    run.log(f"base built: {served.base_bytes / 1e9:.2f} GB")
    return served


def write_artifacts(run, served: Served, scratch) -> None:
    """A few distinct artifacts (tenants share them on disk, not on the GPU) + one never seen."""
    distinct = run.args.distinct
    art = {"distinct": distinct}
    t = time.perf_counter()
    for i in range(distinct + 1):
        d = synthetic_delta(served.model, seed=i)
        p = scratch / (f"delta-{i}" if i < distinct else "delta-cold")
        d.save_pretrained(p)
        served.paths.append(p)
        del d
    art.update(write_s=time.perf_counter() - t, bytes=dir_bytes(served.paths[0]))
    drop_page_cache(served.paths[-1])
    run.result["artifacts"] = art
    run.log(f"wrote {distinct} + 1 delta artifacts of {art['bytes'] / 1e9:.3f} GB each in {art['write_s']:.1f}s")


def size_slot(served: Served) -> DeltaSlots:
    """A one-slot pool: one slot's device bytes and the roofline terms (the pool is returned for the
    base-only runs before the tenants' pool exists)."""
    probe = DeltaSlots(served.model, max_gpu_deltas=1)
    slot = sum(v.numel() * v.element_size() for pool in probe.pools.values() for v in pool.values()
               if isinstance(v, torch.Tensor))
    slot += sum(t.numel() * t.element_size() for t in probe.tables.values()) // 2
    served.slot_bytes, served.terms = slot, roofline_terms(served.model, probe)
    return probe


def release_slots(dev, slots: DeltaSlots) -> None:
    """Drops a pool's device tensors and its model now (its loader thread keeps the object alive)."""
    slots.on_ready = None
    slots.model = None
    slots.pools.clear()
    slots.tables.clear()
    slots.extra_embed = slots.extra_head = slots.n_extra = None
    dev.free_memory()


def largest_n(run, served: Served) -> int:
    """How many tenants (a delta slot + one sequence's KV each) fit in the free GPU memory, keeping
    ``--reserve-gib`` free (4 on a CPU). The budget is the engine's memory plan's
    (:func:`~bitdelta.serving.memory_plan.kv_budget_from_free`) with the benchmark's reserve as its
    only headroom: the benchmark sizes every engine's KV cache itself, for exactly its batch."""
    args, model = run.args, served.model
    kv_seq = kv_bytes_per_seq(model, args.prompt_len + args.new_tokens)
    if run.dev.on_gpu:
        free_now, total = torch.cuda.mem_get_info()
        budget = kv_budget_from_free(free_now, total, gpu_memory_fraction=1.0,
                                     fixed_headroom=int(args.reserve_gib * GiB))
        nmax = int(budget // (served.slot_bytes + kv_seq))
    else:
        free_now, nmax = None, 4
    run.result["meta"].update(slot_bytes=served.slot_bytes, kv_bytes_per_seq=kv_seq, nmax=nmax,
                              free_before_pools=free_now, roofline_terms=served.terms)
    run.log(f"one delta slot {served.slot_bytes / 1e9:.3f} GB, KV per sequence {kv_seq / 1e9:.3f} GB: "
            f"largest N that fits = {nmax} (reserving {args.reserve_gib} GiB)")
    return nmax


def install_tenants(run, served: Served, n_slots: int) -> None:
    """Registers ``n_slots`` tenants round-robin over the distinct artifacts and loads each into its slot."""
    distinct = run.args.distinct
    shared = served.paths[:-1]
    slots = SharedArtifactSlots(served.model, shared, max_gpu_deltas=n_slots, max_cpu_deltas=n_slots + distinct + 2)
    t = time.perf_counter()
    loaded = [load_delta(p) for p in shared]
    warm_load_s = (time.perf_counter() - t) / len(loaded)
    tenants = tenant_names(n_slots)
    for i, name in enumerate(tenants):
        slots.register(name, served.paths[i % distinct], delta=loaded[i % distinct])
        assert slots.load(name) is not None
    run.dev.sync()
    del loaded
    served.slots, served.tenants = slots, tenants
    run.result["meta"].update(n_slots=n_slots, tenants_install_s=time.perf_counter() - t,
                              warm_artifact_load_s=warm_load_s)
    run.log(f"{n_slots} tenants registered and installed in {run.result['meta']['tenants_install_s']:.1f}s "
            f"({warm_load_s:.2f}s per warm artifact load)")
