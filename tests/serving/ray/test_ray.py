"""Scale-out on a real local Ray cluster: two engine replicas behind Ray Serve, the official openai client.

One application for the module (2 CPU replicas, 2 deltas each, the embedded default model, deltas
from a ``file://`` store so they go through the fsspec copy). Answers are compared with the
single-process server (``server`` from conftest.py) for the same prompts. The last test kills a
replica mid-run.
"""

from __future__ import annotations

import concurrent.futures as cf
import shutil
import socket
import time

import pytest

# "ray.serve", not "ray": without Ray installed, "ray" resolves to this test folder (a namespace package)
pytest.importorskip("ray.serve", reason="scale-out tests need Ray: pip install 'bitdelta[ray]'")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from bitdelta.serving.ray.board import merge_prometheus  # noqa: E402
from bitdelta.serving.ray.settings import RaySettings  # noqa: E402

GREEDY = dict(temperature=0, max_tokens=12)
PROMPT = "To be, or not"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KEYS = {"sk-all": ["*"], "sk-shk": ["shakespeare"]}  # the application's API keys and the models each may use
AUTH = {"Authorization": "Bearer sk-all"}


class RayApp:
    def __init__(self, url: str, store):
        self.url, self.store = url, store
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="sk-all", max_retries=0, timeout=120)
        self.http = httpx.Client(base_url=url, timeout=120, headers=AUTH)

    def replicas(self) -> list[dict]:
        return self.http.get("/v1/replicas").json()["data"]

    def counts(self, model: str) -> dict[str, float]:
        """Finished requests for ``model`` per replica, from the replicas' own Prometheus counters."""
        out: dict[str, float] = {}
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith("bitdelta_requests_total{") and f'model="{model}"' in line:
                replica = line.split('replica="', 1)[1].split('"', 1)[0]
                out[replica] = out.get(replica, 0) + float(line.rsplit(" ", 1)[1])
        return out


@pytest.fixture(scope="module")
def ray_app(tiny_models, delta_dir, corrupt_delta, tmp_path_factory):
    import ray
    from ray import serve

    from bitdelta.serving.ray.deployment import run

    store = tmp_path_factory.mktemp("store")
    for name in ("shakespeare", "gsm8k", "corrupt"):
        shutil.copytree(delta_dir / name, store / name)
    for alias, src in (("team-a/poet", "shakespeare"), ("team-b/math", "gsm8k")):  # fresh tenants for routing
        shutil.copytree(delta_dir / src, store / alias)
    # a 2-core machine running the suite can be slow to start Serve's HTTP proxy: give it time
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    patch.setenv("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        port = _free_port()
        settings = RaySettings(base=str(tiny_models["base"]), base_name="base", store=store.as_uri(), replicas=2,
                               gpus_per_replica=0, cpus_per_replica=1, max_gpu_deltas=2, max_batch=8,
                               kv_cache_mb=64, report_interval_s=0.5, api_keys=KEYS,
                               cache_dir=str(tmp_path_factory.mktemp("delta-cache")))
        run(settings, host="127.0.0.1", port=port, blocking=False)
        app = RayApp(f"http://127.0.0.1:{port}", store)
        deadline = time.time() + 120
        while len(app.replicas()) < 2:  # both replicas built their engines and reported
            assert time.time() < deadline, "replicas did not report"
            time.sleep(0.5)
        yield app
        app.http.close()
    finally:
        serve.shutdown()
        ray.shutdown()
        patch.undo()


@pytest.fixture(scope="module")
def reference(server):
    """The single-process server: what every Ray answer must equal."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _text(client, model: str, prompt: str = PROMPT) -> str:
    return client.completions.create(model=model, prompt=prompt, **GREEDY).choices[0].text


# ---------------------------------------------------------------------------------- pure helpers


def test_settings_from_strings_and_validation():
    s = RaySettings.from_dict({"base": "b", "store": "s3://x/d", "replicas": "4", "gpus_per_replica": "0.5",
                               "max_bits": "none", "api_keys": '{"sk": ["a"]}'})
    assert (s.replicas, s.gpus_per_replica, s.max_bits, s.api_keys) == (4, 0.5, None, {"sk": ["a"]})
    assert s.capacity == 32 and s.served_base_name == "b"
    with pytest.raises(ValueError, match="unknown Ray serve setting"):
        RaySettings.from_dict({"base": "b", "store": "d", "replica": 2})
    with pytest.raises(ValueError, match="more replicas instead"):
        RaySettings(base="b", store="d", gpus_per_replica=2).validate()


def test_merged_metrics_label_each_replica():
    a = "# HELP m x\n# TYPE m counter\nm{model=\"p\"} 3\n# HELP g y\n# TYPE g gauge\ng 1\n"
    b = "# HELP m x\n# TYPE m counter\nm{model=\"p\"} 4\n# HELP g y\n# TYPE g gauge\ng 2\n"
    assert merge_prometheus({"r2": b, "r1": a}).splitlines() == [
        "# HELP m x", "# TYPE m counter", 'm{replica="r1",model="p"} 3', 'm{replica="r2",model="p"} 4',
        "# HELP g y", "# TYPE g gauge", 'g{replica="r1"} 1', 'g{replica="r2"} 2']


def test_cli_ray_needs_a_store():
    from bitdelta.cli import build_parser
    from bitdelta.serving.cli import ray_settings

    args = build_parser().parse_args(["serve", "--ray", "--base", "b"])
    with pytest.raises(ValueError, match="--delta-store"):
        ray_settings(args)
    args = build_parser().parse_args(["serve", "--ray", "--base", "b", "--delta-store", "s3://x", "--replicas", "3",
                                      "--gpus-per-replica", "1", "--max-gpu-deltas", "16"])
    s = ray_settings(args)
    assert (s.store, s.replicas, s.gpus_per_replica, s.capacity) == ("s3://x", 3, 1.0, 16)


# ---------------------------------------------------------------------------------- live cluster


@pytest.mark.slow  # a local Ray cluster and its replicas
def test_same_api_and_answers_as_one_server(ray_app, reference):
    ids = {m.id for m in ray_app.client.models.list().data}
    assert {"base", "shakespeare", "gsm8k", "team-a/poet", "team-b/math"} <= ids
    msgs = [{"role": "user", "content": "What is two plus three?"}]
    for model in ("base", "shakespeare", "gsm8k"):
        want = _text(reference, model)
        assert _text(ray_app.client, model) == want
        streamed = "".join(c.choices[0].text for c in
                           ray_app.client.completions.create(model=model, prompt=PROMPT, stream=True, **GREEDY))
        assert streamed == want
        chat = ray_app.client.chat.completions.create(model=model, messages=msgs, **GREEDY).choices[0].message.content
        want = reference.chat.completions.create(model=model, messages=msgs, **GREEDY).choices[0].message.content
        assert chat == want
        chunks = list(ray_app.client.chat.completions.create(model=model, messages=msgs, stream=True, **GREEDY))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat
    assert _text(ray_app.client, "team-a/poet") == _text(reference, "shakespeare")  # same artifact, another name


@pytest.mark.slow  # a local Ray cluster and its replicas
def test_errors(ray_app):
    with pytest.raises(openai.NotFoundError) as e:
        _text(ray_app.client, "nope")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.InternalServerError) as e:  # a corrupt artifact fails its own requests only
        _text(ray_app.client, "corrupt")
    assert e.value.body["code"] == "invalid_delta"
    assert _text(ray_app.client, "gsm8k")
    r = ray_app.http.post("/v1/completions", json={"model": "../etc/passwd", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = ray_app.http.post("/v1/completions", json={"model": "gsm8k", "prompt": "x", "n": 17})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # the replica's own validation
    r = ray_app.http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert ray_app.http.get("/health").json()["status"] == "ok"
    assert ray_app.http.get("/v1/deltas").status_code == 404


@pytest.mark.slow  # a local Ray cluster and its replicas
def test_api_keys_are_checked_as_by_one_server(ray_app):
    url, body = ray_app.url, {"model": "gsm8k", "prompt": "x", "max_tokens": 2}
    for headers, code in (({}, 401), ({"Authorization": "Bearer wrong"}, 401)):
        for r in (httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60),
                  # the base model goes straight to a replica, which checks the key itself
                  httpx.post(url + "/v1/completions", json={**body, "model": "base"}, headers=headers, timeout=60),
                  httpx.get(url + "/v1/models", headers=headers, timeout=60)):
            assert r.status_code == code and r.json()["error"]["code"] == "invalid_api_key", r.text
    shk = openai.OpenAI(base_url=url + "/v1", api_key="sk-shk", max_retries=0, timeout=120)
    assert [m.id for m in shk.models.list().data] == ["shakespeare"]
    with pytest.raises(openai.PermissionDeniedError) as e:
        _text(shk, "gsm8k")
    assert e.value.body["code"] == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError):
        _text(shk, "base")
    assert _text(shk, "shakespeare") == _text(ray_app.client, "shakespeare")


@pytest.mark.slow  # a local Ray cluster and its replicas
def test_client_hang_up_reaches_the_engine(ray_app):
    """Closing a stream, or timing out on a plain request, cancels the engine request behind two hops."""
    def aborted() -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in ray_app.http.get("/metrics").text.splitlines()
                   if line.startswith("bitdelta_requests_total{") and 'finish_reason="abort"' in line)

    before = aborted()
    body = {"model": "gsm8k", "prompt": "To be", "max_tokens": 240, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", ray_app.url + "/v1/completions", json={**body, "stream": True}, timeout=60,
                      headers=AUTH) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(ray_app.url + "/v1/completions", json=body, headers=AUTH, timeout=httpx.Timeout(60, read=0.5))
    deadline = time.time() + 30
    while aborted() - before < 2 or any(rep["engine"]["running"] for rep in ray_app.replicas()):
        assert time.time() < deadline, (aborted() - before, ray_app.replicas())
        time.sleep(0.25)


@pytest.mark.slow  # a local Ray cluster and its replicas
def test_tenant_requests_stay_on_the_replica_that_holds_them(ray_app):
    a, b = "team-a/poet", "team-b/math"

    def holder(model: str) -> str:
        r = ray_app.client.completions.with_raw_response.create(model=model, prompt=PROMPT, **GREEDY)
        deadline = time.time() + 20  # the replica reports what it holds twice a second
        while not any(model in rep["tenants"] for rep in ray_app.replicas()):
            assert time.time() < deadline
            time.sleep(0.2)
        return r.headers["x-bitdelta-replica"]

    before = {m: ray_app.counts(m) for m in (a, b)}
    first = {m: holder(m) for m in (a, b)}
    seen = {a: [], b: []}
    for _ in range(6):
        for m in (a, b):
            r = ray_app.client.completions.with_raw_response.create(model=m, prompt=PROMPT, **GREEDY)
            seen[m].append(r.headers["x-bitdelta-replica"])
    for m in (a, b):
        assert set(seen[m]) == {first[m]}, f"{m} moved between replicas: {seen[m]}"
        # the replicas' own counters agree: all 7 requests of m were finished by its holder, none elsewhere
        deadline = time.time() + 20
        while ray_app.counts(m).get(first[m], 0) - before[m].get(first[m], 0) < 7:
            assert time.time() < deadline, ray_app.counts(m)
            time.sleep(0.25)
        after = ray_app.counts(m)
        assert {r: n - before[m].get(r, 0) for r, n in after.items() if n != before[m].get(r, 0)} == {first[m]: 7}
        holders = [rep["replica"] for rep in ray_app.replicas() if m in rep["tenants"]]
        assert holders == [first[m]]


@pytest.mark.slow  # a local Ray cluster and its replicas
def test_a_replica_killed_mid_run_is_replaced_and_no_request_is_lost(ray_app, reference):
    import ray
    from ray import serve

    models = ["shakespeare", "gsm8k", "base"]
    want = {m: _text(reference, m) for m in models}
    victim = ray_app.client.completions.with_raw_response.create(model="shakespeare", prompt=PROMPT, **GREEDY)
    victim = victim.headers["x-bitdelta-replica"]
    client = openai.OpenAI(base_url=ray_app.url + "/v1", api_key="sk-all", max_retries=5, timeout=120)
    jobs = [models[i % 3] for i in range(24)]
    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(lambda m: (m, _text(client, m)), m) for m in jobs]
        while sum(f.done() for f in futures) < 3:
            time.sleep(0.05)
        name = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                    if "BitDeltaEngine" in a["name"] and a["name"].endswith(victim))
        ray.kill(ray.get_actor(name["name"], namespace=name["namespace"]), no_restart=True)
        results = [f.result(timeout=180) for f in futures]
    assert [m for m, _ in results] == jobs
    for m, text in results:
        assert text == want[m], m
    # Serve starts a new replica in its place; both report again and answer (a new replica imports
    # torch and loads the base: seconds on an idle machine, minutes on a very busy one)
    deadline = time.time() + 300
    while True:
        dep = serve.status().applications["bitdelta"].deployments["BitDeltaEngine"]
        live = [r["replica"] for r in ray_app.replicas() if r["age_s"] < 2]
        if dep.status == "HEALTHY" and len(live) == 2 and victim not in live:
            break
        assert time.time() < deadline, (dep.status, live)
        time.sleep(0.5)
    for m in models:
        assert _text(ray_app.client, m) == want[m]
