"""The plan a server chose, in one block printed at start-up: where memory went and the limits that follow.

Most of these figures are chosen, not given (the dtype from the checkpoint, the KV cache's blocks
from free memory, the step budget from ``max_batch``), so the server states them before the first
request rather than leaving them to be inferred from its behaviour.

    print(startup_plan(rt.model, rt.slots, rt.engine))
      device        cuda:0, bfloat16
      base          unquantized base, 13.48 GB
      delta pool    32 slots x 414.1 MB = 13.25 GB
      KV cache      16384 blocks x 16 tokens = 262144 tokens, 34.36 GB (paged; 64 whole-context sequences)
      max_batch     64 running sequences
      step budget   512 tokens (decode tokens first, then prompt chunks)
      CUDA graphs   on: batch buckets [1, 2, 4, ...], span buckets [256, ...], captured in 9.1 s
"""

from __future__ import annotations

import torch


def size(nbytes: float) -> str:
    """Bytes in the unit that keeps a few significant digits (MB below a gigabyte, else GB)."""
    if nbytes < 1e9:
        return f"{nbytes / 1e6:.1f} MB"
    return f"{nbytes / 1e9:.2f} GB"


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (a tensor shared under two names counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = (t.device, t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def base_bytes(model) -> int:
    """The base's weights on its device (parameters and buffers, quantized ones included)."""
    return tensor_bytes(list(model.parameters()) + list(model.buffers()))


def pool_bytes(pool) -> int:
    """Every device tensor the delta pool allocated (its per-module tables and the added-token rows)."""

    def walk(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from walk(v)

    return tensor_bytes(t for v in vars(pool).values() if not isinstance(v, torch.nn.Module) for t in walk(v))


def graphs_line(engine) -> str:
    """CUDA graphs on (with their buckets) or off."""
    g = engine.graphs
    if g is None:
        return "off (every step runs eagerly)"
    if not g.capture:
        return f"layout only, not captured: batch buckets {g.batches}, span buckets {g.spans}"
    return f"on: batch buckets {g.batches}, span buckets {g.spans}, {len(g.graphs)} captured in {g.capture_s:.1f} s"


def kv_line(kv, max_len: int, nbytes: int) -> str:
    """The paged cache: its blocks, the tokens they hold, its bytes, and how many whole-context sequences that is."""
    whole = kv.tokens // max_len
    return (f"{kv.num_blocks} blocks x {kv.block_size} tokens = {kv.tokens} tokens, {size(nbytes)} (paged; "
            f"{whole} whole-context sequence{'s' if whole != 1 else ''})")


def startup_plan(model, slots, engine) -> str:
    """The block ``bitdelta serve`` prints once the engine is built (one setting a line)."""
    from .quant_base import describe as describe_base

    dtype = str(model.dtype).replace("torch.", "")
    slots_n = slots.num_slots
    pool = pool_bytes(slots.pool)
    kv = engine.kv_cache_bytes
    rows = [("device", f"{model.device}, {dtype}"),
            ("base", f"{describe_base(model)}, {size(base_bytes(model))}"),
            ("delta pool", f"{slots_n} slots x {size(pool / slots_n)} = {size(pool)}"),
            ("KV cache", kv_line(engine.kv, engine.max_len, kv)),
            ("max_batch", f"{engine.max_batch} running sequences"),
            ("step budget", f"{engine.max_step_tokens} tokens (decode tokens first, then prompt chunks)"),
            ("CUDA graphs", graphs_line(engine))]
    return "\n".join(f"  {name:<13} {value}" for name, value in rows)
