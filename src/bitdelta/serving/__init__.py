"""Multi-tenant serving: one base in memory, many 1-bit deltas, continuous batching, OpenAI-compatible HTTP.

Layers (each usable alone): :mod:`.model` (engine-native Llama-family decoder, every matrix
multi-tenant through :func:`bitdelta.ops.bitdelta_linear`), :mod:`.slots` (device pool of stacked
deltas, LRU to host memory and disk), :mod:`.engine` (continuous batching on token ids),
:mod:`.runtime` (all of it plus tokenizers and metrics), :mod:`.api` (FastAPI app), :mod:`.cli`.

    from bitdelta.serving import build_runtime, create_app
    rt = build_runtime("models/tiny/base", {"shakespeare": "deltas/shakespeare"})
    app = create_app(rt)          # then: uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from .engine import Engine, Event, QueueFull, Request, SamplingParams
from .mapping import BatchMapping, KVCache
from .model import DeltaLlama
from .models import DeltaModel
from .runtime import ServingRuntime, build_runtime
from .residency import DeltaSlots


def create_app(runtime, config=None):
    """The FastAPI app (imports FastAPI lazily: install ``bitdelta[serve]``)."""
    from .api import create_app as _create

    return _create(runtime, config)


__all__ = ["BatchMapping", "DeltaLlama", "DeltaModel", "DeltaSlots", "Engine", "Event", "KVCache", "QueueFull", "Request",
           "SamplingParams", "ServingRuntime", "build_runtime", "create_app"]
