"""Fault isolation in the serving engine, end to end over HTTP: one request's failure ends that request only.

A private server (base + the two default deltas) takes injected faults: an exception inside one
request's forward, NaN logits for one request, a failure of the engine loop itself. Other tenants'
streams running at the same time must finish with exactly the text they produce without the fault;
a stopped engine answers 503 at once (never a hang), /health says why, and the engine restarts.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from bitdelta.serving.engine import Engine, EngineUnavailable, Request, SamplingParams

httpx = pytest.importorskip("httpx")  # an optional extra (bitdelta[test])
openai = pytest.importorskip("openai")  # an optional extra (bitdelta[test])

MAGIC, RUN = 2, 8  # a prompt of RUN pad tokens marks the request whose computation the tests break
STREAM_TOKENS = 24


@pytest.fixture(scope="module")
def fserver(tiny_models, delta_dir, live_server):
    s = live_server(["--base", str(tiny_models["base"]), "--base-name", "base",
                    "--delta", f"shakespeare={delta_dir / 'shakespeare'}", "--delta", f"gsm8k={delta_dir / 'gsm8k'}",
                    "--max-batch", "8", "--kv-cache-mb", "32"])
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(fserver):
    return openai.OpenAI(base_url=fserver.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _marked(tokens: list[int]) -> bool:
    """Whether a token list holds the marker run (decode steps add one token per sequence: never RUN in a row)."""
    s = "," + ",".join(map(str, tokens)) + ","
    return ("," + ",".join([str(MAGIC)] * RUN) + ",") in s


def _marked_rows(batch) -> list[int]:
    """Logit rows (sequences) of a step whose new tokens hold the marker run."""
    toks, rows, off = batch.tokens.tolist(), [], 0
    for j, (_, _, n) in enumerate(batch.seqs):
        if _marked(toks[off:off + n]):
            rows.append(j)
        off += n
    return rows


class Injector:
    """Wraps the runtime model's forward: slows every step a little (so streams overlap the culprit)
    and breaks the marked request's computation, by raising or by NaN logits."""

    def __init__(self, rt, mode: str):
        self.rt, self.mode, self.orig = rt, mode, rt.model.forward
        self.raised_with: list[int] = []  # number of sequences in each step that raised
        self.poisoned = 0

    def __call__(self, batch, kv, deltas=None):
        time.sleep(0.01)
        rows = _marked_rows(batch)
        if rows and self.mode == "raise":
            self.raised_with.append(len(batch.seqs))
            raise RuntimeError("injected fault in one request's computation")
        logits = self.orig(batch, kv, deltas)
        if rows and self.mode == "nan":
            logits[rows] = float("nan")
            self.poisoned += 1
        return logits

    def __enter__(self):
        self.rt.model.forward = self
        return self

    def __exit__(self, *exc):
        del self.rt.model.forward  # back to the class's method


STREAMS = {"shakespeare": "To be, or not to be", "gsm8k": "Question: what is 3 + 4?"}


def _stream_texts(client, started: dict[str, threading.Event]):
    def one(model):
        parts = []
        for chunk in client.completions.create(model=model, prompt=STREAMS[model], temperature=0, stream=True,
                                               max_tokens=STREAM_TOKENS, extra_body={"ignore_eos": True}):
            parts.append(chunk.choices[0].text)
            started[model].set()
        return "".join(parts)

    return one


def _sse_events(r: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]


def _with_streams(fserver, client, culprit):
    """Runs the two greedy streams; once both are producing, ``culprit()``; returns its result and the texts."""
    started = {m: threading.Event() for m in STREAMS}
    with ThreadPoolExecutor(2) as pool:
        futs = {m: pool.submit(_stream_texts(client, started), m) for m in STREAMS}
        assert all(e.wait(30) for e in started.values()), "streams did not start"
        running = fserver.runtime.engine.stats()["running"]
        out = culprit()
        texts = {m: f.result(timeout=60) for m, f in futs.items()}
    return running, out, texts


@pytest.fixture(scope="module")
def reference(client):
    """Each stream's greedy text without any fault (the same request, alone)."""
    return {m: client.completions.create(model=m, prompt=p, temperature=0, max_tokens=STREAM_TOKENS,
                                         extra_body={"ignore_eos": True}).choices[0].text for m, p in STREAMS.items()}


# ---------------------------------------------------------------------------------- sampling guard


@pytest.mark.slow  # a live server
def test_tiny_temperatures_act_as_greedy(client):
    greedy = client.completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=4, temperature=0)
    msgs = [{"role": "user", "content": "ROMEO:"}]
    greedy_chat = client.chat.completions.create(model="gsm8k", messages=msgs, max_tokens=4, temperature=0)
    for t in (1e-300, 1e-45, 1e-40, 1e-6):
        r = client.completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=4, temperature=t)
        assert r.choices[0].text == greedy.choices[0].text, t
        c = client.chat.completions.create(model="gsm8k", messages=msgs, max_tokens=4, temperature=t)
        assert c.choices[0].message.content == greedy_chat.choices[0].message.content, t


# ---------------------------------------------------------------------------------- per-request faults


@pytest.mark.slow  # a live server
def test_exception_in_one_request_fails_only_it(fserver, client, reference):
    rt = fserver.runtime
    errors_before = rt.engine.stats()["request_errors"]
    body = {"model": "base", "prompt": [MAGIC] * RUN, "max_tokens": 4}
    with Injector(rt, "raise") as inj, httpx.Client(base_url=fserver.url, timeout=30) as http:
        running, r, texts = _with_streams(fserver, client, lambda: http.post("/v1/completions", json=body))
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            assert s.status_code == 200
            events = _sse_events(s)
    assert running == 2  # the culprit arrived while both streams were decoding
    assert inj.raised_with[0] == 3  # ... and broke a batched forward holding all three
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "engine_error" and "injected fault" in err["message"] and err["type"] == "server_error"
    assert "error" in events[-1] and "injected fault" in events[-1]["error"]["message"]
    assert texts == reference  # the other tenants never noticed
    h = httpx.get(fserver.url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert h.json()["request_errors"] == errors_before + 2 and h.json()["restart_count"] == 0
    assert h.json()["free_kv_slots"] == h.json()["max_batch"]  # the failed requests' slots came back


@pytest.mark.slow  # a live server
def test_non_finite_logits_fail_only_their_request(fserver, client, reference):
    rt = fserver.runtime
    body = {"model": "shakespeare", "prompt": [MAGIC] * RUN, "max_tokens": 4, "temperature": 0.7}
    with Injector(rt, "nan") as inj, httpx.Client(base_url=fserver.url, timeout=30) as http:
        running, r, texts = _with_streams(fserver, client, lambda: http.post("/v1/completions", json=body))
        chat = {"model": "gsm8k", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
        assert http.post("/v1/chat/completions", json=chat).status_code == 200  # unmarked: fine
        with http.stream("POST", "/v1/completions", json={**body, "stream": True, "temperature": 0}) as s:
            events = _sse_events(s)
    assert running == 2 and inj.poisoned == 2
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_output" and "non-finite" in err["message"] and "shakespeare" in err["message"]
    assert events[-1]["error"]["code"] == "invalid_output"
    assert texts == reference
    assert httpx.get(fserver.url + "/health").status_code == 200


# ---------------------------------------------------------------------------------- engine stops


def _wait_health(url, status, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = httpx.get(url + "/health", timeout=5)
        if h.status_code == status:
            return h.json()
        time.sleep(0.05)
    raise AssertionError(f"/health never answered {status}")


@pytest.mark.slow  # a live server
def test_engine_failure_restarts(fserver, client):
    rt = fserver.runtime
    eng = rt.engine
    want = client.completions.create(model="gsm8k", prompt="Once", max_tokens=6, temperature=0).choices[0].text
    eng.restart_delay_s = 1.0
    armed = {"n": 1}
    real_step = eng.step

    def step():
        if armed["n"]:
            armed["n"] -= 1
            raise RuntimeError("injected engine failure")
        real_step()

    eng.step = step
    try:
        t = time.monotonic()
        r = httpx.post(fserver.url + "/v1/completions", json={"model": "gsm8k", "prompt": "Once", "max_tokens": 6},
                       timeout=10)
        assert r.status_code == 503 and time.monotonic() - t < 1.0, r.text
        assert r.json()["error"]["code"] == "engine_unavailable" and "restarting" in r.json()["error"]["message"]
        h = httpx.get(fserver.url + "/health")
        if h.status_code == 503:  # still pausing before the restart
            assert h.json()["status"] == "error" and "injected engine failure" in h.json()["error"]
            assert h.json()["restarting"] is True
            t = time.monotonic()
            r = httpx.post(fserver.url + "/v1/completions", json={"model": "base", "prompt": "a", "max_tokens": 2},
                           timeout=10)
            assert r.status_code in (200, 503) and time.monotonic() - t < 1.0
        h = _wait_health(fserver.url, 200)
        assert h["restart_count"] == 1 and "injected engine failure" in h["last_error"]
        assert h["free_kv_slots"] == h["max_batch"]
        again = client.completions.create(model="gsm8k", prompt="Once", max_tokens=6, temperature=0).choices[0].text
        assert again == want
        # The model fails for every request, even alone: no request is to blame, so the engine restarts.
        rt.model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost"))
        try:
            r = httpx.post(fserver.url + "/v1/completions", json={"model": "base", "prompt": "b", "max_tokens": 2},
                           timeout=10)
        finally:
            del rt.model.forward
        assert r.status_code == 503 and "device lost" in r.json()["error"]["message"], r.text
        h = _wait_health(fserver.url, 200)
        assert h["restart_count"] == 2 and "probe" in h["last_error"]
        again = client.completions.create(model="gsm8k", prompt="Once", max_tokens=6, temperature=0).choices[0].text
        assert again == want
    finally:
        del eng.step


@pytest.mark.slow  # a live server
def test_without_auto_restart_it_stays_down_and_never_hangs(fserver):
    eng = fserver.runtime.engine
    eng.auto_restart = False  # the last test of the module: this server does not come back
    eng.step = lambda: (_ for _ in ()).throw(RuntimeError("injected engine failure"))
    body = {"model": "shakespeare", "prompt": "Once", "max_tokens": 4}
    r = httpx.post(fserver.url + "/v1/completions", json=body, timeout=10)
    assert r.status_code == 503
    _wait_health(fserver.url, 503)
    for _ in range(2):
        for path, extra in (("/v1/completions", {"stream": True}), ("/v1/chat/completions", {})):
            req = {**body, **extra} if "chat" not in path else {"model": "gsm8k", "max_tokens": 2,
                                                                 "messages": [{"role": "user", "content": "x"}]}
            t = time.monotonic()
            r = httpx.post(fserver.url + path, json=req, timeout=5)
            assert r.status_code == 503 and time.monotonic() - t < 1.0, r.text
            assert r.json()["error"]["code"] == "engine_unavailable"
        time.sleep(0.3)
    h = httpx.get(fserver.url + "/health").json()
    assert h["status"] == "error" and h["restarting"] is False and "automatic restart is off" in h["error"]
    with pytest.raises(EngineUnavailable):
        eng.submit(Request(prompt=[5, 6], params=SamplingParams(max_tokens=1)))


# ---------------------------------------------------------------------------------- engine settings


@pytest.fixture(scope="module")
def tiny_model(tiny_models):
    from transformers import AutoModelForCausalLM

    from bitdelta.serving.model import DeltaLlama

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DeltaLlama.from_hf(AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float32))


def test_engine_limits_name_their_flags(tiny_model):
    from bitdelta.serving.slots import DeltaSlots

    slots = DeltaSlots(tiny_model, max_gpu_deltas=1)
    for kw, flag in (("max_batch", "--max-batch"), ("max_queue", "--max-queue"),
                     ("max_prefill_tokens", "--max-prefill-tokens")):
        with pytest.raises(ValueError, match=f"^{flag} must be at least 1"):
            Engine(tiny_model, slots, kv_cache_mb=16, **{kw: 0})
    eng = Engine(tiny_model, slots, max_batch=2, kv_cache_mb=16)
    with pytest.raises(ValueError, match="seed") as e:
        eng.submit(Request(prompt=[5], params=SamplingParams(temperature=1.0, seed=2**64)))
    assert e.value.param == "seed"


def test_restarts_are_bounded(tiny_model):
    """A fault that persists does not spin: after max_restarts_per_minute restarts the engine stays down."""
    from bitdelta.serving.slots import DeltaSlots

    eng = Engine(tiny_model, DeltaSlots(tiny_model, max_gpu_deltas=1), max_batch=2, kv_cache_mb=16,
                 restart_delay_s=0.05, max_restarts_per_minute=2)
    eng.step = lambda: (_ for _ in ()).throw(RuntimeError("persistent fault"))
    eng.start()
    try:
        finishes = []
        for _ in range(3):
            deadline = time.time() + 10
            while not eng.alive and time.time() < deadline:
                time.sleep(0.01)
            done = threading.Event()
            eng.submit(Request(prompt=[5, 6], params=SamplingParams(max_tokens=2),
                               on_event=lambda ev, done=done: ev.finish and (finishes.append(ev), done.set())))
            assert done.wait(10)
        assert [ev.code for ev in finishes] == ["engine_unavailable"] * 3
        eng._thread.join(timeout=10)
        assert not eng._thread.is_alive() and not eng.alive
        st = eng.stats()
        assert st["restart_count"] == 2 and "stays down" in eng.error and "persistent fault" in eng.error
        with pytest.raises(EngineUnavailable, match="stays down"):
            eng.submit(Request(prompt=[5], params=SamplingParams(max_tokens=1)))
    finally:
        eng.shutdown()
