"""The HTTP app is assembled from routers that read the runtime and settings from ``app.state``:
two apps over one runtime answer by their own settings, and every endpoint is mounted."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")  # the serve extra

from fastapi.testclient import TestClient  # noqa: E402

from bitdelta.serving.http.app import create_app  # noqa: E402
from bitdelta.serving.http.server_config import ServerConfig  # noqa: E402


@pytest.fixture
def two_apps(server):
    """Over the running server's runtime: one app open to every model, one keyed to the base only."""
    open_app = TestClient(create_app(server.runtime))
    keyed = TestClient(create_app(server.runtime, ServerConfig(api_keys={"sk-base": {"base"}})))
    return open_app, keyed


def test_each_app_answers_by_its_own_settings(two_apps, server):
    open_app, keyed = two_apps
    assert {m["id"] for m in open_app.get("/v1/models").json()["data"]} == set(server.runtime.models())
    assert keyed.get("/v1/models").status_code == 401
    only_base = keyed.get("/v1/models", headers={"Authorization": "Bearer sk-base"}).json()["data"]
    assert [m["id"] for m in only_base] == ["base"]
    denied = keyed.post("/v1/completions", json={"model": "shakespeare", "prompt": "Once", "max_tokens": 2},
                        headers={"Authorization": "Bearer sk-base"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    # the admin routes are off in both (no admin key), whatever the server itself allows
    assert open_app.get("/v1/deltas").json()["error"]["code"] == "admin_disabled"


def test_generation_through_a_second_app_matches_the_server(two_apps, server):
    import httpx

    open_app, _ = two_apps
    body = {"model": "shakespeare", "prompt": "Once", "max_tokens": 8, "temperature": 0}
    mine = open_app.post("/v1/completions", json=body)
    theirs = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert mine.status_code == theirs.status_code == 200
    assert mine.json()["choices"][0]["text"] == theirs.json()["choices"][0]["text"]


def test_every_endpoint_is_mounted(server):
    paths = create_app(server.runtime).openapi()["paths"]
    mounted = sorted((method.upper(), path) for path, ops in paths.items() for method in ops)
    assert mounted == sorted([
        ("GET", "/"), ("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/models/{name}"),
        ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/deltas"), ("POST", "/v1/deltas"),
        ("DELETE", "/v1/deltas/{name}"), ("POST", "/v1/deltas/{name}/load"), ("POST", "/v1/deltas/{name}/unload")])
