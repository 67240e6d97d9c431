"""What the routers share, kept on ``app.state`` by :func:`~bitdelta.serving.http.app.create_app`.

``app.state.runtime`` (the :class:`~bitdelta.serving.runtime.ServingRuntime`), ``app.state.config``
(the :class:`~.server_config.ServerConfig`) and ``app.state.started`` (when the app was made, the
``created`` of model cards). Routes take them as FastAPI dependencies:

    @router.get("/v1/models")
    async def list_models(request: Request, rt: Runtime, config: Config): ...
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from .server_config import ServerConfig


# async, so FastAPI calls them on the event loop rather than in a worker thread
async def _runtime(request: Request):
    return request.app.state.runtime


async def _config(request: Request) -> ServerConfig:
    return request.app.state.config


Runtime = Annotated[Any, Depends(_runtime)]  # a ServingRuntime (not imported: it would load torch here)
Config = Annotated[ServerConfig, Depends(_config)]

