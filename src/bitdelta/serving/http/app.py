"""``create_app``: the OpenAI-compatible FastAPI app over a :class:`~bitdelta.serving.runtime.ServingRuntime`.

``model`` names a registered delta or the base itself. Endpoints: ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE with ``stream: true``), ``GET /health``,
``GET /metrics`` (Prometheus), ``GET /`` (side-by-side web page), and, with runtime deltas enabled
and the admin key, ``GET/POST /v1/deltas``, ``DELETE /v1/deltas/{name}``,
``POST /v1/deltas/{name}/load|unload``. Errors use OpenAI's body:
``{"error": {"message", "type", "param", "code"}}``.

A request that fails on its own (its delta produces NaN, say) gets a 500 (or an error event in its
stream) while the others go on; while the engine is down or restarting, generation answers 503
``engine_unavailable`` and ``/health`` says why.

    app = create_app(runtime, ServerConfig(api_keys={"sk-a": {"zephyr"}}, admin_key="adm", delta_dir="deltas"))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import time

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from ..page import INDEX_HTML
from . import admin, openai_routes
from .errors import install_error_handlers
from .server_config import ServerConfig
from .state import Runtime

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def index():
    return HTMLResponse(INDEX_HTML)


@router.get("/health")
async def health(rt: Runtime):
    if not rt.engine.alive:
        st = rt.engine.stats()
        return JSONResponse({"status": "error", "error": rt.engine.error or "engine not running",
                             "restarting": st.get("restarting", False), "restart_count": st.get("restart_count", 0),
                             "auto_restart": st.get("auto_restart", False)}, status_code=503)
    return {"status": "ok", "models": len(rt.models()), **rt.engine.stats()}


@router.get("/metrics")
async def metrics(rt: Runtime):
    return PlainTextResponse(rt.metrics.render(rt.engine, rt.slots), media_type="text/plain; version=0.0.4")


def create_app(rt, config: ServerConfig | None = None) -> FastAPI:
    """The app serving ``rt`` under ``config`` (default: open, no admin endpoints)."""
    app = FastAPI(title="bitdelta serve", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.runtime, app.state.config = rt, config or ServerConfig()
    app.state.started = time.time()
    install_error_handlers(app)
    for part in (router, openai_routes.router, admin.router):
        app.include_router(part)
    return app
