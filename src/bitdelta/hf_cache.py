"""A transformers model's KV cache across versions: which forward keyword takes it, where the output holds it.

Recent transformers name the forward argument and the output field ``cache``; older ones use
``past_key_values``. The incremental decoders (self-generated calibration text, greedy-agreement
evaluation) ask here instead of pinning a version.

    arg = cache_argument(model); out = model(ids, **{arg: cache_of(prev_out)})
"""

from __future__ import annotations

import inspect


def cache_argument(model) -> str:
    """The forward keyword that takes the KV cache: ``cache`` in recent transformers, else ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_of(out):
    """The KV cache a forward returned (``out.cache`` or ``out.past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
