"""The HTTP server end to end: a real uvicorn on loopback, the official openai client, raw httpx.

Servers come from conftest.py: ``server`` (base + every artifact of an allow-listed dir, admin on,
3 device slots) and ``keyed_server`` (API keys scoped per tenant); so do ``client`` (openai) and
``http`` (httpx) on ``server``.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from transformers import AutoTokenizer

httpx = pytest.importorskip("httpx")  # an optional extra (bitdelta[test])
openai = pytest.importorskip("openai")  # an optional extra (bitdelta[test])

GREEDY = dict(temperature=0, max_tokens=24)


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def _wait_idle(http, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = http.get("/health").json()
        if h["running"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError("server did not become idle")


# ---------------------------------------------------------------------------------- openai client


@pytest.mark.slow  # a live server
def test_models_list(client):
    ids = {m.id for m in client.models.list().data}
    assert {"base", "shakespeare", "gsm8k"} <= ids
    assert "corrupt" not in ids and "wrongbase" not in ids  # skipped at startup, with an error logged


@pytest.mark.slow  # a live server
def test_completions_stream_matches_non_stream(client):
    for model in ("base", "shakespeare", "gsm8k"):
        full = client.completions.create(model=model, prompt="To be, or not", **GREEDY)
        assert full.object == "text_completion" and full.model == model
        assert full.usage.completion_tokens >= 1 and full.usage.prompt_tokens >= 1
        assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
        pieces, finish = [], None
        for chunk in client.completions.create(model=model, prompt="To be, or not", stream=True, **GREEDY):
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        assert "".join(pieces) == full.choices[0].text
        assert finish == full.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow  # a live server
def test_tenants_differ_and_chat_uses_each_template(client, server, delta_dir, tiny_models):
    msgs = [{"role": "user", "content": "What is two plus three?"}]
    outs = {}
    for model in ("shakespeare", "gsm8k"):
        chat = client.chat.completions.create(model=model, messages=msgs, **GREEDY)
        assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
        tok = AutoTokenizer.from_pretrained(delta_dir / model)  # the artifact's own tokenizer + template
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert chat.usage.prompt_tokens == len(ids)
        # the same ids as a raw completion give the same greedy text
        comp = client.completions.create(model=model, prompt=ids, **GREEDY)
        assert comp.choices[0].text == chat.choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(model=model, messages=msgs, stream=True, **GREEDY))
        assert streamed == chat.choices[0].message.content
        outs[model] = chat.choices[0].message.content
    base = client.completions.create(model="base", prompt="To be", **GREEDY).choices[0].text
    shk = client.completions.create(model="shakespeare", prompt="To be", **GREEDY).choices[0].text
    assert base != shk


@pytest.mark.slow  # a live server
def test_stop_sequences_and_seeded_sampling(client):
    text = client.completions.create(model="shakespeare", prompt="The", temperature=0, max_tokens=40).choices[0].text
    assert len(text) > 8
    stop = text[4:7]
    cut = client.completions.create(model="shakespeare", prompt="The", temperature=0, max_tokens=40, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="shakespeare", prompt="The", temperature=0, max_tokens=40, stop=stop, stream=True))
    assert streamed == cut.choices[0].text
    a, b = (client.completions.create(model="gsm8k", prompt="The", temperature=1.0, top_p=0.9, seed=7,
                                      extra_body={"top_k": 50}, max_tokens=20).choices[0].text for _ in range(2))
    assert a == b


@pytest.mark.slow  # a live server
def test_stream_usage_option(client):
    chunks = list(client.chat.completions.create(model="gsm8k", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


# ---------------------------------------------------------------------------------- errors (raw HTTP)


def _err(r, status, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    return body["error"]


@pytest.mark.slow  # a live server
def test_error_cases(http, server):
    ok = {"model": "shakespeare", "prompt": "hi", "max_tokens": 2}
    e = _err(http.post("/v1/completions", json={**ok, "model": "nope"}), 404, "model_not_found")
    assert e["param"] == "model" and "nope" in e["message"]
    _err(http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404)
    _err(http.get("/v1/models/nope"), 404)
    _err(http.post("/v1/completions", json={**ok, "temperature": -1}), 422)
    _err(http.post("/v1/completions", json={**ok, "max_tokens": 0}), 422)
    _err(http.post("/v1/completions", json={"model": "shakespeare"}), 422)  # no prompt
    _err(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 422)
    wizard = [{"role": "wizard", "content": "x"}]
    _err(http.post("/v1/chat/completions", json={"model": "gsm8k", "messages": wizard}), 422)
    _err(http.post("/v1/completions", json={**ok, "n": 17}), 400, "invalid_value")
    _err(http.post("/v1/chat/completions", json={"model": "gsm8k", "messages": []}), 400)
    _err(http.post("/v1/completions", json={**ok, "prompt": [10**9]}), 400)
    max_len = server.runtime.engine.max_len
    e = _err(http.post("/v1/completions", json={**ok, "prompt": "word " * (2 * max_len)}), 400,
             "context_length_exceeded")
    assert str(max_len) in e["message"]
    e = _err(http.post("/v1/completions", json={**ok, "prompt": [5] * max_len}), 400, "context_length_exceeded")
    # the server is still fine
    assert http.post("/v1/completions", json=ok).status_code == 200


@pytest.mark.slow  # a live server
def test_queue_full_gives_429(tiny_models, delta_dir, live_server):
    s = live_server(["--base", str(tiny_models["base"]), "--delta", f"shakespeare={delta_dir / 'shakespeare'}",
                    "--max-batch", "1", "--max-queue", "1", "--kv-cache-mb", "16"])
    try:
        async def go():
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
                body = {"model": "shakespeare", "prompt": "a", "max_tokens": 60, "ignore_eos": True}
                return await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(6)])

        codes = sorted(r.status_code for r in asyncio.run(go()))
        assert codes.count(200) >= 2 and 429 in codes and set(codes) <= {200, 429}, codes
        r429 = next(r for r in asyncio.run(go()) if r.status_code == 429)
        _err(r429, 429, "queue_full")
        metrics = httpx.get(s.url + "/metrics").text
        assert _metric(metrics, "bitdelta_rejected_requests_total", code="429") >= 1
    finally:
        s.close()


@pytest.mark.slow  # a live server
def test_api_keys(keyed_server):
    url = keyed_server.url
    body = {"model": "shakespeare", "prompt": "hi", "max_tokens": 2}
    _err(httpx.post(url + "/v1/completions", json=body), 401)
    _err(httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    shk = {"Authorization": "Bearer sk-shk"}
    assert httpx.post(url + "/v1/completions", json=body, headers=shk).status_code == 200
    _err(httpx.post(url + "/v1/completions", json={**body, "model": "gsm8k"}, headers=shk), 403, "model_not_allowed")
    _err(httpx.post(url + "/v1/chat/completions", headers=shk,
                    json={"model": "base", "messages": [{"role": "user", "content": "x"}]}), 403)
    _err(httpx.get(url + "/v1/models"), 401)
    assert [m["id"] for m in httpx.get(url + "/v1/models", headers=shk).json()["data"]] == ["shakespeare"]
    everyone = openai.OpenAI(base_url=url + "/v1", api_key="sk-all", max_retries=0)
    assert {m.id for m in everyone.models.list().data} == {"base", "shakespeare", "gsm8k"}
    assert everyone.completions.create(model="gsm8k", prompt="hi", max_tokens=2).choices[0].text is not None
    # admin endpoints are off on this server
    _err(httpx.post(url + "/v1/deltas", json={"name": "x", "path": "y"}, headers={"Authorization": "Bearer sk-all"}),
         404)


# ---------------------------------------------------------------------------------- admin


@pytest.mark.slow  # a live server
def test_admin_register_and_remove(http, server, delta_dir, corrupt_delta, wrong_base_delta, tmp_path):
    adm = {"Authorization": "Bearer adm"}
    add = {"name": "shk-copy", "path": "shakespeare"}
    _err(http.post("/v1/deltas", json=add), 401)
    _err(http.post("/v1/deltas", json=add, headers={"Authorization": "Bearer nope"}), 403)
    _err(http.get("/v1/deltas"), 401)
    _err(http.post("/v1/deltas", json={"name": "x", "path": str(tmp_path)}, headers=adm), 403, "path_not_allowed")
    _err(http.post("/v1/deltas", json={"name": "x", "path": "../" + tmp_path.name}, headers=adm), 403)
    _err(http.post("/v1/deltas", json={"name": "gsm8k", "path": "gsm8k"}, headers=adm), 409)
    _err(http.post("/v1/deltas", json={"name": "base", "path": "gsm8k"}, headers=adm), 409)

    # A corrupt and a wrong-base artifact fail their own registration while other requests run.
    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            gen = [c.post("/v1/completions", json={"model": m, "prompt": "Once", "max_tokens": 20, "temperature": 0})
                   for m in ("shakespeare", "gsm8k", "base") * 2]
            bad = [c.post("/v1/deltas", json={"name": "bad1", "path": str(corrupt_delta)}, headers=adm),
                   c.post("/v1/deltas", json={"name": "bad2", "path": "wrongbase"}, headers=adm)]
            return await asyncio.gather(*gen, *bad)

    *gens, bad1, bad2 = asyncio.run(go())
    assert all(r.status_code == 200 and r.json()["choices"][0]["text"] is not None for r in gens)
    e1, e2 = _err(bad1, 400, "invalid_delta"), _err(bad2, 400, "invalid_delta")
    assert "bad1" in e1["message"] and ("base" in e2["message"].lower())
    ids = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert "bad1" not in ids and "bad2" not in ids

    r = http.post("/v1/deltas", json=add, headers=adm)
    assert r.status_code == 201, r.text
    same = {"prompt": "Once", "max_tokens": 12, "temperature": 0}
    a = http.post("/v1/completions", json={"model": "shk-copy", **same}).json()["choices"][0]["text"]
    b = http.post("/v1/completions", json={"model": "shakespeare", **same}).json()["choices"][0]["text"]
    assert a == b
    listing = http.get("/v1/deltas", headers=adm).json()["data"]
    assert any(d["name"] == "shk-copy" for d in listing)
    _wait_idle(http)
    assert http.post("/v1/deltas/shk-copy/unload", headers=adm).status_code == 200
    assert http.post("/v1/deltas/shk-copy/load", headers=adm).status_code == 200
    _err(http.delete("/v1/deltas/shk-copy"), 401)
    assert http.delete("/v1/deltas/shk-copy", headers=adm).json()["deleted"] is True
    _err(http.post("/v1/completions", json={"model": "shk-copy", **same}), 404)
    _err(http.delete("/v1/deltas/shk-copy", headers=adm), 404)


# ---------------------------------------------------------------------------------- load


@pytest.mark.slow  # a live server
def test_disconnect_frees_slot(http, server):
    _wait_idle(http)
    before = _metric(http.get("/metrics").text, "bitdelta_requests_total", finish_reason="abort")
    body = {"model": "gsm8k", "prompt": "Once", "max_tokens": 250, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # one chunk, then hang up
    h = _wait_idle(http, timeout=20)
    assert h["free_kv_slots"] == h["max_batch"]
    after = _metric(http.get("/metrics").text, "bitdelta_requests_total", finish_reason="abort")
    assert after == before + 1


@pytest.mark.slow  # a live server
def test_32_concurrent_requests_over_4_tenants(http, server, client):
    adm = {"Authorization": "Bearer adm"}
    for name, path in (("shk2", "shakespeare"), ("gsm2", "gsm8k")):
        if name not in {m.id for m in client.models.list().data}:
            assert http.post("/v1/deltas", json={"name": name, "path": path}, headers=adm).status_code == 201
    tenants = ["shakespeare", "gsm8k", "shk2", "gsm2"]
    prompts = ["Once upon", "The number", "To be", "Question: 3+4"]
    # single-request references, one at a time
    ref = {}
    for t in ("shakespeare", "gsm8k"):
        for p in prompts:
            ref[t, p] = client.completions.create(model=t, prompt=p, temperature=0, max_tokens=16).choices[0].text
    alias = {"shk2": "shakespeare", "gsm2": "gsm8k", "shakespeare": "shakespeare", "gsm8k": "gsm8k"}
    loads_before = _metric(http.get("/metrics").text, "bitdelta_delta_loads_all_total")

    async def one(ac, i):
        t, p = tenants[i % 4], prompts[(i // 4) % 4]
        if i % 2:
            text = "".join([c.choices[0].text async for c in await ac.completions.create(
                model=t, prompt=p, temperature=0, max_tokens=16, stream=True)])
        else:
            text = (await ac.completions.create(model=t, prompt=p, temperature=0, max_tokens=16)).choices[0].text
        return t, p, text

    async def go():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        return await asyncio.gather(*[one(ac, i) for i in range(32)])

    results = asyncio.run(go())
    assert len(results) == 32
    for t, p, text in results:
        assert text == ref[alias[t], p], (t, p)
    m = http.get("/metrics").text
    # 4 tenants + base over 3 device slots: deltas were evicted and brought back while serving
    assert _metric(m, "bitdelta_delta_evictions_all_total") >= 1
    assert _metric(m, "bitdelta_delta_loads_all_total") >= loads_before


@pytest.mark.slow  # a live server
def test_health_and_metrics(http):
    h = http.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    m = http.get("/metrics")
    assert m.headers["content-type"].startswith("text/plain")
    text = m.text
    for name in ("bitdelta_requests_total", "bitdelta_prompt_tokens_total", "bitdelta_generation_tokens_total",
                 "bitdelta_queue_depth", "bitdelta_delta_loads_total", "bitdelta_delta_evictions_total"):
        assert f"# TYPE {name} " in text
    assert _metric(text, "bitdelta_requests_total", model="shakespeare") >= 1
    assert _metric(text, "bitdelta_generation_tokens_total", model="gsm8k") >= 1
    assert re.search(r'^bitdelta_queue_depth \d+', text, re.M)


@pytest.mark.slow  # a live server
def test_non_streaming_disconnect_frees_slot(http, server):
    _wait_idle(http)
    before = _metric(http.get("/metrics").text, "bitdelta_requests_total", finish_reason="abort")
    body = {"model": "shakespeare", "prompt": "Once", "max_tokens": 250, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    h = _wait_idle(http, timeout=20)
    assert h["free_kv_slots"] == h["max_batch"]
    assert _metric(http.get("/metrics").text, "bitdelta_requests_total", finish_reason="abort") == before + 1


def test_key_scope_rules():
    from bitdelta.serving.api import ApiError, key_scope

    keys = {"sk-all": {"*"}, "sk-shk": {"shakespeare"}}
    assert key_scope(None, None) is None  # no keys configured: open
    assert key_scope(keys, "Bearer sk-all") is None and key_scope(keys, "bearer  sk-all ") is None
    assert key_scope(keys, "Bearer sk-shk") == {"shakespeare"}
    for header, message in ((None, "missing"), ("Bearer ", "missing"), ("Basic sk-all", "missing"),
                            ("Bearer sk-al", "invalid"), ("Bearer sk-all2", "invalid"), ("Bearer ключ", "invalid")):
        with pytest.raises(ApiError) as e:
            key_scope(keys, header)
        assert e.value.status == 401 and e.value.message.startswith(message), header
