"""The delta pool as one object, under the names callers built on (``DeltaSlots``).

Three parts, each in its own module: :mod:`bitdelta.serving.residency` (registration, host LRU,
background loader, acquire/release, prefetch, a :class:`~bitdelta.serving.residency.DeltaState`
per delta: the :class:`DeltaSlots` class itself), :mod:`bitdelta.serving.layers` (the device pool:
stacked buffers, installing a delta into a delta slot) and :mod:`bitdelta.serving.dispatch` (the
per-step ops the model calls: ``linear``, ``gather1d``, ``embed``, ``extra_logits``).

    slots = DeltaSlots(model, max_gpu_deltas=32, max_cpu_deltas=128)
    slots.register("zephyr", "deltas/zephyr", root="deltas")   # validates + checks the base; raises BitDeltaError
    delta_slot = slots.acquire("zephyr")          # None while it loads: try again next step
"""

from __future__ import annotations

from .layers import DevicePool, HostDelta
from .residency import DeltaSlots, DeltaState, Entry

__all__ = ["DeltaSlots", "DeltaState", "DevicePool", "Entry", "HostDelta"]
