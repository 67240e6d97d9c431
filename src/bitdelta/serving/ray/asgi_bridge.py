"""Run one HTTP request through an ASGI app in-process and stream its response out as plain values.

A scaled-out replica receives requests as Python objects (not sockets) but answers them with the
same FastAPI app ``bitdelta serve`` uses; this bridge feeds the request to the app and yields what
the app sends, as it sends it, so server-sent events keep streaming. Closing the generator early
tells the app the client went away (the app then cancels the engine request).

    req = HttpRequest("POST", "/v1/completions", headers=[("content-type", "application/json")], body=b"{...}")
    async for item in call_asgi(app, req):
        ...  # first a ResponseStart(status, headers), then bytes chunks
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class HttpRequest:
    method: str
    path: str
    query: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


@dataclass
class ResponseStart:
    status: int
    headers: list[tuple[str, str]]

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), default)


def _scope(req: HttpRequest) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": req.method.upper(), "scheme": "http", "path": req.path, "raw_path": req.path.encode(),
        "query_string": req.query.encode(), "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in req.headers],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80),
    }


async def call_asgi(app, req: HttpRequest, extra_headers: list[tuple[str, str]] = ()):
    """Yields one :class:`ResponseStart` (with ``extra_headers`` appended), then body chunks (bytes)."""
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await gone.wait()  # the app polls this for hang-ups; it resolves only when the consumer stops
        return {"type": "http.disconnect"}

    async def send(message):
        await out.put(message)

    async def run():
        try:
            await app(_scope(req), receive, send)
        finally:
            await out.put(None)

    task = asyncio.ensure_future(run())
    try:
        while True:
            msg = await out.get()
            if msg is None:
                break
            if msg["type"] == "http.response.start":
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in msg.get("headers", [])]
                yield ResponseStart(int(msg["status"]), headers + list(extra_headers))
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield bytes(msg["body"])
                if not msg.get("more_body", False):
                    break
    finally:
        gone.set()
        if not task.done():
            # give the app a moment to see the disconnect and clean up (cancel its engine request)
            await asyncio.wait([task], timeout=5)
            task.cancel()
        if task.done() and not task.cancelled():
            task.exception()  # mark it retrieved: Starlette has already logged it and answered 500
