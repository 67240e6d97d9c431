"""Delta hit rate measured on a real local Ray Serve cluster, to check routing_sim.py against Serve itself.

Makes a store of T tenants (copies of the two bundled deltas under T names), deploys R CPU engine
replicas holding C deltas each, sends Zipf-distributed requests one after another, and counts delta
loads from the replicas' own metrics (``bitdelta_delta_loads_all_total``): hit rate = 1 - loads /
requests after a warm-up. Prints the matching routing_sim.py command to compare.

    python benchmarks/routing_live.py                                  # T=40, R=2, C=4, Zipf 1.1, 300 requests
    python benchmarks/routing_live.py --tenants 100 --capacity 8 --requests 600
    python benchmarks/routing_sim.py --tenants 40 --replicas 2 --capacity 4 --zipf 1.1 --in-flight 1
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]  # run as a script: the benchmarks package and the library

from benchmarks.routing_sim import zipf_weights  # noqa: E402  (the simulator this run checks)


def loads_by_replica(http) -> dict[str, float]:
    out = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("bitdelta_delta_loads_all_total{"):
            out[line.split('replica="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


def settled_loads(http, replicas: int, wait_s: float = 3.0) -> float:
    """Total loads once every replica has reported after the last request (reports come every 0.5 s)."""
    time.sleep(wait_s)
    got = loads_by_replica(http)
    assert len(got) == replicas, f"expected {replicas} replicas reporting, got {sorted(got)}"
    return sum(got.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tenants", type=int, default=40)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--capacity", type=int, default=4, help="deltas per replica")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import httpx
    import ray
    from ray import serve

    import bitdelta
    from bitdelta.serving.ray_serve import RaySettings, run

    tmp = Path(tempfile.mkdtemp(prefix="bitdelta-routing-"))
    try:
        src = {}
        for name in ("shakespeare", "gsm8k"):
            src[name] = tmp / "src" / name
            bitdelta.compress(ROOT / "models/tiny/base", ROOT / "models/tiny" / name, scale="row",
                              progress=False).save_pretrained(src[name])
        tenants = [f"t{i:04d}" for i in range(a.tenants)]
        for i, t in enumerate(tenants):
            shutil.copytree(src[("shakespeare", "gsm8k")[i % 2]], tmp / "store" / t)
        rng = random.Random(a.seed)
        stream = rng.choices(tenants, weights=zipf_weights(a.tenants, a.zipf), k=a.warmup + a.requests)

        ray.init(num_cpus=a.replicas + 2, include_dashboard=False, log_to_driver=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        run(RaySettings(base=str(ROOT / "models/tiny/base"), base_name="base", store=str(tmp / "store"),
                        replicas=a.replicas, gpus_per_replica=0, max_gpu_deltas=a.capacity, max_batch=8,
                        kv_cache_mb=64, report_interval_s=0.5), port=port, blocking=False)
        t0 = time.time()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            for i, t in enumerate(stream):
                if i == a.warmup:
                    before = settled_loads(http, a.replicas)
                    t0 = time.time()
                r = http.post("/v1/completions",
                              json={"model": t, "prompt": "To be", "max_tokens": 2, "temperature": 0})
                r.raise_for_status()
            took = time.time() - t0
            loads = settled_loads(http, a.replicas) - before
        hit = 1 - loads / a.requests
        print(f"{a.tenants} tenants, Zipf {a.zipf:g}, {a.replicas} replicas x {a.capacity} deltas, "
              f"{a.requests} requests after {a.warmup} warm-up, one at a time: {int(loads)} delta loads, "
              f"hit rate {hit:.1%} ({a.requests / took:.1f} requests/s)")
        print(f"compare: python benchmarks/routing_sim.py --tenants {a.tenants} --replicas {a.replicas} "
              f"--capacity {a.capacity} --zipf {a.zipf:g} --in-flight 1 --requests {a.requests * 100} "
              f"--warmup {a.warmup * 100}")
    finally:
        try:
            serve.shutdown()
            ray.shutdown()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
