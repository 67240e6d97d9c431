"""One generation: submit token ids to the engine, turn its events into text, answer as JSON or SSE.

The engine calls back from its own thread with one event per token and a last one with the finish
reason (or an error); :class:`Generation` moves them onto the event loop, detokenizes them with the
tenant's tokenizer, cuts at stop strings and answers OpenAI's way: one ``text_completion`` /
``chat.completion`` object, or with ``stream: true`` server-sent events ending in ``data: [DONE]``.
A client that hangs up cancels its engine request, which frees its batch slot.

    return await generate(request, rt, "zephyr", prompt_ids, sampling, stop=[], chat=False,
                          stream=True, include_usage=False)
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine import EngineUnavailable, PromptTooLong, QueueFull
from ..engine import Request as EngineRequest
from ..engine import SamplingParams
from ..text import Detokenizer
from .errors import ApiError, error_body

# how often a non-streaming answer checks whether its client is still there (seconds)
DISCONNECT_POLL_S = 0.2


def submit(rt, name: str, ereq: EngineRequest) -> None:
    """Queues ``ereq`` on the engine, turning each refusal into the ApiError a client should see."""
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


class Generation:
    """A submitted engine request, read back as text pieces and a finish reason."""

    def __init__(self, request: Request, rt, name: str, prompt: list[int], ereq: EngineRequest,
                 queue: asyncio.Queue, stop: list[str], chat: bool, stream: bool, include_usage: bool):
        self.request, self.rt, self.name, self.prompt, self.ereq, self.queue = request, rt, name, prompt, ereq, queue
        self.chat, self.stream, self.include_usage = chat, stream, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.detokenizer = Detokenizer(rt.text(name), stop)

    async def events(self):
        """Yields (text piece, None) ... then (None, finish_reason); raises ApiError on engine errors."""
        engine, det = self.rt.engine, self.detokenizer
        checked = time.monotonic()
        while True:
            try:
                ev = await asyncio.wait_for(self.queue.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                ev = None
            if not self.stream and time.monotonic() - checked > DISCONNECT_POLL_S:  # streams notice hang-ups by themselves
                checked = time.monotonic()
                if await self.request.is_disconnected():
                    engine.cancel(self.ereq)
                    return
            if ev is None:
                continue
            if ev.token is not None:
                piece, hit = det.push(ev.token)
                if piece:
                    yield piece, None
                if hit:
                    engine.cancel(self.ereq, "stop")
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

    def usage(self) -> dict:
        n = len(self.detokenizer.ids)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": n, "total_tokens": len(self.prompt) + n}

    async def complete(self) -> dict:
        """The whole answer as one OpenAI object, once generation has finished."""
        parts, finish = [], None
        try:
            async for piece, fin in self.events():
                if piece:
                    parts.append(piece)
                finish = fin or finish
        finally:
            if self.ereq.finish_reason is None and finish is None:
                self.rt.engine.cancel(self.ereq)
        text = "".join(parts)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.name,
                    "choices": [choice], "usage": self.usage()}
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                "usage": self.usage()}

    def chunk(self, piece, finish, first: bool = False) -> str:
        """One server-sent event carrying ``piece`` (and the finish reason on the last one)."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
            obj = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.name,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        else:
            obj = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.name,
                   "choices": [{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            obj["usage"] = None
        return f"data: {json.dumps(obj)}\n\n"

    async def sse(self):
        """The answer as server-sent events; an engine error mid-stream becomes an error event."""
        done = False
        try:
            if self.chat:
                yield self.chunk(None, None, first=True)
            async for piece, fin in self.events():
                yield self.chunk(piece, fin)
            done = True
            if self.include_usage:
                obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                       "created": self.created, "model": self.name, "choices": [], "usage": self.usage()}
                yield f"data: {json.dumps(obj)}\n\n"
            yield "data: [DONE]\n\n"
        except ApiError as e:
            done = True
            yield f"data: {json.dumps(error_body(e.status, e.message, e.code))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not done and self.ereq.finish_reason is None:  # client went away: free the slot
                self.rt.engine.cancel(self.ereq)


async def generate(request: Request, rt, name: str, prompt: list[int], sp: SamplingParams, stop: list[str],
                   chat: bool, stream: bool, include_usage: bool):
    """Submits ``prompt`` for tenant ``name`` (the base's own name: no delta) and answers with the result."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    ereq = EngineRequest(prompt=prompt, tenant=None if name == rt.base_name else name, params=sp,
                         on_event=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
    submit(rt, name, ereq)
    gen = Generation(request, rt, name, prompt, ereq, queue, stop, chat, stream, include_usage)
    if not stream:
        return await gen.complete()
    return StreamingResponse(gen.sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
