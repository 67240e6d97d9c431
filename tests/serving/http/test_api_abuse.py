"""Hostile clients against the HTTP API: every bad request gets a 4xx with an OpenAI error body, fast.

Runs on the shared ``server`` fixture (conftest.py). Each case is a request no well-behaved client
sends: sampling values at or past their bounds, seeds outside 64 bits, absurd lengths, wrong types,
malformed bodies, huge or unknown names. None may give a 500 or hang, and the server must still
serve afterwards; ``/metrics`` must not grow with the names clients invent.
"""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")  # an optional extra (bitdelta[test])

OK = {"model": "shakespeare", "prompt": "hi", "max_tokens": 2}
CHAT = {"model": "gsm8k", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TIMEOUT = httpx.Timeout(20, connect=5)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def _error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    assert len(err["message"]) < 1000  # never echoes a huge client string back
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def _healthy(http) -> None:
    h = http.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok", h.text
    assert http.post("/v1/completions", json=OK).status_code == 200


CASES = [  # (id, path, json body, status, code, param)
    # sampling values out of range or of the wrong type
    ("temperature-negative", "/v1/completions", {**OK, "temperature": -0.1}, 422, "invalid_value", "temperature"),
    ("temperature-huge", "/v1/completions", {**OK, "temperature": 1e308}, 422, "invalid_value", "temperature"),
    ("temperature-string", "/v1/chat/completions", {**CHAT, "temperature": "hot"}, 422, "invalid_value", None),
    ("top_p-zero", "/v1/completions", {**OK, "top_p": 0}, 422, "invalid_value", "top_p"),
    ("top_p-above-one", "/v1/chat/completions", {**CHAT, "top_p": 1.5}, 422, "invalid_value", "top_p"),
    ("top_k-below-minus-one", "/v1/completions", {**OK, "top_k": -5}, 422, "invalid_value", "top_k"),
    # seeds torch.Generator cannot take
    ("seed-2**64", "/v1/completions", {**OK, "seed": 2**64, "temperature": 1}, 400, "invalid_value", "seed"),
    ("seed-below-int64", "/v1/chat/completions", {**CHAT, "seed": -(2**63) - 1}, 400, "invalid_value", "seed"),
    ("seed-10**40", "/v1/completions", {**OK, "seed": 10**40}, 400, "invalid_value", "seed"),
    ("seed-float", "/v1/completions", {**OK, "seed": 1.5}, 422, "invalid_value", "seed"),
    # lengths
    ("max_tokens-zero", "/v1/completions", {**OK, "max_tokens": 0}, 422, "invalid_value", "max_tokens"),
    ("max_tokens-negative", "/v1/completions", {**OK, "max_tokens": -1}, 422, "invalid_value", "max_tokens"),
    ("max_tokens-10**12", "/v1/completions", {**OK, "max_tokens": 10**12}, 400, "invalid_value", "max_tokens"),
    ("max_completion_tokens-10**12", "/v1/chat/completions", {**CHAT, "max_completion_tokens": 10**12}, 400,
     "invalid_value", "max_completion_tokens"),
    ("max_tokens-string", "/v1/completions", {**OK, "max_tokens": "lots"}, 422, "invalid_value", "max_tokens"),
    # choices, log-probabilities, penalties, echo
    ("n-17", "/v1/completions", {**OK, "n": 17}, 400, "invalid_value", "n"),
    ("n-0", "/v1/chat/completions", {**CHAT, "n": 0}, 422, "invalid_value", "n"),
    ("best_of-above-n", "/v1/completions", {**OK, "best_of": 3}, 400, "unsupported_parameter", "best_of"),
    ("logprobs-21", "/v1/completions", {**OK, "logprobs": 21}, 400, "invalid_value", "logprobs"),
    ("completion-logprobs-true", "/v1/completions", {**OK, "logprobs": True}, 400, "invalid_value", "logprobs"),
    ("chat-logprobs-int", "/v1/chat/completions", {**CHAT, "logprobs": 5}, 400, "invalid_value", "logprobs"),
    ("top_logprobs-21", "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400,
     "invalid_value", "top_logprobs"),
    ("presence_penalty-3", "/v1/completions", {**OK, "presence_penalty": 3}, 400, "invalid_value",
     "presence_penalty"),
    ("repetition_penalty-zero", "/v1/chat/completions", {**CHAT, "repetition_penalty": 0}, 400, "invalid_value",
     "repetition_penalty"),
    ("echo-string", "/v1/completions", {**OK, "echo": "loud"}, 422, "invalid_value", "echo"),
    # wrong types and shapes
    ("model-int", "/v1/completions", {**OK, "model": 5}, 422, "invalid_value", "model"),
    ("prompt-object", "/v1/completions", {**OK, "prompt": {"a": 1}}, 422, "invalid_value", None),
    ("prompt-nested-ids", "/v1/completions", {**OK, "prompt": [[1, 2]]}, 422, "invalid_value", None),
    ("prompts-batched", "/v1/completions", {**OK, "prompt": ["a", "b"]}, 400, "invalid_value", "prompt"),
    ("stream-object", "/v1/completions", {**OK, "stream": {"x": 1}}, 422, "invalid_value", "stream"),
    ("stop-int-list", "/v1/completions", {**OK, "stop": [1, 2]}, 422, "invalid_value", None),
    ("stop-17", "/v1/completions", {**OK, "stop": [f"s{i}" for i in range(17)]}, 400, "invalid_value", "stop"),
    ("stop-1000", "/v1/chat/completions", {**CHAT, "stop": ["x"] * 1000}, 400, "invalid_value", "stop"),
    # token-id prompts
    ("ids-empty", "/v1/completions", {**OK, "prompt": []}, 400, "invalid_value", "prompt"),
    ("ids-negative", "/v1/completions", {**OK, "prompt": [5, -1]}, 400, "invalid_value", "prompt"),
    ("ids-past-vocab", "/v1/completions", {**OK, "prompt": [5, 10**6]}, 400, "invalid_value", "prompt"),
    ("ids-past-int64", "/v1/completions", {**OK, "prompt": [2**70]}, 400, "invalid_value", "prompt"),
    ("ids-too-many", "/v1/completions", {**OK, "prompt": [5] * 100_000}, 400, "context_length_exceeded", "prompt"),
    # chat messages
    ("messages-empty", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "invalid_value", "messages"),
    ("messages-string", "/v1/chat/completions", {**CHAT, "messages": "hi"}, 422, "invalid_value", "messages"),
    ("message-no-role", "/v1/chat/completions", {**CHAT, "messages": [{"content": "x"}]}, 422, "invalid_value", None),
    ("message-bad-role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "root", "content": "x"}]}, 422,
     "invalid_value", None),
    ("message-part-not-dict", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": ["x"]}]},
     422, "invalid_value", None),
    ("message-part-text-int", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "invalid_value",
     "messages"),
    ("message-content-int", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 7}]}, 422,
     "invalid_value", None),
    # huge strings
    ("prompt-1MB", "/v1/completions", {**OK, "prompt": "x" * 2**20}, 400, "context_length_exceeded", "prompt"),
    ("prompt-200kB", "/v1/completions", {**OK, "prompt": "y " * 100_000}, 400, "context_length_exceeded", "prompt"),
    ("chat-1MB", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "z" * 2**20}]}, 400,
     "context_length_exceeded", "messages"),
    ("model-10kB", "/v1/completions", {**OK, "model": "m" * 10_000}, 404, "model_not_found", "model"),
    ("chat-model-10kB", "/v1/chat/completions", {**CHAT, "model": "q" * 10_000}, 404, "model_not_found", "model"),
]


@pytest.mark.parametrize("path,body,status,code,param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_4xx(http, path, body, status, code, param):
    _error(http.post(path, json=body), status, code, param)


@pytest.mark.parametrize("raw,ctype", [
    (b"{not json", "application/json"),
    (b"", "application/json"),
    (b"[1, 2, 3]", "application/json"),
    (b'"a string"', "application/json"),
    (b'{"model": "shakespeare", "prompt": "hi", "temperature": NaN}', "application/json"),
    (b'{"model": "shakespeare", "prompt": "hi", "top_p": Infinity}', "application/json"),
    (b"\xff\xfe\x00garbage", "application/json"),
    (json.dumps(OK).encode(), "text/plain"),
], ids=["broken", "empty", "array", "string", "nan", "infinity", "binary", "text-plain"])
def test_malformed_body_gets_4xx(http, raw, ctype):
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = http.post(path, content=raw, headers={"content-type": ctype})
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
        assert r.json()["error"]["message"]


def test_odd_but_valid_values_are_served(http):
    """Values at the edges of what is allowed run normally (tiny outputs)."""
    for body in ({**OK, "seed": -1, "temperature": 1}, {**OK, "seed": 2**63, "temperature": 1},
                 {**OK, "seed": 2**64 - 1, "temperature": 1}, {**OK, "top_k": 10**12, "temperature": 1},
                 {**OK, "top_p": 1e-9, "temperature": 2}, {**OK, "temperature": 1e-300},
                 {**OK, "stop_token_ids": [2**70, -5, 1]}, {**OK, "prompt": [5] * 8, "max_tokens": 1},
                 {**OK, "prompt": [5] * 250, "max_tokens": 250}, {**OK, "logprobs": 0, "unknown_field": "x" * 1000}):
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, (body, r.text[:300])
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    for msgs in ([{"role": "user", "content": None}], [{"role": "assistant", "content": ""}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):
        r = http.post("/v1/chat/completions", json={**CHAT, "messages": msgs})
        assert r.status_code in (200, 400), r.text[:300]  # 400: the template refused them
        if r.status_code == 400:
            _error(r, 400, "invalid_value", "messages")
    _healthy(http)


def test_unknown_model_names_do_not_grow_metrics(http):
    def size():
        return len(http.get("/metrics").content)

    http.post("/v1/completions", json={**OK, "model": "warm-up-unknown"})
    before = size()
    for i in range(200):
        name = f"{i:05d}" + "n" * 10_000
        path = "/v1/completions" if i % 2 else "/v1/chat/completions"
        body = {**(OK if i % 2 else CHAT), "model": name}
        _error(http.post(path, json=body), 404, "model_not_found")
    text = http.get("/metrics").text
    assert len(text.encode()) - before < 2048
    line = next(s for s in text.splitlines() if s.startswith("bitdelta_rejected_requests_total") and 'code="404"' in s)
    assert 'model="__unknown__"' in line and float(line.rsplit(" ", 1)[1]) >= 201
    assert max(len(s) for s in text.splitlines()) < 400
    _error(http.get("/v1/models/" + "w" * 4000), 404, "model_not_found")
    _healthy(http)


def test_server_still_healthy_after_the_abuse(http):
    _healthy(http)
    h = http.get("/health").json()
    assert h["restart_count"] == 0
