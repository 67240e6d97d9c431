"""Builds and runs the Ray Serve application: ingress -> R engine replicas, plus the metrics board.

Three deployments make the application: ``BitDeltaIngress`` (reads each request's ``model`` and
forwards it with that tenant as Ray Serve's multiplexed model id), ``BitDeltaEngine`` (R replicas,
each the single-GPU engine and its delta pool; ``serve.multiplexed`` loads tenants from the delta
store on demand and evicts the least recently used past ``deltas_per_replica``) and
``BitDeltaReplicaBoard`` (each replica's own metrics, for ``/metrics`` and ``/v1/replicas``).
Ray Serve sends a tenant's requests to replicas that already hold its delta.

    bitdelta serve --ray --base models/tiny/base --delta-store deltas/ --replicas 2 --gpus-per-replica 1
    serve run bitdelta.serving.ray.deployment:app_builder base=models/tiny/base store=s3://bucket/deltas replicas=4
    app = build_app(RaySettings(base="models/tiny/base", store="deltas/", replicas=2)); serve.run(app)
"""

from __future__ import annotations

import time

from .settings import RaySettings


def build_app(settings: RaySettings):
    """The Ray Serve application (ingress -> engine replicas, plus the metrics board); not yet running."""
    from .board import ReplicaBoard
    from .ingress import Ingress
    from .replica import EngineReplica

    s = settings.resolved()
    conf = s.to_dict()
    board = ReplicaBoard.options(num_replicas=1, ray_actor_options={"num_cpus": 0}).bind()
    engine = EngineReplica.options(
        num_replicas=s.replicas, max_ongoing_requests=s.max_ongoing_requests or s.max_batch,
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
    ).bind(conf, board)
    return Ingress.options(num_replicas=s.ingress_replicas, max_ongoing_requests=4096,
                           ray_actor_options={"num_cpus": 0}).bind(conf, engine, board)


def app_builder(args: dict):
    """Entry point for ``serve run bitdelta.serving.ray.deployment:app_builder key=value ...`` and Serve
    config files."""
    return build_app(RaySettings.from_dict(dict(args)))


def run(settings: RaySettings, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
        blocking: bool = True, init_kwargs: dict | None = None):
    """Connects to (or starts) a Ray cluster, deploys the application and serves until Ctrl-C."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, **(init_kwargs or {}))
    s = settings.resolved()
    for attempt in range(3):
        try:
            serve.start(http_options={"host": host, "port": port})
            break
        except (ray.exceptions.RayActorError, TimeoutError):
            # on a busy machine an HTTP proxy can start slowly or miss its readiness check and be
            # replaced; the controller is up and keeps (re)starting it, so connecting again is enough
            if attempt == 2:
                raise
            time.sleep(2)
    serve.run(build_app(s), name=s.name, route_prefix="/")
    print(f"serving {s.served_base_name!r} + deltas from {s.store} on http://{host}:{port} with {s.replicas} "
          f"engine replica(s) x {s.capacity} deltas ({s.gpus_per_replica:g} GPU, {s.cpus_per_replica:g} CPU each)",
          flush=True)
    if not blocking:
        return s
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(s.name)
    return s
