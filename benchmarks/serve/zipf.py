"""The Zipf-tenant run: many registered deltas, few device slots, a host cache smaller than the
registry, and requests whose tenant follows a Zipf law, so residency and loading show under a
realistic mix.

``--zipf-deltas`` tenants are registered over the run's few distinct artifacts (as the rest of the
benchmark shares them: the registry holds each artifact's prepared host copy once), in a fresh pool
of ``--zipf-slots`` device slots whose host LRU holds ``--zipf-host`` deltas. Tenant ``zipf-0000``
is the most popular; a request's tenant is drawn Zipf(``--zipf-s``) over all of them (seeded), and
requests arrive as a Poisson process at ``--zipf-rate``. Each request is labelled, as it is
submitted (at its arrival, between engine steps), by where its delta is then, read through the
pool's public :meth:`~bitdelta.serving.residency.DeltaSlots.state`: ``device`` (READY: in a slot),
``host`` (WAITING_FOR_SLOT: in host memory), ``disk`` (LOADING: to be read from its artifact, or
being read), ``failed``.

Measured: tokens/s, TTFT and TPOT p50/p99 overall and per label, the device-slot hit rate (share
of requests labelled ``device``), the host hit rate (share of the others labelled ``host``),
disk loads, slot installs and evictions per second (the pool's counters), and what one LRU of the
same size predicts for the same trace (``benchmarks.routing_sim.lru_hit_rate``: no concurrency,
a request's delta counted in the cache the moment it is asked for).

Two simplifications, both in the numbers' favour and stated with them: a disk load reads an
artifact the page cache mostly holds (a few artifacts back every tenant; the cold-start phase
measures a cold read), and tenants of one artifact share its sign bits (the ops read a slot's
bits in full whatever they are, so speed does not depend on them; redrawing them at every
install would add a cost to the measured loads that no real load has).

    zipf_run(run, served)          # after every other phase: it releases the tenants' pool first
"""

from __future__ import annotations

import random
import time

from bitdelta.artifact import load_delta
from bitdelta.serving.residency import DeltaState

from ..routing_sim import draw_tenants, lru_hit_rate, zipf_weights
from .measure import run_workload, summary_line
from .setup import SharedArtifactSlots, release_slots
from .workload import poisson_arrivals

# an INSTALLING delta is already host-resident (its copy to the device is in flight)
LABELS = {DeltaState.READY: "device", DeltaState.INSTALLING: "host", DeltaState.WAITING_FOR_SLOT: "host",
          DeltaState.LOADING: "disk", DeltaState.FAILED: "failed"}
TRACE_SEED = 11


def zipf_names(n: int) -> list[str]:
    """Tenant names in popularity order (rank 0 first)."""
    return [f"zipf-{i:04d}" for i in range(n)]


def zipf_trace(n_deltas: int, s: float, n_requests: int, seed: int = TRACE_SEED) -> list[int]:
    """Popularity ranks of ``n_requests`` requests drawn Zipf(``s``) over ``n_deltas`` tenants (seeded)."""
    return draw_tenants(zipf_weights(n_deltas, s), n_requests, random.Random(seed))


def register_tenants(run, served, names: list[str], n_slots: int, n_host: int) -> SharedArtifactSlots:
    """A fresh pool of ``n_slots`` device slots and a host LRU of ``n_host``, with every name registered
    (round-robin over the distinct artifacts; each registration validates and checks the base)."""
    distinct = run.args.distinct
    shared = served.paths[:distinct]
    slots = SharedArtifactSlots(served.model, shared, max_gpu_deltas=n_slots, max_cpu_deltas=n_host)
    t = time.perf_counter()
    loaded = [load_delta(p) for p in shared]
    for i, name in enumerate(names):
        slots.register(name, shared[i % distinct], delta=loaded[i % distinct])
    del loaded
    run.log(f"zipf: {len(names)} tenants registered in {time.perf_counter() - t:.1f}s "
            f"({n_slots} device slots, host LRU of {n_host})")
    return slots


def pool_counters(slots) -> dict:
    """The pool's cumulative counters: disk loads (registrations included), slot and host evictions,
    and slots in use (installs = slot evictions + the growth of slots in use)."""
    return {**slots.totals, "resident": slots.resident()}


def hit_rates(per_request: list[dict]) -> dict:
    """Counts per arrival label and the device-slot and host hit rates they give."""
    counts = {lab: sum(r["label"] == lab for r in per_request) for lab in ("device", "host", "disk", "failed")}
    n, missed_device = len(per_request), len(per_request) - counts["device"]
    return {"counts": counts, "device_hit_rate": counts["device"] / n if n else None,
            "host_hit_rate": counts["host"] / missed_device if missed_device else None}


def fitted_slots(run, n_slots: int) -> int:
    nmax = run.result["meta"].get("nmax")
    if nmax is not None and n_slots > nmax:
        run.log(f"zipf: {n_slots} slots (with a sequence's KV each) do not fit; using the largest that does, {nmax}")
        return nmax
    return n_slots


def zipf_run(run, served) -> None:
    """Releases the tenants' pool, registers the Zipf tenants, warms up, serves the trace and records
    ``result["zipf"]``."""
    args = run.args
    n_slots = fitted_slots(run, args.zipf_slots)
    ranks = zipf_trace(args.zipf_deltas, args.zipf_s, args.zipf_requests)
    arrivals = poisson_arrivals(args.zipf_rate, len(ranks), seed=TRACE_SEED)
    if run.left_s() < arrivals[-1] + 60:  # registering, warming up and draining take time too
        run.skip("zipf: time budget")
        run.log("skip zipf: time budget")
        return
    if served.slots is not None:
        release_slots(run.dev, served.slots)
        served.slots = None
    names = zipf_names(args.zipf_deltas)
    slots = register_tenants(run, served, names, n_slots, args.zipf_host)
    # Every kernel shape of a full batch compiled first, with the least popular tenants (the trace
    # rarely asks for them; they leave the slots as it goes, as any resident would).
    run_workload(run, served.model, slots, names[-n_slots:], new_tokens=4, label="warm")
    before = pool_counters(slots)
    stream = [names[k] for k in ranks]
    r = run_workload(run, served.model, slots, stream, arrivals=arrivals, max_batch=n_slots, terms=served.terms,
                     bw=served.bw, deadline=run.deadline - args.reserve_tail_s, label="zipf",
                     classify=lambda tenant: LABELS[slots.state(tenant)])
    after = pool_counters(slots)
    release_slots(run.dev, slots)
    wall = r["wall_s"] or None
    loads = after["loads"] - before["loads"]
    installs = after["evictions"] - before["evictions"] + after["resident"] - before["resident"]
    r.update(mode="zipf", n=n_slots, deltas=args.zipf_deltas, s=args.zipf_s, host_capacity=args.zipf_host,
             rate=args.zipf_rate, distinct_tenants=len(set(ranks)), top_tenant=names[0],
             disk_loads=loads, slot_installs=installs,
             slot_evictions=after["evictions"] - before["evictions"],
             host_evictions=after["host_evictions"] - before["host_evictions"],
             loads_per_s=loads / wall if wall else None, installs_per_s=installs / wall if wall else None,
             sim_device_hit_rate=lru_hit_rate(ranks, n_slots),
             # a delta in a slot stays READY after its host copy leaves the host LRU: the larger cache bounds it
             sim_host_or_device_hit_rate=lru_hit_rate(ranks, max(args.zipf_host, n_slots)),
             **hit_rates(r["per_request"]))
    run.result["zipf"] = r
    run.log(f"zipf s={args.zipf_s} over {args.zipf_deltas} deltas, {len(ranks)} requests at {args.zipf_rate}/s, "
            f"{n_slots} slots, host {args.zipf_host}: device hits {r['device_hit_rate']:.1%} "
            f"(LRU predicts {r['sim_device_hit_rate']:.1%}), host hits {r['host_hit_rate'] or 0:.1%} of the rest, "
            f"{loads} disk loads, {installs} slot installs; " + summary_line("zipf", n_slots, r))
