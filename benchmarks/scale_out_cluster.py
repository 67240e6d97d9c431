"""The scale-out measurement's Ray side: a local Ray instance, the ``bitdelta serve --ray`` application
deployed on it with R replicas, the replicas' own counters, and one replica killed under load.

Counters come from the ingress's ``/metrics`` (every replica's Prometheus text, labelled by replica)
as ``benchmarks/routing_live.py`` reads them; the replica to kill, its process id and node come from
``/v1/replicas`` (each replica's own report). A kill is ``SIGKILL`` to that process, as a crash or
the kernel's OOM killer would end it, so Serve's controller finds it gone by itself.

    cluster = LocalCluster(num_cpus=4).start()
    cluster.deploy(RaySettings(base=..., store=..., replicas=2, ...))
    before = cluster.settled_counters(2); ...; hit = hit_rates(before, cluster.settled_counters(2))
    controller = kill_controller(cluster, replicas=2, kill_after_s=20, found=findings)  # for closed_loop
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import httpx

from benchmarks.routing_live import loads_by_replica

ENGINE_DEPLOYMENT = "BitDeltaEngine"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_by_replica(http: httpx.Client) -> dict[str, float]:
    """Finished requests per replica (every model, every finish reason) from ``bitdelta_requests_total``."""
    out: dict[str, float] = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("bitdelta_requests_total{"):
            rep = line.split('replica="', 1)[1].split('"', 1)[0]
            out[rep] = out.get(rep, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class LocalCluster:
    """A Ray instance started by this process, with one bitdelta application at a time on it."""

    def __init__(self, num_cpus: int | None = None, report_interval_s: float = 0.5):
        self.num_cpus, self.interval = num_cpus, report_interval_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)
        self.app_name: str | None = None

    def start(self) -> "LocalCluster":
        import ray

        # a busy machine can start Serve's HTTP proxy slowly; the replicas never talk to each other
        # (no NCCL), and NVLink multicast stays off for anything that would
        for var, value in (("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60"),
                           ("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60"), ("NCCL_NVLS_ENABLE", "0")):
            os.environ.setdefault(var, value)
        ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        return self

    def deploy(self, settings, timeout_s: float = 600) -> None:
        """Replaces whatever application runs with one built from ``settings``; returns once every
        replica has built its engine and reported."""
        from ray import serve

        from bitdelta.serving.ray.deployment import run

        if self.app_name is not None:
            serve.delete(self.app_name)  # its board goes too: no report of an old replica lingers
        s = run(settings, host="127.0.0.1", port=self.port, blocking=False)
        self.app_name = s.name
        deadline = time.time() + timeout_s
        while len(self.live_replicas()) < s.replicas:
            if time.time() > deadline:
                raise TimeoutError(f"{s.replicas} replicas did not report within {timeout_s:.0f} s")
            time.sleep(1.0)

    def replicas(self) -> list[dict]:
        """Each replica's latest report (id, node, pid, tenants, engine stats, ``age_s``)."""
        return self.http.get("/v1/replicas").json()["data"]

    def live_replicas(self) -> list[dict]:
        try:
            reps = self.replicas()
        except (httpx.HTTPError, ValueError, KeyError):  # the proxy or the ingress is still starting
            return []
        return [r for r in reps if r["age_s"] < 4 * self.interval + 1]

    def counters(self) -> dict[str, dict]:
        loads, requests = loads_by_replica(self.http), requests_by_replica(self.http)
        return {rep: {"loads": loads[rep], "requests": requests.get(rep, 0.0)} for rep in loads}

    def settled_counters(self, replicas: int) -> dict[str, dict]:
        """Counters once every replica has reported after the last request finished."""
        time.sleep(2 * self.interval + 1.0)
        got = self.counters()
        if len(got) != replicas:
            raise RuntimeError(f"expected {replicas} replicas reporting, got {sorted(got)}")
        return got

    def engine_status(self) -> dict:
        """Serve's own view of the engine deployment: its status and replica states."""
        from ray import serve

        dep = serve.status().applications[self.app_name].deployments[ENGINE_DEPLOYMENT]
        return {"status": str(dep.status), "replica_states": {str(k): v for k, v in dep.replica_states.items()}}

    def shutdown(self) -> None:
        import ray
        from ray import serve

        self.http.close()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def local_node() -> str:
    import ray

    return ray.util.get_node_ip_address()


def kill_controller(cluster: LocalCluster, replicas: int, kill_after_s: float, found: dict,
                    timeout_s: float = 300, settle_s: float = 10):
    """A controller for ``closed_loop``: after ``kill_after_s`` of load it SIGKILLs the replica with the
    most streams in flight, waits until Serve has a replacement reporting (or ``timeout_s``), keeps the
    load on ``settle_s`` longer, then stops it. What it saw goes into ``found``."""

    async def control(live) -> None:
        while time.perf_counter() - live.start < kill_after_s and not live.stop.is_set():
            await asyncio.sleep(0.1)
        if live.stop.is_set():  # the load ended first: nothing to kill under load
            found.update(victim=None, replaced=False, replaced_after_s=None)
            return
        board = await asyncio.to_thread(cluster.live_replicas)
        flights = live.in_flight_by_replica()
        victim = max(board, key=lambda r: flights.get(r["replica"], 0))
        if victim["node"] != local_node():
            raise RuntimeError(f"replica {victim['replica']} runs on node {victim['node']}, not here: "
                               "run the measurement on the machine that holds the replicas")
        found.update(victim=victim["replica"], pid=victim["pid"], in_flight_by_replica=flights,
                     in_flight_seen_on_victim=flights.get(victim["replica"], 0),
                     victim_engine_report={k: victim["engine"].get(k) for k in ("running", "waiting")})
        os.kill(victim["pid"], signal.SIGKILL)
        kill_at = found["kill_at"] = time.perf_counter()
        found["kill_at_s"] = kill_at - live.start
        before = {r["replica"] for r in board}
        found.update(replaced=False, replaced_after_s=None, replacement=None)
        while time.perf_counter() - kill_at < timeout_s:
            await asyncio.sleep(0.5)
            now_live = {r["replica"] for r in await asyncio.to_thread(cluster.live_replicas)}
            fresh = now_live - before
            if len(now_live) == replicas and victim["replica"] not in now_live and fresh:
                found.update(replaced=True, replaced_after_s=time.perf_counter() - kill_at,
                             replacement=sorted(fresh)[0])
                break
        await asyncio.sleep(settle_s)
        live.stop.set()

    return control
