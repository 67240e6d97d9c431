"""Runtime delta management: ``GET/POST /v1/deltas``, ``DELETE /v1/deltas/{name}``, ``.../load|unload``.

Off unless the server runs with ``--allow-runtime-deltas --admin-key KEY`` (404 otherwise), and
then only for the admin key. A registered artifact must lie in the allow-listed ``--delta-dir``,
and so must every file it reads; a corrupt or wrong-base artifact fails its own registration (400)
and changes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ...errors import BitDeltaError
from ..names import check_tenant_name
from .auth import check_admin
from .errors import ApiError
from .openai_routes import model_card
from .schemas import DeltaBody
from .state import Config, Runtime

logger = logging.getLogger(__name__)

router = APIRouter()


def known_delta(rt, name: str) -> None:
    """400 for the base's name, 404 for a name that is not registered."""
    if name == rt.base_name:
        raise ApiError(400, f"{name!r} is the base model; it cannot be loaded, unloaded or removed", "invalid_value",
                       "name")
    if rt.slots.get(name) is None:
        raise ApiError(404, f"no delta named {name!r}", "model_not_found", "name")


@router.get("/v1/deltas")
async def list_deltas(request: Request, rt: Runtime, config: Config):
    check_admin(config, request.headers.get("authorization"))
    return {"object": "list", "data": rt.slots.status(), "base": rt.base_name, "device_slots": rt.slots.num_slots}


@router.post("/v1/deltas", status_code=201)
async def add_delta(body: DeltaBody, request: Request, rt: Runtime, config: Config):
    check_admin(config, request.headers.get("authorization"))
    if not config.delta_dir:
        raise ApiError(403, "no allow-listed directory: start the server with --delta-dir DIR", "path_not_allowed",
                       "path")
    root = Path(config.delta_dir).resolve()
    target = Path(body.path)
    target = (target if target.is_absolute() else root / target).resolve()
    if not target.is_relative_to(root):
        raise ApiError(403, f"{body.path!r} is outside the allow-listed delta directory", "path_not_allowed", "path")
    if rt.has(body.name):
        raise ApiError(409, f"a model named {body.name!r} already exists; DELETE /v1/deltas/{body.name} first",
                       "name_taken", "name")
    try:
        check_tenant_name(body.name)
    except BitDeltaError as e:
        raise ApiError(400, str(e), "invalid_value", "name") from None
    if not target.is_dir():
        raise ApiError(400, f"{body.path!r} is not a delta artifact directory under the allow-listed directory",
                       "invalid_delta", "path")
    try:
        await run_in_threadpool(rt.register, body.name, str(target), root=str(root))
    except BitDeltaError as e:
        raise ApiError(400, f"could not register {body.name!r}: {e}", "invalid_delta", "path") from None
    except Exception as e:  # any other failure of a user-supplied file is still that file's problem
        logger.exception("registering %s failed", body.name)
        raise ApiError(400, f"could not register {body.name!r}: {type(e).__name__}: {e}", "invalid_delta",
                       "path") from None
    return {**model_card(rt, body.name, request.app.state.started), "status": "registered"}


@router.delete("/v1/deltas/{name:path}")
async def remove_delta(name: str, request: Request, rt: Runtime, config: Config):
    check_admin(config, request.headers.get("authorization"))
    known_delta(rt, name)
    rt.unregister(name)
    return {"id": name, "object": "model", "deleted": True}


@router.post("/v1/deltas/{name:path}/load")
async def load_delta(name: str, request: Request, rt: Runtime, config: Config):
    check_admin(config, request.headers.get("authorization"))
    known_delta(rt, name)
    rt.slots.prefetch(name)
    return {"id": name, "status": "loading"}


@router.post("/v1/deltas/{name:path}/unload")
async def unload_delta(name: str, request: Request, rt: Runtime, config: Config):
    check_admin(config, request.headers.get("authorization"))
    known_delta(rt, name)
    if not rt.slots.unload(name):
        raise ApiError(409, f"{name!r} is serving requests; try again when they finish", "in_use", "name")
    return {"id": name, "status": "unloaded"}
