"""EngineReplica: one Ray Serve replica = the single-GPU engine, its delta pool and the usual HTTP app.

Each replica builds the same :class:`~bitdelta.serving.runtime.ServingRuntime` and FastAPI app as
``bitdelta serve`` and answers forwarded requests through it (:mod:`.asgi_bridge`), so the API,
errors and streaming are identical. The tenant is Ray Serve's multiplexed model id: the replica
fetches the tenant's delta from the store and registers it on first use (``serve.multiplexed``),
and Serve evicts the least recently used tenant past ``deltas_per_replica`` (its cached copy is
deleted once no request uses it). Every response carries ``x-bitdelta-replica``.

    engine = EngineReplica.options(num_replicas=2).bind(settings.to_dict(), board)
    gen = engine_handle.options(stream=True, multiplexed_model_id="zephyr").forward.remote(HttpRequest(...))
    async for item in gen: ...   # ResponseStart, then body chunks
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading

from ray import serve

from ...errors import BitDeltaError
from ..store import DeltaNotFound, DeltaStore
from .asgi_bridge import HttpRequest, ResponseStart, call_asgi
from .settings import RaySettings

logger = logging.getLogger("bitdelta.serve")

REPLICA_HEADER = "x-bitdelta-replica"


def error_response(status: int, message: str, code: str, param: str | None = None, replica: str = ""):
    """An OpenAI-style error as the two items a forwarded response is made of."""
    from ..http.errors import error_body

    body = json.dumps(error_body(status, message, code, param)).encode()
    return [ResponseStart(status, [("content-type", "application/json"), ("content-length", str(len(body))),
                                   (REPLICA_HEADER, replica)]), body]


class _Tenant:
    """A tenant held by this replica. Serve's multiplexer calls ``__del__`` when it evicts the tenant;
    Python calls it again when the object is collected, so eviction is idempotent."""

    def __init__(self, owner: "EngineReplica", name: str, path: str):
        self.owner, self.name, self.path = owner, name, path
        self.refs, self.evicted, self.gone = 0, False, False

    def __del__(self):
        owner = self.__dict__.get("owner")
        if owner is not None:
            try:
                owner._evict(self)
            except Exception:  # interpreter shutdown: nothing left to clean
                pass


@serve.deployment(name="BitDeltaEngine", health_check_period_s=5, graceful_shutdown_timeout_s=5)
class EngineReplica:
    def __init__(self, settings: dict, board=None):
        import torch

        from ..http.app import create_app
        from ..http.server_config import ServerConfig
        from ..runtime import build_runtime

        s = RaySettings.from_dict(settings)
        self.settings, self.board = s, board
        if s.torch_threads or not torch.cuda.is_available():
            # Ray reserves cpus_per_replica cores for this replica: use that many threads, not every core
            torch.set_num_threads(int(s.torch_threads or max(1, s.cpus_per_replica)))
        self.replica_id = serve.get_replica_context().replica_tag
        self.rt = build_runtime(s.base, {}, base_name=s.served_base_name, config=s.engine_settings())
        self.app = create_app(self.rt, ServerConfig(api_keys=s.key_scopes()))
        cache = None if s.cache_dir is None else os.path.join(s.cache_dir, f"replica-{self.replica_id}")
        self.store = DeltaStore(s.store, cache_dir=cache, storage_options=s.storage_options, owns_cache=True)
        self.tenants: dict[str, _Tenant] = {}
        self.lock = threading.RLock()

        async def load(name: str):
            return await self._load(name)

        # capacity is a setting, so the multiplexed loader is made per instance (Serve supports this)
        self.load_tenant = serve.multiplexed(max_num_models_per_replica=s.capacity)(load)
        self._stop = threading.Event()
        self._reporter = threading.Thread(target=self._report_loop, name="bitdelta-replica-report", daemon=True)
        self._reporter.start()
        logger.info("replica %s ready: %s, %d deltas max, store %s", self.replica_id, s.served_base_name,
                    s.capacity, s.store)

    # ------------------------------------------------------------------ tenants

    async def _load(self, name: str) -> _Tenant:
        with self.lock:
            t = self.tenants.get(name)
            if t is not None and not t.gone:  # evicted but still serving: keep it
                t.evicted = False
                # at eviction Serve replaced __del__ on the instance with a one-argument no-op that it then
                # calls with none at the next eviction: give the class's method back
                t.__dict__.pop("__del__", None)
                return t
        path = await asyncio.to_thread(self.store.fetch, name)
        try:
            # a store directory is the allow-list: an artifact's files may not point outside it
            root = None if self.store.remote else self.store.path
            await asyncio.to_thread(self.rt.register, name, path, root=root)
        except BaseException:
            self.store.release(name, path)
            raise
        t = _Tenant(self, name, path)
        with self.lock:
            self.tenants[name] = t
        return t

    def _evict(self, t: _Tenant) -> None:
        with self.lock:
            if t.gone:
                return
            t.evicted = True
            if t.refs == 0:
                self._drop(t)

    def _release(self, t: _Tenant) -> None:
        with self.lock:
            t.refs -= 1
            if t.evicted and t.refs == 0:
                self._drop(t)

    def _drop(self, t: _Tenant) -> None:
        t.gone = True
        if self.tenants.get(t.name) is t:
            del self.tenants[t.name]
        try:
            self.rt.unregister(t.name)
        except KeyError:
            pass
        self.store.release(t.name, t.path)
        logger.info("replica %s: evicted %s", self.replica_id, t.name)

    # ------------------------------------------------------------------ requests

    async def forward(self, req: HttpRequest):
        """Answers one HTTP request with the replica's app; yields ResponseStart, then body chunks."""
        tenant = serve.get_multiplexed_model_id()
        held = None
        if tenant:
            try:
                with self.lock:
                    known = tenant in self.tenants
                if not known and not await asyncio.to_thread(self.store.exists, tenant):
                    # answered before Serve's loader runs: an unknown name is the client's mistake, not a load failure
                    raise DeltaNotFound(f"the model {tenant!r} does not exist; GET /v1/models lists them")
                held = await self.load_tenant(tenant)
            except DeltaNotFound as e:
                for item in error_response(404, str(e), "model_not_found", "model", self.replica_id):
                    yield item
                return
            except Exception as e:  # a corrupt or wrong-base artifact fails its own requests only
                msg = str(e) if isinstance(e, BitDeltaError) else f"{type(e).__name__}: {e}"
                logger.error("replica %s: could not load delta %s: %s", self.replica_id, tenant, msg)
                for item in error_response(500, f"could not load delta {tenant!r}: {msg}", "invalid_delta", "model",
                                           self.replica_id):
                    yield item
                return
            with self.lock:
                held.refs += 1
        try:
            started = False
            async for item in call_asgi(self.app, req, [(REPLICA_HEADER, self.replica_id)]):
                started = True
                yield item
            if not started:
                for item in error_response(500, "the replica produced no response", "server_error",
                                           replica=self.replica_id):
                    yield item
        finally:
            if held is not None:
                self._release(held)

    def check_health(self) -> None:
        """Serve restarts the replica when this raises."""
        engine = self.rt.engine
        if not engine.alive and not getattr(engine, "restarting", False):  # a restart under way recovers by itself
            raise RuntimeError(f"engine stopped: {self.rt.engine.error or 'unknown error'}")

    # ------------------------------------------------------------------ reporting

    def snapshot(self) -> dict:
        import ray

        with self.rt.metrics.lock:
            per_model: dict[str, int] = {}
            for (model, _), n in self.rt.metrics.requests.items():
                per_model[model] = per_model.get(model, 0) + n
        with self.lock:
            tenants = sorted(n for n, t in self.tenants.items() if not t.evicted)
        return {"replica": self.replica_id, "node": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "device": str(self.rt.model.device), "capacity": self.settings.capacity,
                "device_slots": self.rt.slots.num_slots, "tenants": tenants, "requests": per_model,
                "engine": self.rt.engine.stats(), "metrics": self.rt.metrics.render(self.rt.engine, self.rt.slots)}

    def _report_loop(self) -> None:
        while not self._stop.wait(self.settings.report_interval_s):
            if self.board is None:
                return
            try:
                self.board.report.remote(self.snapshot()).result(timeout_s=10)
            except Exception as e:  # the board restarts with the app; the next report fills it again
                logger.debug("replica %s: report failed: %s", self.replica_id, e)

    def __del__(self):
        stop = self.__dict__.get("_stop")
        if stop is not None:
            stop.set()
        rt = self.__dict__.get("rt")
        if rt is not None:
            rt.shutdown()
        store = self.__dict__.get("store")
        if store is not None:
            store.close()
