"""Ingress: the OpenAI-compatible front door of a scaled-out server on Ray Serve.

OpenAI clients name the tenant in the JSON body (``model``), while Ray Serve routes by a
multiplexed model id set on the call; the ingress reads the body and forwards the untouched request
to an engine replica with ``multiplexed_model_id=model`` (none for the base), so Serve prefers
replicas that already hold that delta. If a replica dies before the client has received any byte
of its answer, the request is sent again (``retries`` times). It also answers what no single
replica can: ``/v1/models`` (the base plus every artifact in the store), ``/metrics`` and
``/v1/replicas`` (every replica's own report, from the board).

    ingress = Ingress.options(num_replicas=1).bind(settings.to_dict(), engine, board)
    serve.run(ingress, name="bitdelta", route_prefix="/")
    # then any OpenAI client: OpenAI(base_url="http://127.0.0.1:8000/v1").completions.create(model="zephyr", ...)
"""

# Serve pickles the FastAPI app with this class when the module is imported: so no
# `from __future__ import annotations` (FastAPI must see real classes in route signatures), and
# every module-level helper the routes use is defined above the class.
import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve

from ..http.auth import check_in_scope, key_scope
from ..http.errors import ApiError, error_body
from ..names import check_tenant_name
from ..store import DeltaStore
from .asgi_bridge import HttpRequest, ResponseStart
from .board import merge_prometheus
from .settings import RaySettings

logger = logging.getLogger("bitdelta.serve")

app = FastAPI(title="bitdelta serve (Ray Serve)", version="0.1.0", docs_url=None, redoc_url=None)

_DROP = {"content-length", "transfer-encoding", "connection"}  # recomputed by the ingress's own server


def _retryable() -> tuple:
    """Failures of the replica itself (died, restarting, gone), after which sending again is safe."""
    import ray.exceptions
    import ray.serve.exceptions as se

    kinds = [ray.exceptions.RayActorError]
    kinds += [getattr(se, n) for n in ("ReplicaUnavailableError", "DeploymentUnavailableError") if hasattr(se, n)]
    return tuple(kinds)


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status)


async def _relay(gen, tenant: str):
    """Streams the rest of a replica's SSE answer; a replica dying mid-stream ends it with an error event."""
    try:
        async for chunk in gen:
            yield chunk
    except Exception as e:
        logger.warning("stream for %r broke: %s", tenant, e)
        err = error_body(503, f"the replica serving this stream failed ({type(e).__name__}); retry the request",
                         "replica_unavailable")
        yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()


class _Denied(Exception):
    def __init__(self, response: JSONResponse):
        super().__init__("denied")
        self.response = response


@serve.deployment(name="BitDeltaIngress")
@serve.ingress(app)
class Ingress:
    def __init__(self, settings: dict, engine, board):
        self.settings = s = RaySettings.from_dict(settings)
        self.engine, self.board = engine, board
        self.base_name = s.served_base_name
        self.keys = s.key_scopes()
        self.store = DeltaStore(s.store, storage_options=s.storage_options)  # listing only: nothing is fetched here
        self.retryable = _retryable()
        self._names: tuple[float, list[str]] = (0.0, [])

    # ------------------------------------------------------------------ access (same rules as a replica)

    def _scope(self, request: Request) -> "set[str] | None":
        """Models the request's key may use (None = every model); raises _Denied without a valid key."""
        try:
            return key_scope(self.keys, request.headers.get("authorization"))
        except ApiError as e:
            raise _Denied(_error(e.status, e.message, e.code, e.param)) from None

    async def _models(self) -> list[str]:
        at, names = self._names
        if time.monotonic() - at > 10:  # listing an object store is slow: refresh at most every 10 s
            names = [self.base_name] + [n for n in await asyncio.to_thread(self.store.names) if n != self.base_name]
            self._names = (time.monotonic(), names)
        return names

    def _card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "bitdelta",
                "parent": None if name == self.base_name else self.base_name,
                "root": self.settings.base if name == self.base_name else f"{self.settings.store.rstrip('/')}/{name}"}

    # ------------------------------------------------------------------ endpoints answered here

    @app.get("/v1/models")
    async def list_models(self, request: Request):
        try:
            scope = self._scope(request)
        except _Denied as d:
            return d.response
        names = [n for n in await self._models() if scope is None or n in scope]
        return {"object": "list", "data": [self._card(n) for n in names]}

    @app.get("/v1/models/{name:path}")
    async def get_model(self, name: str, request: Request):
        try:
            scope = self._scope(request)
        except _Denied as d:
            return d.response
        ok = scope is None or name in scope
        if ok and name != self.base_name:
            try:
                ok = await asyncio.to_thread(self.store.exists, check_tenant_name(name))
            except ValueError:
                ok = False
        if not ok:
            return _error(404, f"the model {name!r} does not exist", "model_not_found", "model")
        return self._card(name)

    @app.get("/v1/replicas")
    async def replicas(self):
        reps = await self.board.replicas.remote()
        return {"object": "list", "data": [{k: v for k, v in r.items() if k != "metrics"} for r in reps]}

    @app.get("/metrics")
    async def metrics(self):
        reps = await self.board.replicas.remote()
        return PlainTextResponse(merge_prometheus({r["replica"]: r["metrics"] for r in reps}),
                                 media_type="text/plain; version=0.0.4")

    @app.api_route("/v1/deltas{rest:path}", methods=["GET", "POST", "DELETE"])
    async def deltas(self, rest: str):
        return _error(404, f"runtime delta management is not used with Ray Serve: put the artifact under "
                           f"{self.settings.store} and request it by name", "admin_disabled")

    # ------------------------------------------------------------------ forwarded to an engine replica

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._generate(request)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def other(self, path: str, request: Request):
        return await self._forward(request, await request.body(), "")  # /health, the web page, 404s

    async def _generate(self, request: Request):
        body = await request.body()
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            model = None  # the replica's validation answers 422 with the details
        tenant = ""
        if isinstance(model, str) and model != self.base_name:
            try:
                check_in_scope(self._scope(request), model)
            except _Denied as d:
                return d.response
            except ApiError as e:
                return _error(e.status, e.message, e.code, e.param)
            try:
                tenant = check_tenant_name(model)
            except ValueError:
                return _error(404, f"the model {model!r} does not exist; GET /v1/models lists them",
                              "model_not_found", "model")
        return await self._forward(request, body, tenant)

    async def _forward(self, request: Request, body: bytes, tenant: str):
        req = HttpRequest(request.method, request.url.path, request.url.query,
                          [(k, v) for k, v in request.headers.items()], body)
        handle = self.engine.options(method_name="forward", stream=True, multiplexed_model_id=tenant)
        last = None
        for attempt in range(self.settings.retries + 1):
            if attempt:
                await asyncio.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
            gen = handle.remote(req)
            try:
                start = await gen.__anext__()
                assert isinstance(start, ResponseStart), f"replica sent {type(start).__name__} before the status"
                headers = {k: v for k, v in start.headers if k.lower() not in _DROP}
                if "text/event-stream" not in (start.header("content-type") or ""):
                    chunks = [c async for c in gen]  # whole answer before any byte leaves: still retryable
                    return Response(b"".join(chunks), status_code=start.status, headers=headers)
                return StreamingResponse(_relay(gen, tenant), status_code=start.status, headers=headers)
            except self.retryable as e:
                last = e
                logger.warning("replica failed while answering (%s); attempt %d of %d", type(e).__name__,
                               attempt + 1, self.settings.retries + 1)
        return _error(503, f"no replica could answer ({type(last).__name__}); retry shortly", "replica_unavailable")
