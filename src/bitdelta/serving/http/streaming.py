"""One generation: submit token ids to the engine, turn its events into text, answer as JSON or SSE.

A request for ``n`` choices becomes ``n`` engine requests over the same prompt (choice ``i`` with
the seed :func:`~bitdelta.serving.sampling.derive_seed` gives it, so a seeded request repeats
exactly). The engine calls back from its own thread with one event per token and a last one with
the finish reason (or an error); :class:`Generation` moves them onto the event loop, detokenizes
each choice with the tenant's tokenizer, cuts at stop strings and answers OpenAI's way: one
``text_completion`` / ``chat.completion`` object, or with ``stream: true`` server-sent events, each
chunk one choice's piece with its ``index`` (and its log-probabilities when asked), ending in
``data: [DONE]``; with ``include_usage`` a last chunk with no choices carries the usage. A choice
that fails fails the whole answer (its siblings are cancelled). A client that hangs up cancels
its engine requests, which frees their batch slots.

    answer = Answer(chat=False, stream=True, include_usage=True, stop=["\\n"], logprobs=True)
    return await generate(request, rt, "zephyr", prompt_ids, sampling, n=2, answer=answer)
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field, replace

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine import EngineUnavailable, PromptTooLong, QueueFull
from ..engine import Request as EngineRequest
from ..sampling import SamplingParams, derive_seed
from ..text import Detokenizer
from .errors import ApiError, error_body
from .logprobs import Scored, chat_logprobs, completion_logprobs

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


@dataclass
class Answer:
    """How to answer: the endpoint's shape and what the client asked to see."""

    chat: bool
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    echo: str | None = None  # completions with echo: the prompt's text, put before each choice's text
    logprobs: bool = False  # report log-probabilities (the sampling settings say how many top ones)


class Choice:
    """One of the ``n`` sequences: its engine request, its detokenizer and what is still to send."""

    def __init__(self, index: int, ereq: EngineRequest, detokenizer: Detokenizer, offset_base: int):
        self.index, self.ereq, self.detokenizer = index, ereq, detokenizer
        self.offset_base = offset_base  # text_offset of the first generated token (the echoed prompt's length)
        self.finish: str | None = None
        self.pending: list[Scored] = []  # tokens whose log-probabilities have not been sent yet
        self.prompt: list[Scored] = []  # an echoed prompt's tokens, when log-probabilities are asked
        self.opened = False  # whether its first chunk has been sent (streams)

    def take(self) -> list[Scored]:
        out, self.pending = self.pending, []
        return out


@dataclass
class Piece:
    """New text of one choice, the log-probabilities of the tokens behind it, and its finish reason."""

    choice: Choice
    text: str
    finish: str | None
    scored: list[Scored]


class Generation:
    """Submitted engine requests (one per choice), read back as text pieces and finish reasons."""

    def __init__(self, request: Request, rt, name: str, prompt: list[int], ereqs: list[EngineRequest],
                 queue: asyncio.Queue, answer: Answer):
        self.request, self.rt, self.name, self.prompt, self.queue = request, rt, name, prompt, queue
        self.answer = answer
        self.text = rt.text(name)
        base = len(answer.echo) if answer.echo is not None else 0
        self.choices = [Choice(i, e, Detokenizer(self.text, answer.stop), base) for i, e in enumerate(ereqs)]
        self.id = ("chatcmpl-" if answer.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def cancel(self) -> None:
        for c in self.choices:
            if c.ereq.finish_reason is None:
                self.rt.engine.cancel(c.ereq)

    def _prompt_entries(self, scores: list) -> list[Scored]:
        """The echoed prompt's tokens with their log-probabilities and offsets in the echoed text."""
        decode = self.text.decode
        return [Scored(t, lp, len(decode(self.prompt[:i]))) for i, (t, lp) in enumerate(zip(self.prompt, scores))]

    async def events(self):
        """Yields :class:`Piece` s until every choice has finished; raises ApiError on an engine error."""
        engine, stream = self.rt.engine, self.answer.stream
        live = {c.index for c in self.choices}
        checked = time.monotonic()
        while live:
            try:
                item = await asyncio.wait_for(self.queue.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                item = None
            if not stream and time.monotonic() - checked > DISCONNECT_POLL_S:  # streams notice hang-ups by themselves
                checked = time.monotonic()
                if await self.request.is_disconnected():
                    self.cancel()
                    return
            if item is None:
                continue
            index, ev = item
            c = self.choices[index]
            if c.finish is not None:  # cut at a stop string: what the engine still sends is dropped
                continue
            if ev.prompt_logprobs is not None:
                c.prompt = self._prompt_entries(ev.prompt_logprobs)
                continue
            if ev.token is not None:
                det = c.detokenizer
                offset = c.offset_base + len(det.full)
                piece, hit = det.push(ev.token)
                if self.answer.logprobs:
                    c.pending.append(Scored(ev.token, ev.logprob, offset))
                if hit:
                    engine.cancel(c.ereq, "stop")
                    c.finish = "stop"
                    live.discard(index)
                    yield Piece(c, piece, "stop", c.take())
                elif piece:
                    yield Piece(c, piece, None, c.take())
                continue
            if ev.finish == "error":
                self.cancel()
                code = getattr(ev, "code", None) or "engine_error"
                raise ApiError(503 if code == "engine_unavailable" else 500, ev.error or "generation failed", code)
            c.finish = "stop" if ev.finish == "stop" else "length"
            live.discard(index)
            yield Piece(c, c.detokenizer.flush(), c.finish, c.take())

    def usage(self) -> dict:
        n = sum(len(c.detokenizer.ids) for c in self.choices)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": n, "total_tokens": len(self.prompt) + n}

    def _logprobs(self, entries: list[Scored]):
        if not self.answer.logprobs:
            return None
        return (chat_logprobs if self.answer.chat else completion_logprobs)(self.text, entries)

    async def complete(self) -> dict:
        """The whole answer as one OpenAI object, once every choice has finished."""
        parts: dict[int, list[str]] = {c.index: [] for c in self.choices}
        scored: dict[int, list[Scored]] = {c.index: [] for c in self.choices}
        try:
            async for piece in self.events():
                parts[piece.choice.index].append(piece.text)
                scored[piece.choice.index] += piece.scored
        finally:
            if any(c.finish is None for c in self.choices):
                self.cancel()
        choices = []
        for c in self.choices:
            text, entries = "".join(parts[c.index]), scored[c.index]
            if self.answer.chat:
                choices.append({"index": c.index, "message": {"role": "assistant", "content": text},
                                "logprobs": self._logprobs(entries), "finish_reason": c.finish})
                continue
            if self.answer.echo is not None:
                text, entries = self.answer.echo + text, c.prompt + entries
            choices.append({"index": c.index, "text": text, "logprobs": self._logprobs(entries),
                            "finish_reason": c.finish})
        return {"id": self.id, "object": "chat.completion" if self.answer.chat else "text_completion",
                "created": self.created, "model": self.name, "choices": choices, "usage": self.usage()}

    def chunk(self, c: Choice, text: str | None, finish: str | None, scored: list[Scored],
              opening: bool = False) -> str:
        """One server-sent event carrying choice ``c``'s ``text`` (and its finish reason on its last one)."""
        if self.answer.chat:
            delta = {"role": "assistant", "content": ""} if opening else ({"content": text} if text else {})
            choice = {"index": c.index, "delta": delta, "logprobs": None if opening else self._logprobs(scored),
                      "finish_reason": finish}
            obj = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.name,
                   "choices": [choice]}
        else:
            obj = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.name,
                   "choices": [{"index": c.index, "text": text or "", "logprobs": self._logprobs(scored),
                                "finish_reason": finish}]}
        if self.answer.include_usage:
            obj["usage"] = None
        return f"data: {json.dumps(obj)}\n\n"

    def _opening(self, c: Choice):
        """The chunk that opens choice ``c``: the role (chat) or the echoed prompt (completions)."""
        c.opened = True
        if self.answer.chat:
            return self.chunk(c, None, None, [], opening=True)
        if self.answer.echo is not None:
            return self.chunk(c, self.answer.echo, None, c.prompt)
        return None

    async def sse(self):
        """The answer as server-sent events; an engine error mid-stream becomes an error event."""
        done = False
        try:
            if self.answer.chat:
                for c in self.choices:
                    yield self._opening(c)
            async for piece in self.events():
                c = piece.choice
                if not c.opened:  # an echoed prompt goes first (its log-probabilities came before any token)
                    opening = self._opening(c)
                    if opening:
                        yield opening
                yield self.chunk(c, piece.text, piece.finish, piece.scored)
            done = True
            if self.answer.include_usage:
                obj = {"id": self.id, "object": "chat.completion.chunk" if self.answer.chat else "text_completion",
                       "created": self.created, "model": self.name, "choices": [], "usage": self.usage()}
                yield f"data: {json.dumps(obj)}\n\n"
            yield "data: [DONE]\n\n"
        except ApiError as e:
            done = True
            yield f"data: {json.dumps(error_body(e.status, e.message, e.code))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # client went away: free the slots
                self.cancel()


async def generate(request: Request, rt, name: str, prompt: list[int], sp: SamplingParams, n: int, answer: Answer):
    """Submits ``n`` choices of ``prompt`` for tenant ``name`` (the base's own name: no delta) and answers."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    ereqs: list[EngineRequest] = []
    for i in range(n):
        params = sp if sp.seed is None else replace(sp, seed=derive_seed(sp.seed, i))
        ereq = EngineRequest(prompt=prompt, tenant=None if name == rt.base_name else name, params=params,
                             on_event=lambda ev, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, ev)))
        try:
            submit(rt, name, ereq)
        except ApiError:
            for e in ereqs:  # all or nothing
                rt.engine.cancel(e)
            raise
        ereqs.append(ereq)
    gen = Generation(request, rt, name, prompt, ereqs, queue, answer)
    if not answer.stream:
        return await gen.complete()
    return StreamingResponse(gen.sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
