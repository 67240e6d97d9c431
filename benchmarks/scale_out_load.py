"""The scale-out measurement's load generator: a closed loop of streamed completions through the
``openai`` client against the server's HTTP ingress, and the statistics of what came back.

A closed loop keeps ``concurrency`` requests in flight: each worker sends one, reads its stream to
the end and sends the next, until the tenant list is used up, ``duration_s`` has passed or a
controller says stop. Every request records when it was sent, when each content chunk arrived, how
many tokens the server counted (``stream_options.include_usage``), which replica answered
(``x-bitdelta-replica``) and each failed attempt. A failed attempt (an error event mid-stream, a 5xx,
a broken connection) is sent again up to ``retries`` times, as a client should; a request still
failing then is lost.

    records = asyncio.run(closed_loop(LoadSpec(url, stream, concurrency=8, max_tokens=64, vocab=32000)))
    summarize(records)["tok_s"], recovery(chunk_times(records), kill_at, window_s=2.0)
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from benchmarks._common import ms, pct
from benchmarks.routing_sim import zipf_weights

REPLICA_HEADER = "x-bitdelta-replica"


def tenant_stream(tenants: list[str], zipf_s: float, n: int, seed: int) -> list[str]:
    """``n`` tenant names drawn with Zipf(``zipf_s``) popularity (0: uniform), the first name the most popular."""
    return random.Random(seed).choices(tenants, weights=zipf_weights(len(tenants), zipf_s), k=n)


def prompt_ids(i: int, length: int, vocab: int) -> list[int]:
    """Request ``i``'s prompt: ``length`` token ids past the three special ids, the same for every run."""
    rng = random.Random(i)
    return [rng.randrange(3, vocab) for _ in range(length)]


@dataclass
class LoadSpec:
    url: str  # the ingress, e.g. http://127.0.0.1:8000
    tenants: list[str]  # one request per entry, in this order
    concurrency: int
    max_tokens: int
    vocab: int
    prompt_len: int = 32
    duration_s: float | None = None  # stop sending new requests after this long
    retries: int = 2  # client-side attempts after a failed one
    timeout_s: float = 300.0


@dataclass
class Attempt:
    """One try of a request: when it was sent, the replica that answered (once its headers came), its end."""

    start: float
    replica: str | None = None
    end: float | None = None
    error: str | None = None


@dataclass
class Record:
    """One request as the client saw it, over all its attempts."""

    tenant: str
    sent: float
    first: float | None = None  # first content chunk of the attempt that finished
    done: float | None = None  # end of the attempt that finished (None: lost, or still running)
    tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # content chunks of every attempt
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].end is None

    @property
    def replica(self) -> str | None:
        return self.attempts[-1].replica if self.attempts else None

    @property
    def failures(self) -> list[tuple[str | None, str]]:
        """(replica, error) of each failed attempt."""
        return [(a.replica, a.error) for a in self.attempts if a.error is not None]


def in_flight_at(records: list[Record], replica: str, t: float) -> int:
    """Attempts answered by ``replica`` that were sent before ``t`` and had not ended by then."""
    return sum(1 for r in records for a in r.attempts
               if a.replica == replica and a.start < t and (a.end is None or a.end >= t))


@dataclass
class LiveLoad:
    """What a controller running beside the loop sees and can do."""

    spec: LoadSpec
    start: float
    records: list[Record] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def in_flight_by_replica(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            if r.active and r.replica:
                out[r.replica] = out.get(r.replica, 0) + 1
        return out


async def stream_once(client, rec: Record, attempt: Attempt, i: int, spec: LoadSpec) -> None:
    """One attempt: streams the completion into ``rec`` (raises on any failure)."""
    first, tokens = None, 0
    async with client.completions.with_streaming_response.create(
            model=rec.tenant, prompt=prompt_ids(i, spec.prompt_len, spec.vocab), max_tokens=spec.max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}) as resp:
        attempt.replica = resp.headers.get(REPLICA_HEADER)
        async for chunk in await resp.parse():
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].text:
                rec.chunk_times.append(now)
                first = first or now
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    rec.first, rec.tokens, rec.done = first, tokens, time.perf_counter()


async def send(client, rec: Record, i: int, spec: LoadSpec) -> None:
    """Sends ``rec`` until one attempt finishes or ``spec.retries`` more attempts have failed."""
    import httpx
    import openai

    for k in range(spec.retries + 1):
        attempt = Attempt(time.perf_counter())
        rec.attempts.append(attempt)
        try:
            await stream_once(client, rec, attempt, i, spec)
            attempt.end = rec.done
            return
        except (openai.APIError, httpx.HTTPError) as e:
            attempt.end, attempt.error = time.perf_counter(), f"{type(e).__name__}: {str(e)[:160]}"
        await asyncio.sleep(0.2 * (k + 1))


async def closed_loop(spec: LoadSpec, controller=None) -> list[Record]:
    """Runs the load; ``controller(live)`` (a coroutine function) runs beside it and may set ``live.stop``."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=spec.concurrency + 8, max_keepalive_connections=spec.concurrency + 8)
    async with httpx.AsyncClient(limits=limits, timeout=spec.timeout_s) as http:
        client = openai.AsyncOpenAI(base_url=spec.url + "/v1", api_key="unused", max_retries=0,
                                    timeout=spec.timeout_s, http_client=http)
        live = LiveLoad(spec, time.perf_counter())
        next_index = iter(range(len(spec.tenants)))

        async def worker():
            for i in next_index:
                if live.stop.is_set() or (spec.duration_s and time.perf_counter() - live.start > spec.duration_s):
                    return
                rec = Record(spec.tenants[i], time.perf_counter())
                live.records.append(rec)
                await send(client, rec, i, spec)

        workers = [asyncio.ensure_future(worker()) for _ in range(spec.concurrency)]
        ctl = asyncio.ensure_future(controller(live)) if controller else None
        await asyncio.gather(*workers)
        if ctl is not None:
            live.stop.set()
            await ctl
        return live.records


# ---------------------------------------------------------------------------------- statistics


def summarize(records: list[Record]) -> dict:
    """Throughput (tokens of finished requests over the run's wall time) and TTFT / TPOT percentiles."""
    ok = [r for r in records if r.done is not None]
    start = min((r.sent for r in records), default=0.0)
    wall = max((r.done for r in ok), default=start) - start
    tokens = sum(r.tokens for r in ok)
    ttft = [r.first - r.sent for r in ok if r.first is not None]
    tpot = [(r.done - r.first) / (r.tokens - 1) for r in ok if r.first is not None and r.tokens > 1]
    return {"requests": len(records), "finished": len(ok), "lost": len(records) - len(ok),
            "failed_attempts": sum(len(r.failures) for r in records),
            "requests_with_failures": sum(1 for r in records if r.failures),
            "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall if wall > 0 else 0.0,
            "req_s": len(ok) / wall if wall > 0 else 0.0,
            "ttft_ms_p50": ms(pct(ttft, 50)), "ttft_ms_p99": ms(pct(ttft, 99)),
            "tpot_ms_p50": ms(pct(tpot, 50)), "tpot_ms_p99": ms(pct(tpot, 99))}


def chunk_times(records: list[Record]) -> list[float]:
    return sorted(t for r in records for t in r.chunk_times)


def rate(times: list[float], lo: float, hi: float) -> float:
    """Content chunks per second arriving in [lo, hi) (``times`` sorted)."""
    import bisect

    return (bisect.bisect_left(times, hi) - bisect.bisect_left(times, lo)) / (hi - lo) if hi > lo else 0.0


def recovery(times: list[float], kill_at: float, window_s: float, baseline_s: float | None = None,
             fraction: float = 0.9, step_s: float = 0.25) -> dict:
    """Throughput before ``kill_at`` (over ``baseline_s``, default 3 windows) and after it, in windows of
    ``window_s`` every ``step_s``: the lowest window, whether one fell below ``fraction`` of the baseline,
    and how long after ``kill_at`` the first window past that dip starts that is back at ``fraction``
    (0 without a dip; None when it never came back)."""
    baseline_s = baseline_s or 3 * window_s
    before = rate(times, kill_at - baseline_s, kill_at)
    end = times[-1] if times else kill_at
    t, lowest, dip_at, back = kill_at, None, None, None
    while t + window_s <= end:
        r = rate(times, t, t + window_s)
        lowest = r if lowest is None else min(lowest, r)
        if dip_at is None and r < fraction * before:
            dip_at = t
        elif dip_at is not None and back is None and r >= fraction * before:
            back = t - kill_at
        t += step_s
    if dip_at is None and lowest is not None:
        back = 0.0
    first = times[0] if times else kill_at
    per_second = [round(rate(times, s, s + 1.0), 1) for s in (kill_at + k for k in range(int(first - kill_at),
                                                                                          int(end - kill_at)))]
    return {"baseline_chunks_s": before, "lowest_chunks_s": lowest, "dipped": dip_at is not None,
            "recovered_after_s": back, "window_s": window_s, "fraction": fraction,
            "chunks_per_second_from": int(first - kill_at), "chunks_per_second": per_second}
