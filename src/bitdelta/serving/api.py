"""OpenAI-compatible HTTP API over a :class:`~bitdelta.serving.runtime.ServingRuntime` (FastAPI).

``model`` names a registered delta or the base itself. Endpoints: ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE with ``stream: true``), ``GET /health``,
``GET /metrics`` (Prometheus), ``GET /`` (side-by-side web page), and, with runtime deltas enabled
and the admin key, ``GET/POST /v1/deltas``, ``DELETE /v1/deltas/{name}``,
``POST /v1/deltas/{name}/load|unload``. Errors use OpenAI's body:
``{"error": {"message", "type", "param", "code"}}``.

Sampling: ``temperature`` 0..2, where anything below 1e-5 (0 included) means greedy decoding (the most
likely token; dividing logits by a smaller number would overflow); ``top_p`` in (0, 1]; ``top_k``
-1/0 (off) or any positive count; ``seed`` a 64-bit integer (-2**63 .. 2**64 - 1); ``max_tokens`` at
most the model's context length (what does not fit after the prompt is cut, finish "length").
A request that fails on its own (its delta produces NaN, say) gets a 500 (or an error event in its
stream) while the others go on; while the engine is down or restarting, generation answers 503
``engine_unavailable`` and ``/health`` says why.

    app = create_app(runtime, ServerConfig(api_keys={"sk-a": {"zephyr"}}, admin_key="adm", delta_dir="deltas"))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BitDeltaError
from .engine import SEED_MAX, SEED_MIN, EngineUnavailable, PromptTooLong, QueueFull
from .engine import Request as EngineRequest
from .engine import SamplingParams
from .metrics import UNKNOWN_MODEL
from .page import INDEX_HTML
from .text import Detokenizer

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


# A token covers far fewer characters than this with any real tokenizer: a longer prompt cannot fit
# the context, and is refused before spending seconds tokenizing it.
MAX_CHARS_PER_TOKEN = 1024
# Longer texts are tokenized in a worker thread, so other requests' streams keep flowing meanwhile.
THREAD_ENCODE_CHARS = 16384


def _short(name: str, limit: int = 80) -> str:
    """``name`` for an error message: client-chosen strings may be huge."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + f"... ({len(name)} characters)"


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, code=None, param=None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


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


@dataclass
class ServerConfig:
    api_keys: dict[str, set[str]] | None = None  # key -> allowed model names ("*" = all)
    admin_key: str | None = None
    allow_runtime_deltas: bool = False
    delta_dir: str | None = None  # allow-list for runtime registration
    request_timeout_s: float = 600.0


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
            raise BitDeltaError(f'API key file {path}: key {label}: the value must be a non-empty list of model names, e.g. ["zephyr"]')
        out[k] = set(v)
    return out


# ---------------------------------------------------------------------------------- request bodies


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[dict] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    seed: Optional[int] = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Union[bool, int, None] = None


class CompletionBody(_Base):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = None


class ChatBody(_Base):
    messages: list[Message]
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class DeltaBody(BaseModel):
    name: str
    path: str


# ---------------------------------------------------------------------------------- app


def create_app(rt, config: ServerConfig | None = None) -> FastAPI:
    cfg = config or ServerConfig()
    app = FastAPI(title="bitdelta serve", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.runtime, app.state.config = rt, cfg

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.status, e.message, e.code, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', []) if x != 'body')}: {er.get('msg')}" for er in errs[:5])
        return JSONResponse(error_body(422, msg or "invalid request body", "invalid_value", ".".join(loc) or None), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code)

    def bearer(request: Request) -> str | None:
        return bearer_token(request.headers.get("authorization"))

    def check_access(request: Request, model: str | None) -> set[str] | None:
        """The request key's scope (None = every model); 401 without a valid key, 403 for ``model`` outside it."""
        scope = key_scope(cfg.api_keys, request.headers.get("authorization"))
        if model is not None:
            check_in_scope(scope, model)
        return scope

    def visible_models(scope: set[str] | None) -> list[str]:
        names = rt.models()
        return names if scope is None else [n for n in names if n in scope]

    def model_card(name: str) -> dict:
        e = rt.slots.get(name)
        return {"id": name, "object": "model", "created": int(app.state.started), "owned_by": "bitdelta",
                "parent": None if e is None else rt.base_name,
                "root": rt.base_path if e is None else e.info.get("finetuned_model_name_or_path", name)}

    app.state.started = time.time()

    # ------------------------------------------------------------------ read-only endpoints

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(INDEX_HTML)

    @app.get("/health")
    async def health():
        if not rt.engine.alive:
            st = rt.engine.stats()
            return JSONResponse({"status": "error", "error": rt.engine.error or "engine not running",
                                 "restarting": st.get("restarting", False), "restart_count": st.get("restart_count", 0),
                                 "auto_restart": st.get("auto_restart", False)}, status_code=503)
        return {"status": "ok", "models": len(rt.models()), **rt.engine.stats()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(rt.metrics.render(rt.engine, rt.slots), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request):
        return {"object": "list", "data": [model_card(n) for n in visible_models(check_access(request, None))]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        if not rt.has(name) or name not in visible_models(check_access(request, None)):
            raise ApiError(404, f"the model {_short(name)} does not exist", "model_not_found", "model")
        return model_card(name)

    # ------------------------------------------------------------------ generation

    def resolve(request: Request, body: _Base) -> str:
        check_access(request, body.model)
        if not rt.has(body.model):
            rt.metrics.rejected(UNKNOWN_MODEL, 404)  # client-chosen names never become metric labels
            raise ApiError(404, f"the model {_short(body.model)} does not exist; GET /v1/models lists them",
                           "model_not_found", "model")
        if body.seed is not None and not SEED_MIN <= body.seed <= SEED_MAX:
            raise ApiError(400, f"seed must be an integer from -2**63 to 2**64 - 1 (got {str(body.seed)[:40]})",
                           "invalid_value", "seed")
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", "unsupported_parameter", "n")
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported", "unsupported_parameter", "logprobs")
        if body.presence_penalty or body.frequency_penalty:
            raise ApiError(400, "presence/frequency penalties are not supported", "unsupported_parameter",
                           "presence_penalty" if body.presence_penalty else "frequency_penalty")
        return body.model

    def stops(body: _Base) -> list[str]:
        s = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(s) > 16:
            raise ApiError(400, "at most 16 stop sequences", "invalid_value", "stop")
        return s

    def params(body: _Base, name: str, prompt: list[int], max_tokens: int | None,
               max_tokens_param: str = "max_tokens") -> SamplingParams:
        if max_tokens is not None and max_tokens > rt.engine.max_len:
            raise ApiError(400, f"{max_tokens_param} is {str(max_tokens)[:40]}; this model's context length is "
                                f"{rt.engine.max_len} tokens (prompt included)", "invalid_value", max_tokens_param)
        room = rt.engine.max_len - len(prompt)
        text = rt.text(name)
        return SamplingParams(max_tokens=min(max_tokens or room, room), temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, seed=body.seed, ignore_eos=body.ignore_eos,
                              stop_token_ids=tuple(set(text.eos_ids) | set(body.stop_token_ids or ())))

    def too_long(name: str, chars: int, param: str) -> None:
        """Refuses text that cannot fit the context whatever the tokenizer, before tokenizing it."""
        if chars > MAX_CHARS_PER_TOKEN * rt.engine.max_len:
            rt.metrics.rejected(name, 400)
            raise ApiError(400, f"the {param} has {chars} characters, more than this model's context of "
                                f"{rt.engine.max_len} tokens can hold", "context_length_exceeded", param)

    async def encode(fn, arg, chars: int):
        return await run_in_threadpool(fn, arg) if chars > THREAD_ENCODE_CHARS else fn(arg)

    def check_prompt(name: str, prompt: list[int]) -> None:
        if not prompt:
            raise ApiError(400, "the prompt is empty", "invalid_value", "prompt")
        if len(prompt) >= rt.engine.max_len:
            rt.metrics.rejected(name, 400)
            raise ApiError(400, f"this model's maximum context length is {rt.engine.max_len} tokens; the prompt has "
                                f"{len(prompt)} tokens (at least one must be left to generate)",
                           "context_length_exceeded", "messages" if False else "prompt")
        vocab = rt.model.vocab_size + rt.slots.max_extra
        if any(t < 0 or t >= vocab for t in prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "invalid_value", "prompt")

    async def run(request: Request, name: str, prompt: list[int], sp: SamplingParams, stop: list[str], chat: bool,
                  stream: bool, include_usage: bool):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        ereq = EngineRequest(prompt=prompt, tenant=None if name == rt.base_name else name, params=sp,
                             on_event=lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        if not rt.engine.alive:  # answer at once: a request queued on a stopped engine would wait forever
            rt.metrics.rejected(name, 503)
            raise ApiError(503, rt.engine.down_reason(), "engine_unavailable")
        try:
            rt.engine.submit(ereq)
        except QueueFull as e:
            rt.metrics.rejected(name, 429)
            raise ApiError(429, str(e), "queue_full") from None
        except EngineUnavailable as e:
            rt.metrics.rejected(name, 503)
            raise ApiError(503, str(e), "engine_unavailable") from None
        except KeyError:
            raise ApiError(404, f"the model {name!r} does not exist", "model_not_found", "model") from None
        except PromptTooLong as e:
            raise ApiError(400, str(e), "context_length_exceeded", "prompt") from None
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_value", getattr(e, "param", None)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        det = Detokenizer(rt.text(name), stop)

        async def events():
            """Yields (text piece, None) ... then (None, finish_reason); raises ApiError on engine errors."""
            checked = time.monotonic()
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=0.2)
                except asyncio.TimeoutError:
                    ev = None
                if not stream and time.monotonic() - checked > 0.2:  # streams notice hang-ups by themselves
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        rt.engine.cancel(ereq)
                        return
                if ev is None:
                    continue
                if ev.token is not None:
                    piece, hit = det.push(ev.token)
                    if piece:
                        yield piece, None
                    if hit:
                        rt.engine.cancel(ereq, "stop")
                        yield None, "stop"
                        return
                    continue
                if ev.finish == "error":
                    code = getattr(ev, "code", None) or "engine_error"
                    raise ApiError(503 if code == "engine_unavailable" else 500, ev.error or "generation failed", code)
                rest = det.flush()
                if rest:
                    yield rest, None
                yield None, "stop" if ev.finish == "stop" else "length"
                return

        def usage():
            n = len(det.ids)
            return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

        if not stream:
            parts, finish = [], None
            try:
                async for piece, fin in events():
                    if piece:
                        parts.append(piece)
                    finish = fin or finish
            finally:
                if ereq.finish_reason is None and finish is None:
                    rt.engine.cancel(ereq)
            text = "".join(parts)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                          "finish_reason": finish}
                return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                        "choices": [choice], "usage": usage()}
            return {"id": rid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": usage()}

        def chunk(piece, finish, first=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
                obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            else:
                obj = {"id": rid, "object": "text_completion", "created": created, "model": name,
                       "choices": [{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = None
            return f"data: {json.dumps(obj)}\n\n"

        async def sse():
            done = False
            try:
                if chat:
                    yield chunk(None, None, first=True)
                async for piece, fin in events():
                    yield chunk(piece, fin)
                done = True
                if include_usage:
                    obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": created, "model": name, "choices": [], "usage": usage()}
                    yield f"data: {json.dumps(obj)}\n\n"
                yield "data: [DONE]\n\n"
            except ApiError as e:
                done = True
                yield f"data: {json.dumps(error_body(e.status, e.message, e.code))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not done and ereq.finish_reason is None:  # client went away: free the slot
                    rt.engine.cancel(ereq)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        name = resolve(request, body)
        if body.echo:
            raise ApiError(400, "echo is not supported", "unsupported_parameter", "echo")
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise ApiError(400, "send one prompt per request (batched prompts are not supported)", "invalid_value", "prompt")
            p = p[0]
        if isinstance(p, str):
            too_long(name, len(p), "prompt")
            prompt = await encode(rt.text(name).encode_prompt, p, len(p))
        else:
            prompt = list(p)
        check_prompt(name, prompt)
        sp = params(body, name, prompt, body.max_tokens or 16)
        return await run(request, name, prompt, sp, stops(body), False, body.stream,
                         bool((body.stream_options or {}).get("include_usage")))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        name = resolve(request, body)
        if not body.messages:
            raise ApiError(400, "messages must not be empty", "invalid_value", "messages")
        msgs = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):
                texts = [part.get("text") for part in content if part.get("type") == "text"]
                if not all(isinstance(t, str) for t in texts):
                    raise ApiError(400, "a text content part needs a string 'text'", "invalid_value", "messages")
                content = "".join(texts)
            msgs.append({"role": m.role, "content": content or ""})
        chars = sum(len(m["content"]) for m in msgs)
        too_long(name, chars, "messages")
        try:
            prompt = await encode(rt.text(name).encode_chat, msgs, chars)
        except Exception as e:  # template errors (e.g. role order a template rejects)
            raise ApiError(400, f"the chat template of {name!r} rejected these messages: {e}", "invalid_value", "messages")
        check_prompt(name, prompt)
        sp = params(body, name, prompt, body.max_completion_tokens or body.max_tokens,
                    "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        return await run(request, name, prompt, sp, stops(body), True, body.stream,
                         bool((body.stream_options or {}).get("include_usage")))

    # ------------------------------------------------------------------ admin

    def admin(request: Request) -> None:
        if not cfg.allow_runtime_deltas or not cfg.admin_key:
            raise ApiError(404, "runtime delta management is disabled; start the server with "
                                "--allow-runtime-deltas --admin-key KEY", "admin_disabled")
        key = bearer(request)
        if not key:
            raise ApiError(401, "admin endpoints need 'Authorization: Bearer <admin key>'", "invalid_api_key")
        if not hmac.compare_digest(key.encode(), cfg.admin_key.encode()):
            raise ApiError(403, "wrong admin key", "invalid_api_key")

    def known_delta(name: str):
        if name == rt.base_name:
            raise ApiError(400, f"{name!r} is the base model; it cannot be loaded, unloaded or removed", "invalid_value", "name")
        if rt.slots.get(name) is None:
            raise ApiError(404, f"no delta named {name!r}", "model_not_found", "name")

    @app.get("/v1/deltas")
    async def list_deltas(request: Request):
        admin(request)
        return {"object": "list", "data": rt.slots.status(), "base": rt.base_name,
                "device_slots": rt.slots.num_slots}

    @app.post("/v1/deltas", status_code=201)
    async def add_delta(body: DeltaBody, request: Request):
        admin(request)
        if not cfg.delta_dir:
            raise ApiError(403, "no allow-listed directory: start the server with --delta-dir DIR", "path_not_allowed", "path")
        root = Path(cfg.delta_dir).resolve()
        target = Path(body.path)
        target = (target if target.is_absolute() else root / target).resolve()
        if not target.is_relative_to(root):
            raise ApiError(403, f"{body.path!r} is outside the allow-listed delta directory", "path_not_allowed", "path")
        if rt.has(body.name):
            raise ApiError(409, f"a model named {body.name!r} already exists; DELETE /v1/deltas/{body.name} first",
                           "name_taken", "name")
        if not target.is_dir():
            raise ApiError(400, f"{body.path!r} is not a delta artifact directory under the allow-listed directory",
                           "invalid_delta", "path")
        try:
            await run_in_threadpool(rt.register, body.name, str(target), root=str(root))
        except BitDeltaError as e:
            raise ApiError(400, f"could not register {body.name!r}: {e}", "invalid_delta", "path") from None
        except Exception as e:  # any other failure of a user-supplied file is still that file's problem
            logger.exception("registering %s failed", body.name)
            raise ApiError(400, f"could not register {body.name!r}: {type(e).__name__}: {e}", "invalid_delta", "path") from None
        return {**model_card(body.name), "status": "registered"}

    @app.delete("/v1/deltas/{name:path}")
    async def remove_delta(name: str, request: Request):
        admin(request)
        known_delta(name)
        rt.unregister(name)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/deltas/{name:path}/load")
    async def load_delta_ep(name: str, request: Request):
        admin(request)
        known_delta(name)
        rt.slots.prefetch(name)
        return {"id": name, "status": "loading"}

    @app.post("/v1/deltas/{name:path}/unload")
    async def unload_delta_ep(name: str, request: Request):
        admin(request)
        known_delta(name)
        if not rt.slots.unload(name):
            raise ApiError(409, f"{name!r} is serving requests; try again when they finish", "in_use", "name")
        return {"id": name, "status": "unloaded"}

    return app
