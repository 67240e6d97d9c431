"""One served workload, measured: requests submitted at their arrival times to a fresh engine,
stepped until done (or cut at a deadline or step limit, the rest extrapolated), then throughput,
TTFT / ITL / TPOT percentiles, decode step times, memory and the memory roofline of its decode steps.

    r = run_workload(run, model, slots, ["tenant-000", None], terms=terms, bw=bw, label="bitdelta-2")
    r["tok_s"], r["ttft_ms_p50"], r["roofline"]["pct"]

``classify(tenant)``, called as each request arrives (before it is submitted), labels it (e.g. where
its delta is then); the result then splits TTFT / TPOT by label and lists every request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from bitdelta.serving.engine import Engine, Request, SamplingParams

from .._common import ms, pct, step_bytes
from .recorder import StepRecorder
from .workload import kv_bytes_per_seq, make_prompts


@dataclass
class Workload:
    tenants: list  # one request per entry: a tenant name, or None for the base
    new_tokens: int
    arrivals: list[float]  # seconds after the start, per request
    max_batch: int
    label: str


@dataclass
class Trace:
    """What happened: requests, each one's token times, the engine steps, and why it was cut."""

    start: float
    reqs: list = field(default_factory=list)
    token_times: dict = field(default_factory=dict)
    arrival_at: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)  # request id -> classify(tenant) at arrival
    steps: list = field(default_factory=list)
    truncated: str | None = None


def run_workload(run, model, slots, tenants, *, arrivals=None, max_batch=None, new_tokens=None, deadline=None,
                 max_decode_steps=None, profile_step=None, terms=None, bw=None, label="", classify=None) -> dict:
    """Serves ``len(tenants)`` requests (tenant names, None = base) and measures them.

    ``arrivals``: offsets in seconds (default: all at 0). Decode stops early at ``deadline`` or
    after ``max_decode_steps``; the rest is then extrapolated from the mean measured decode step.
    """
    wl = Workload(list(tenants), new_tokens or run.args.new_tokens, arrivals or [0.0] * len(tenants),
                  max_batch or len(tenants), label)
    recorder = StepRecorder(run.dev, profile_step, full_batch=len(wl.tenants) if profile_step is not None else None)
    engine, graphs = open_engine(run, model, slots, wl, recorder)
    prompts = make_prompts(len(wl.tenants), run.args.prompt_len, model.vocab_size, seed=len(tenants) + len(label))
    trace = drive(engine, recorder, wl, prompts, deadline, max_decode_steps, classify)
    remaining = max((wl.new_tokens - len(r.output) for r in trace.reqs), default=0) if trace.truncated else 0
    for r in trace.reqs:
        engine.cancel(r)
    engine.step()
    kv_bytes = engine.kv.k.numel() * engine.kv.k.element_size() * 2
    if graphs is not None:
        graphs["replays"] = engine.graphs.replays
        graphs["launched_ahead"] = engine.ahead_steps  # decode steps queued before the previous one was read
        graphs["prompt_steps_replayed"] = engine.prompt_graph_steps  # steps with prompt tokens as graph rows
    peak = torch.cuda.max_memory_allocated() if run.dev.on_gpu else None
    slots.on_ready = None
    del engine  # its KV cache is freed now, before the next run sizes its own
    run.dev.free_memory()
    res = summarize(wl, trace, run.args.prompt_len)
    if classify is not None:
        res.update(by_label(trace))
    res.update(kv_cache_bytes=kv_bytes, peak_allocated_bytes=peak, truncated=trace.truncated,
               profile=recorder.profile, cuda_graphs=graphs)
    decode = [s for s in trace.steps if s["decode"]]
    if trace.truncated and decode:
        est = res["wall_s"] + remaining * sum(s["wall_s"] for s in decode) / len(decode)
        res.update(extrapolated=True, remaining_steps=remaining, est_wall_s=est,
                   est_tok_s=len(wl.tenants) * wl.new_tokens / est)
    if terms and bw and decode:
        res["roofline"] = roofline(decode, terms, bw)
    return res


def open_engine(run, model, slots, wl: Workload, recorder: StepRecorder):
    """A fresh engine sized for ``wl`` (KV cache for its batch, CUDA graphs unless turned off)."""
    max_len = run.args.prompt_len + wl.new_tokens
    per_seq = kv_bytes_per_seq(model, max_len)
    if run.dev.on_gpu:
        torch.cuda.reset_peak_memory_stats()
    engine = Engine(model, slots, max_batch=wl.max_batch, max_queue=len(wl.tenants) + 1, max_len=max_len,
                    kv_cache_mb=(per_seq * wl.max_batch + 2**20) / 2**20,
                    cuda_graphs=False if run.args.no_cuda_graphs else None, wrap_forward=recorder)
    graphs = engine.graphs.stats() if engine.graphs is not None else None
    if graphs and wl.label != "warm":
        run.log(f"{wl.label}: {graphs['graphs']} CUDA graphs (batch buckets {graphs['batch_buckets']}, spans "
                f"{graphs['span_buckets']}) captured in {graphs['capture_s']:.2f}s")
    return engine, graphs


def drive(engine, recorder: StepRecorder, wl: Workload, prompts, deadline, max_decode_steps, classify=None) -> Trace:
    """Submits each request at its arrival time and steps the engine until every request is done,
    or until ``deadline`` / ``max_decode_steps`` cuts it short (``Trace.truncated`` says which)."""
    order = sorted(range(len(wl.tenants)), key=lambda i: wl.arrivals[i])
    tr = Trace(start=time.perf_counter())
    while True:
        now = time.perf_counter()
        while order and tr.start + wl.arrivals[order[0]] <= now:
            submit(engine, tr, wl, prompts, order.pop(0), classify)
        if engine.running or engine.waiting:
            t = time.perf_counter()
            steps = engine.steps
            engine.step()
            te = time.perf_counter()
            rec = recorder.of(engine.read_batch) if engine.steps > steps else None
            if rec is not None:
                tr.steps.append({**rec, "wall_s": te - t, "end": te})
            else:
                idle_until_woken(engine)
            n_dec = sum(s["decode"] for s in tr.steps)
            over_time = deadline is not None and te > deadline
            over_steps = max_decode_steps is not None and n_dec >= max_decode_steps
            if (over_time or over_steps) and (engine.running or engine.waiting or order):
                tr.truncated = "time budget" if over_time else f"{max_decode_steps} decode steps"
                return tr
        elif order:
            time.sleep(max(0.0, min(0.005, tr.start + wl.arrivals[order[0]] - time.perf_counter())))
        else:
            return tr


def idle_until_woken(engine, most_s: float = 0.002) -> None:
    """Waits (GIL released) for the engine's wake-up, as the server's loop does when every waiting
    request's delta is still loading: spinning on ``step()`` instead would starve the pool's loader
    thread of the GIL and slow the very loads being waited for (seconds per load on a CPU)."""
    with engine.cond:
        engine.cond.wait(timeout=most_s)


def submit(engine, tr: Trace, wl: Workload, prompts, i: int, classify=None) -> None:
    times = []
    label = classify(wl.tenants[i]) if classify is not None else None
    r = Request(prompt=prompts[i], tenant=wl.tenants[i],
                params=SamplingParams(max_tokens=wl.new_tokens, temperature=0, ignore_eos=True),
                on_event=lambda ev: times.append(time.perf_counter()) if ev.token is not None else None)
    engine.submit(r)
    tr.token_times[r.id] = times
    tr.arrival_at[r.id] = tr.start + wl.arrivals[i]
    tr.labels[r.id] = label
    tr.reqs.append(r)


def summarize(wl: Workload, tr: Trace, prompt_len: int) -> dict:
    """Throughput, step counts and latency percentiles of a finished (or cut) trace."""
    dec = [s for s in tr.steps if s["decode"]]
    times = [tr.token_times[r.id] for r in tr.reqs]
    firsts = ttfts(tr, tr.reqs)
    itl = [b - a for t in times for a, b in zip(t, t[1:])]
    tpot = tpots(tr, tr.reqs)
    produced = sum(len(t) for t in tr.token_times.values())
    wall = max((t[-1] for t in tr.token_times.values() if t), default=tr.start) - tr.start
    dec_time = sum(s["wall_s"] for s in dec)
    return {"label": wl.label, "requests": len(wl.tenants), "max_batch": wl.max_batch, "new_tokens": wl.new_tokens,
            "prompt_len": prompt_len, "tokens": produced, "wall_s": wall,
            "tok_s": produced / wall if wall > 0 else None,
            "steps": len(tr.steps), "decode_steps": len(dec), "prefill_steps": len(tr.steps) - len(dec),
            "decode_tok_s": sum(s["tokens"] for s in dec) / dec_time if dec_time else None,
            "decode_step_ms_mean": 1e3 * dec_time / len(dec) if dec else None,
            "host_enqueue_ms_mean": 1e3 * sum(s.get("host_s", 0) for s in dec) / len(dec) if dec else None,
            "ttft_ms_p50": ms(pct(firsts, 50)), "ttft_ms_p99": ms(pct(firsts, 99)),
            "itl_ms_p50": ms(pct(itl, 50)), "itl_ms_p99": ms(pct(itl, 99)),
            "tpot_ms_p50": ms(pct(tpot, 50)), "tpot_ms_p99": ms(pct(tpot, 99))}


def ttfts(tr: Trace, reqs) -> list[float]:
    """Seconds from each request's arrival to its first token (requests without one left out)."""
    return [tr.token_times[r.id][0] - tr.arrival_at[r.id] for r in reqs if tr.token_times[r.id]]


def tpots(tr: Trace, reqs) -> list[float]:
    """Each request's mean seconds per output token after its first (requests with two or more tokens)."""
    return [(t[-1] - t[0]) / (len(t) - 1) for t in (tr.token_times[r.id] for r in reqs) if len(t) > 1]


def by_label(tr: Trace) -> dict:
    """TTFT / TPOT percentiles per arrival label, and every request (tenant, label, arrival, latencies)."""
    groups: dict = {}
    for r in tr.reqs:
        groups.setdefault(tr.labels[r.id], []).append(r)
    split = {lab: {"requests": len(rs), "ttft_ms_p50": ms(pct(ttfts(tr, rs), 50)),
                   "ttft_ms_p99": ms(pct(ttfts(tr, rs), 99)), "tpot_ms_p50": ms(pct(tpots(tr, rs), 50)),
                   "tpot_ms_p99": ms(pct(tpots(tr, rs), 99))} for lab, rs in groups.items()}
    detail = []
    for r in tr.reqs:
        t = tr.token_times[r.id]
        detail.append({"tenant": r.tenant, "label": tr.labels[r.id], "arrival_s": tr.arrival_at[r.id] - tr.start,
                       "tokens": len(t), "first_token_s": t[0] - tr.start if t else None,
                       "ttft_ms": ms(t[0] - tr.arrival_at[r.id]) if t else None,
                       "tpot_ms": ms((t[-1] - t[0]) / (len(t) - 1)) if len(t) > 1 else None})
    return {"by_label": split, "per_request": detail}


def roofline(decode_steps: list[dict], terms: dict, bw: float) -> dict:
    """Measured decode time against the time to move each step's bytes at the copy bandwidth."""
    dec_time = sum(s["wall_s"] for s in decode_steps)
    nbytes = [step_bytes(terms, s["tokens"], s["tenants"], s["ctx"]) for s in decode_steps]
    roof = sum(nbytes) / (bw * 1e9)
    return {"decode_time_s": dec_time, "roofline_time_s": roof, "pct": 100 * roof / dec_time,
            "roofline_tok_s": sum(s["tokens"] for s in decode_steps) / roof,
            "bytes_per_step_mean": sum(nbytes) / len(decode_steps)}


def summary_line(mode: str, n: int, r: dict) -> str:
    tok = r.get("est_tok_s") or r.get("tok_s") or 0
    roof = r.get("roofline", {}).get("pct")
    return (f"{mode:8s} N={n:<3d} {tok:9.1f} tok/s{' (extrap.)' if r.get('extrapolated') else ''}"
            f"  decode step {r.get('decode_step_ms_mean') or 0:8.1f} ms"
            f" (host {r.get('host_enqueue_ms_mean') or 0:6.1f})"
            f"  TTFT p50/p99 {r.get('ttft_ms_p50') or 0:.0f}/{r.get('ttft_ms_p99') or 0:.0f} ms"
            f"  ITL p50/p99 {r.get('itl_ms_p50') or 0:.1f}/{r.get('itl_ms_p99') or 0:.1f} ms"
            + (f"  {roof:.1f}% of roofline" if roof else ""))
