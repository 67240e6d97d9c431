"""Multi-tenant serving: one base in memory, many 1-bit deltas, continuous batching, OpenAI-compatible HTTP.

Layers (each usable alone): :mod:`.model` (engine-native Llama-family decoder, every matrix
multi-tenant through :func:`bitdelta.ops.bitdelta_linear`), :mod:`.slots` (device pool of stacked
deltas, LRU to host memory and disk), :mod:`.engine` (continuous batching on token ids),
:mod:`.runtime` (all of it plus tokenizers and metrics), :mod:`.http` (FastAPI app), :mod:`.ray`
(scale-out on Ray Serve), :mod:`.cli`.

    from bitdelta.serving import build_runtime, create_app
    rt = build_runtime("models/tiny/base", {"shakespeare": "deltas/shakespeare"})
    app = create_app(rt)          # then: uvicorn.run(app, host="127.0.0.1", port=8000)

The names below load on first use, so that importing a light submodule (the delta store, tenant
names, the Ray ingress) does not load torch and the engine.
"""

import importlib

_EXPORTS = {
    "Engine": ".engine", "Event": ".engine", "QueueFull": ".engine", "Request": ".engine",
    "SamplingParams": ".engine", "BatchMapping": ".mapping", "KVCache": ".mapping", "DeltaLlama": ".model",
    "DeltaModel": ".models", "ServingRuntime": ".runtime", "build_runtime": ".runtime", "DeltaSlots": ".residency",
}


def create_app(runtime, config=None):
    """The FastAPI app (imports FastAPI lazily: install ``bitdelta[serve]``)."""
    from .http.app import create_app as _create

    return _create(runtime, config)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = ["BatchMapping", "DeltaLlama", "DeltaModel", "DeltaSlots", "Engine", "Event", "KVCache", "QueueFull",
           "Request", "SamplingParams", "ServingRuntime", "build_runtime", "create_app"]
