"""Decode steps launched ahead (bitdelta.serving.lookahead), on the CPU with the graph layout run
eagerly: the same tokens, finish reasons and events as without, through arrivals mid-run, mixed
tenants, stop tokens, length and context limits, cancellation, sampled requests beside greedy ones
and a KV pool small enough to preempt; and steps are in fact launched ahead (or not, where they may
not be)."""

from __future__ import annotations

import pytest
import torch

from bitdelta.serving.engine import Engine, Request, SamplingParams
from bitdelta.serving.kv_cache import KVCache
from bitdelta.serving.lookahead import LOOKAHEAD_ENV, lookahead_allowed, lookahead_choice
from bitdelta.serving.model import DeltaLlama
from bitdelta.serving.slots import DeltaSlots
from serving.engine_checks import base_and_row_deltas, emulate_graph_layout


@pytest.fixture(scope="module")
def served(tiny_models):
    return base_and_row_deltas(tiny_models)


def _engine(served, lookahead: bool, **kw):
    base_hf, deltas = served
    model = DeltaLlama.from_hf(base_hf)
    slots = DeltaSlots(model, max_gpu_deltas=2, max_cpu_deltas=4)
    for name, delta in deltas.items():
        slots.register(name, f"<memory:{name}>", delta=delta)
    engine = Engine(model, slots, max_batch=kw.pop("max_batch", 6), max_queue=32, kv_cache_mb=kw.pop("kv_cache_mb", 16),
                    lookahead=lookahead, **kw)
    emulate_graph_layout(engine)
    return engine


def _drive(engine, plan, cancel_at=None, max_steps=400):
    """Submits ``plan`` ((tenant, arrival step, prompt, SamplingParams)) at its steps; cancels request
    ``cancel_at[0]`` at step ``cancel_at[1]``. Returns (tokens, finish reason, events) per request."""
    reqs, events, step = [], [], 0
    pending = list(plan)
    while pending or any(r.finish_reason is None for r in reqs):
        for item in [p for p in pending if p[1] == step]:
            tenant, _, prompt, params = item
            log: list = []
            events.append(log)
            reqs.append(engine.submit(Request(prompt=prompt, tenant=tenant, params=params,
                                              on_event=lambda ev, log=log: log.append((ev.token, ev.finish)))))
            pending.remove(item)
        if cancel_at is not None and step == cancel_at[1]:
            engine.cancel(reqs[cancel_at[0]])
        engine.step()
        step += 1
        assert step < max_steps
    return [(r.output, r.finish_reason) for r in reqs], events


def _greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def _plan(vocab, stop_token=None):
    g = torch.Generator().manual_seed(3)

    def prompt(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [
        (None, 0, prompt(5), _greedy(14)),
        ("shk", 0, prompt(7), _greedy(9)),
        ("gsm", 0, prompt(4), _greedy(20, stop_token_ids=[stop_token] if stop_token is not None else [])),
        ("shk", 6, prompt(6), _greedy(8)),                 # arrives while the others decode
        (None, 9, prompt(3), _greedy(1)),                  # ends with its first token
        ("gsm", 12, prompt(9), _greedy(11)),
    ]


def test_same_tokens_and_events_with_steps_launched_ahead(served):
    vocab = served[0].config.vocab_size
    plain, plain_events = _drive(_engine(served, False), _plan(vocab))
    # a stop token the third request produces part way (so a row launched ahead is dropped)
    stop = plain[2][0][5]
    want, want_events = _drive(_engine(served, False), _plan(vocab, stop))
    engine = _engine(served, True)
    got, got_events = _drive(engine, _plan(vocab, stop))
    assert got == want and got_events == want_events
    assert want[2][1] == "stop" and len(want[2][0]) < 20
    assert engine.ahead_steps > 10  # most decode steps were launched ahead
    assert engine.ahead is None or not engine.ahead.live()


def test_context_limit_cancel_and_sampled_requests(served):
    vocab = served[0].config.vocab_size
    g = torch.Generator().manual_seed(4)
    sampled = SamplingParams(max_tokens=10, temperature=0.8, seed=5)
    plan = [(None, 0, torch.randint(3, vocab, (6,), generator=g).tolist(), _greedy(200)),  # runs into max_len
            ("shk", 0, torch.randint(3, vocab, (5,), generator=g).tolist(), _greedy(30)),   # cancelled
            ("gsm", 20, torch.randint(3, vocab, (5,), generator=g).tolist(), sampled)]      # not greedy
    runs = {}
    for ahead in (False, True):
        engine = _engine(served, ahead, max_len=40)
        runs[ahead] = _drive(engine, plan, cancel_at=(1, 8))
        if ahead:
            launched = engine.ahead_steps
    assert runs[True] == runs[False]
    (out0, why0), (out1, why1), (out2, _) = runs[True][0]
    assert why0 == "length" and len(out0) == 40 - 6 and why1 == "abort" and len(out2) == 10
    assert launched > 0


def test_preemption_with_steps_launched_ahead(served):
    vocab = served[0].config.vocab_size
    g = torch.Generator().manual_seed(6)
    plan = [(t, i, torch.randint(3, vocab, (12,), generator=g).tolist(), _greedy(40))
            for i, t in enumerate([None, "shk", "gsm", "shk"])]
    runs, engines = {}, {}
    for ahead in (False, True):
        # 18 blocks of 4 positions cannot hold four 52-token sequences (13 blocks each) at once: the
        # newest are preempted and resume
        model = DeltaLlama.from_hf(served[0])
        per_block = KVCache.bytes_per_block(model.num_layers, 4, model.kv_heads, model.head_dim, model.dtype)
        engines[ahead] = e = _engine(served, ahead, kv_cache_mb=18 * per_block / 2**20, kv_block_size=4, max_len=64)
        assert e.kv.num_blocks == 18
        runs[ahead] = _drive(e, plan)
    assert runs[True] == runs[False]
    assert all(why == "length" and len(out) == 40 for out, why in runs[True][0])
    assert engines[True].preemptions >= 1 and engines[True].ahead_steps > 0


def test_nothing_is_launched_ahead_without_graphs_or_when_off(served, monkeypatch):
    vocab = served[0].config.vocab_size
    off = _engine(served, False)
    _drive(off, _plan(vocab))
    assert off.ahead_steps == 0
    eager = _engine(served, True)
    eager.graphs = None  # no graph layout: every step is scheduled
    _drive(eager, _plan(vocab))
    assert eager.ahead_steps == 0
    monkeypatch.setenv(LOOKAHEAD_ENV, "auto")
    emulated = _engine(served, None)  # auto: only with captured graphs, which a CPU has not
    assert not lookahead_allowed(None, emulated.graphs)
    monkeypatch.setenv(LOOKAHEAD_ENV, "1")
    assert lookahead_allowed(None, emulated.graphs) and not lookahead_allowed(None, None)
    monkeypatch.setenv(LOOKAHEAD_ENV, "sometimes")
    with pytest.raises(ValueError, match="BITDELTA_LOOKAHEAD must be auto, 1 or 0"):
        lookahead_choice()
