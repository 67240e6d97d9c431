"""Who may call what: bearer tokens, the API-key file, key scopes and the admin key.

A key file maps each key to the models it may use (``"*"``: every model); without one the server
is open. The single-process server and the Ray ingress both decide access here, so they answer
alike. Keys are compared in constant time. No torch and no engine: the Ray ingress imports this.

    keys = load_api_keys("keys.toml")                       # {"sk-abc": {"zephyr"}, ...}
    scope = key_scope(keys, request.headers.get("authorization"))   # None = every model
    check_in_scope(scope, "zephyr")                          # ApiError 403 outside the scope
"""

from __future__ import annotations

import hmac
from pathlib import Path

from ...errors import BitDeltaError
from .errors import ApiError
from .server_config import ServerConfig


def bearer_token(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (None without one)."""
    h = authorization or ""
    if not h.lower().startswith("bearer "):
        return None
    return h[7:].strip() or None


def key_scope(api_keys: dict[str, set[str]] | None, authorization: str | None) -> set[str] | None:
    """The model names a request's key may use, None for every model (no keys configured, or a "*" key).

    Raises ApiError 401 without a key or with an unknown one. Keys are compared in constant time. The
    single-process server and the Ray ingress both decide access here, so they answer alike."""
    if api_keys is None:
        return None
    key = bearer_token(authorization)
    if not key:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
    # bytes, not str: compare_digest refuses non-ASCII str, and a stray header must get 401, not 500
    allowed = next((v for k, v in api_keys.items() if hmac.compare_digest(k.encode(), key.encode())), None)
    if allowed is None:
        raise ApiError(401, "invalid API key", "invalid_api_key")
    return None if "*" in allowed else set(allowed)


def check_in_scope(scope: set[str] | None, model: str) -> None:
    """ApiError 403 when ``model`` is outside a key's scope (None = every model)."""
    if scope is not None and model not in scope:
        raise ApiError(403, f"this API key may not use model {model!r}", "model_not_allowed", "model")


def check_access(config: ServerConfig, authorization: str | None, model: str | None) -> set[str] | None:
    """The request key's scope (None = every model); 401 without a valid key, 403 for ``model`` outside it."""
    scope = key_scope(config.api_keys, authorization)
    if model is not None:
        check_in_scope(scope, model)
    return scope


def check_admin(config: ServerConfig, authorization: str | None) -> None:
    """Admin endpoints: 404 while runtime deltas are off, 401 without a key, 403 with a wrong one."""
    if not config.allow_runtime_deltas or not config.admin_key:
        raise ApiError(404, "runtime delta management is disabled; start the server with "
                            "--allow-runtime-deltas --admin-key KEY", "admin_disabled")
    key = bearer_token(authorization)
    if not key:
        raise ApiError(401, "admin endpoints need 'Authorization: Bearer <admin key>'", "invalid_api_key")
    if not hmac.compare_digest(key.encode(), config.admin_key.encode()):
        raise ApiError(403, "wrong admin key", "invalid_api_key")


def load_api_keys(path) -> dict[str, set[str]]:
    """Reads ``[keys]`` from a TOML file: ``"sk-..." = ["tenant", ...]`` (``"*"`` = every model)."""
    import tomllib

    example = '[keys] table mapping each key to its models, e.g. "sk-abc" = ["zephyr"] ("*" = every model)'
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BitDeltaError(f"API key file {path}: no such file") from None
    except OSError as e:  # unreadable, a directory, ...
        raise BitDeltaError(f"API key file {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise BitDeltaError(f"API key file {path}: not UTF-8 text; write it as a TOML file with a {example}") from None
    except tomllib.TOMLDecodeError as e:
        raise BitDeltaError(f"API key file {path}: not valid TOML ({e}); it needs a {example}") from None
    keys = data.get("keys")
    if not isinstance(keys, dict) or not keys:
        raise BitDeltaError(f"API key file {path}: expected a {example}")
    out = {}
    for k, v in keys.items():
        # never echo a whole key into logs: its first characters are enough to find it in the file
        label = repr(k[:6]) + ("..." if len(k) > 6 else "") if isinstance(k, str) else repr(k)
        if not isinstance(k, str) or not k.strip():
            raise BitDeltaError(f"API key file {path}: key {label} is empty; every key must be a non-empty string")
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            raise BitDeltaError(f"API key file {path}: key {label}: the value must be a non-empty list of model "
                                'names, e.g. ["zephyr"]')
        out[k] = set(v)
    return out
