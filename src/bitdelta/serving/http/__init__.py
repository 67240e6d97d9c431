"""The OpenAI-compatible HTTP layer of ``bitdelta serve`` (FastAPI), one concern per module.

:mod:`.app` (``create_app``: the routers, ``/health``, ``/metrics``, the page, error handlers),
:mod:`.openai_routes` (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``),
:mod:`.streaming` (a request's choices as one JSON answer or server-sent events),
:mod:`.logprobs` (log-probabilities in OpenAI's completions and chat shapes),
:mod:`.admin` (``/v1/deltas``), :mod:`.auth` (bearer keys, key scopes, the admin key),
:mod:`.errors` (OpenAI-style error bodies), :mod:`.schemas` (request bodies),
:mod:`.server_config` (``ServerConfig``), :mod:`.state` (what the routers share).
Only :mod:`.app`, :mod:`.openai_routes`, :mod:`.streaming` and :mod:`.admin` need the engine;
:mod:`.errors` and :mod:`.auth` are what the Ray ingress uses, without torch.

    from bitdelta.serving.http.app import create_app
    app = create_app(runtime, ServerConfig(api_keys={"sk-a": {"zephyr"}}))
"""
