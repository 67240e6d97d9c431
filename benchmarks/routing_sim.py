"""Delta hit rate of tenant-aware routing vs load-only routing, simulated (pure Python, CPU, seconds).

Tenants have Zipf popularity; each of R replicas holds at most C deltas (LRU, as ``serve.multiplexed``
evicts). A request is a hit when the replica it lands on already holds its delta (a miss is a
load from the delta store). Policies:

- ``multiplex``: what Ray Serve's default router does with a multiplexed model id: power of two
  choices among replicas holding the tenant; if none holds it, or those are at
  ``max_ongoing_requests``, among the replicas with the fewest loaded models; then among all.
- ``pow2``: the same router without a model id: power of two choices by load only.

References: one LRU as large as the whole cluster (R·C), which ideal tenant sharding reaches, and
the share of traffic of the R·C most popular tenants (an oracle that pins exactly those).

Load: the last ``--in-flight`` requests are taken to be running, so a replica's load is how many of
them it got; it rejects past ``--max-ongoing`` (then the next tier is tried, as Serve does).

    python benchmarks/routing_sim.py                              # the table in docs/scale_out.md
    python benchmarks/routing_sim.py --zipf 1.1 --capacity 8,32 --replicas 8
    python benchmarks/routing_sim.py --tenants 10000 --requests 500000
"""

from __future__ import annotations

import argparse
import itertools
import random
import time
from collections import OrderedDict, deque


def zipf_weights(n: int, s: float) -> list[float]:
    w = [1.0 / (k ** s) for k in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


class Replica:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.ongoing = 0
        self.served = 0

    def serve(self, tenant: int) -> bool:
        """Runs a request for ``tenant`` here; True on a hit (the delta was already loaded)."""
        self.served += 1
        if tenant in self.lru:
            self.lru.move_to_end(tenant)
            return True
        if len(self.lru) >= self.capacity:
            self.lru.popitem(last=False)
        self.lru[tenant] = None
        return False


def pick_pow2(cands: list[Replica], rng: random.Random, max_ongoing: int) -> Replica | None:
    """Ray Serve's power of two choices: two random candidates, the less loaded one that accepts."""
    two = rng.sample(cands, min(2, len(cands)))  # random order too: ties go to either, as in Serve
    ok = [r for r in two if r.ongoing < max_ongoing]
    return min(ok, key=lambda r: r.ongoing) if ok else None


def route(policy: str, tenant: int, reps: list[Replica], rng: random.Random, max_ongoing: int) -> Replica:
    if policy == "multiplex":
        holders = [r for r in reps if tenant in r.lru]
        fewest = min(len(r.lru) for r in reps)
        tiers = [holders, [r for r in reps if len(r.lru) == fewest], reps]
    else:
        tiers = [reps]
    for tier in tiers:
        if tier:
            chosen = pick_pow2(tier, rng, max_ongoing)
            if chosen is not None:
                return chosen
    return min(reps, key=lambda r: r.ongoing)  # everyone is full: it queues at the least loaded


def draw_tenants(weights: list[float], k: int, rng: random.Random) -> list[int]:
    """``k`` tenant indices drawn independently with probabilities ``weights`` (the request stream)."""
    return rng.choices(range(len(weights)), cum_weights=list(itertools.accumulate(weights)), k=k)


def lru_hit_rate(stream: list[int], capacity: int) -> float:
    """Share of ``stream``'s requests that one LRU of ``capacity`` deltas, empty at the start, already
    holds (one replica, no load limits: what a single server's delta cache predicts for that trace)."""
    cache = Replica(capacity)
    return sum(cache.serve(t) for t in stream) / len(stream) if stream else 0.0


def simulate(policy: str, weights: list[float], replicas: int, capacity: int, requests: int, warmup: int,
             in_flight: int, max_ongoing: int, seed: int) -> dict:
    rng = random.Random(seed)
    stream = draw_tenants(weights, warmup + requests, rng)
    reps = [Replica(capacity) for _ in range(replicas)]
    running: deque[Replica] = deque()
    hits = 0
    for i, tenant in enumerate(stream):
        if i == warmup:
            for r in reps:
                r.served = 0
        if len(running) >= in_flight:
            running.popleft().ongoing -= 1
        r = route(policy, tenant, reps, rng, max_ongoing)
        hit = r.serve(tenant)
        r.ongoing += 1
        running.append(r)
        if i >= warmup:
            hits += hit
    return {"hit": hits / requests, "busiest": max(r.served for r in reps) / requests}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tenants", type=int, default=1000)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--zipf", default="1.0,1.2", help="Zipf exponents, comma-separated")
    p.add_argument("--capacity", default="4,8,16,32,64", help="deltas per replica, comma-separated")
    p.add_argument("--requests", type=int, default=200_000, help="measured requests per case")
    p.add_argument("--warmup", type=int, default=20_000, help="requests before measuring (caches fill)")
    p.add_argument("--in-flight", type=int, default=64, help="requests running at once, cluster-wide")
    p.add_argument("--max-ongoing", type=int, default=32, help="per-replica limit before Serve tries elsewhere")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t0 = time.time()
    print(f"{a.tenants} tenants, {a.replicas} replicas, {a.requests} requests per case after {a.warmup} warm-up, "
          f"{a.in_flight} in flight, max_ongoing {a.max_ongoing}, seed {a.seed}\n")
    print("| Zipf s | deltas/replica C | cluster R·C | hit, multiplex | hit, pow2 (no tenant) | one LRU of R·C "
          "| top-R·C share | busiest replica, multiplex | busiest replica, pow2 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in (float(x) for x in a.zipf.split(",")):
        w = zipf_weights(a.tenants, s)
        for c in (int(x) for x in a.capacity.split(",")):
            res = {pol: simulate(pol, w, a.replicas, c, a.requests, a.warmup, a.in_flight, a.max_ongoing, a.seed)
                   for pol in ("multiplex", "pow2")}
            # references: one shared LRU as big as the cluster (perfect sharding, no load limits), and the
            # share of the R·C most popular tenants (an oracle that pins exactly those)
            lru = simulate("pow2", w, 1, a.replicas * c, a.requests, a.warmup, a.in_flight, a.in_flight + 1, a.seed)
            bound = sum(w[: a.replicas * c])
            m, r = res["multiplex"], res["pow2"]
            print(f"| {s:g} | {c} | {a.replicas * c} | {m['hit']:.1%} | {r['hit']:.1%} | {lru['hit']:.1%} | "
                  f"{bound:.1%} | {m['busiest']:.1%} | {r['busiest']:.1%} |", flush=True)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
