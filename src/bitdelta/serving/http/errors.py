"""OpenAI-style errors: :class:`ApiError`, the error body, and the app's exception handlers.

Every error answer, whatever raised it (a route, body validation, an unknown path), has OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}``, with ``type`` derived from the status.

    raise ApiError(404, "the model 'x' does not exist", "model_not_found", "model")
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An answer other than success: HTTP ``status`` plus OpenAI's ``message``, ``code`` and ``param``."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, code=None, param=None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def quoted_name(name: str, limit: int = 80) -> str:
    """``name`` for an error message: client-chosen strings may be huge."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + f"... ({len(name)} characters)"


async def _api_error(request: Request, e: ApiError):
    return JSONResponse(error_body(e.status, e.message, e.code, e.param), status_code=e.status)


async def _validation_error(request: Request, e: RequestValidationError):
    errs = e.errors()
    first = errs[0] if errs else {}
    loc = [str(x) for x in first.get("loc", []) if x != "body"]
    msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', []) if x != 'body')}: {er.get('msg')}" for er in errs[:5])
    return JSONResponse(error_body(422, msg or "invalid request body", "invalid_value", ".".join(loc) or None),
                        status_code=422)


async def _http_error(request: Request, e: StarletteHTTPException):
    return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code)


def install_error_handlers(app: FastAPI) -> None:
    """Makes ``app`` answer every error (its own, body validation, 404/405 of routing) in OpenAI's shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
