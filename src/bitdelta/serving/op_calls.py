"""How one engine step's token rows are split into multi-tenant op calls, per delta module.

A step mixes sequences of different tenants, some bringing one token (decode), some many (a prompt
or a prompt chunk). Each kind of row is cheapest on a different op:

* short sequences (fewer than :data:`SEGMENT_MIN_TOKENS` tokens) go to the decode op
  (:func:`bitdelta.ops.bitdelta_linear`, which keeps up to 128 rows on the decode kernel: cuBLAS for
  the base, every tenant's bits read once);
* long sequences go to the segmented op (:func:`bitdelta.ops.bitdelta_linear_segmented`), one
  segment per sequence: it rebuilds ``W + Δ̂`` once per tile for all of a segment's rows (or runs
  cuBLAS on an expanded weight), where the decode kernel re-unpacks the bits for every 16 tokens;
  at 7B shapes a 128-token prompt of one tenant cost 139 ms to its first token on the decode
  kernel against 26 ms for the base alone;
* tenants whose delta is column-scaled on the module take their own calls (the ops read one scale
  table per call).

Everything here is decided from host values the engine already has (each sequence's token count
and delta slot), so no step waits on the GPU; the row indices and segment tables go to the device
in one pinned asynchronous copy per step and column set, and each segmented call also carries its
table as host lists (:class:`~bitdelta.ops.segment_table.SegmentTable`), so the op decides its
split and block map without reading the device.

    calls = plan_calls(batch, col_slots=frozenset({3}))
    for c in calls: ...  # c.rows (None = all rows in order), c.mode, c.segments
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.segment_table import SegmentTable

# Sequences with at least this many tokens in a step go to the segmented op. Below it the decode
# kernel needs at most two 16-token tensor-core passes over the bits, about what one segmented tile
# costs; above it the decode kernel's repeated unpacking dominates.
SEGMENT_MIN_TOKENS = 32


@dataclass
class OpCall:
    mode: str  # "row" (row and scalar scales) or "col"
    rows: torch.Tensor | None  # device index of the step's rows this call computes; None = all, in order
    segments: tuple[torch.Tensor, torch.Tensor] | None  # (seg_starts, seg_ids) over those rows, or None: decode op
    table: SegmentTable | None = None  # the same segments on the host: the segmented op never waits for the GPU


def has_long_sequences(batch) -> bool:
    """Whether some sequence brings at least SEGMENT_MIN_TOKENS tokens (cached per step)."""
    got = batch.cache.get("has_long")
    if got is None:
        got = batch.cache["has_long"] = any(n >= SEGMENT_MIN_TOKENS for _, _, n in batch.seqs)
    return got


def plan_calls(batch, col_slots: frozenset) -> list[OpCall]:
    """The op calls of one module in this step (cached per step and set of col-scaled slots).

    ``batch`` is a :class:`~bitdelta.serving.mapping.BatchMapping` with host ``seqs`` and
    ``seq_delta_slots``; rows of one sequence are consecutive, in sequence order.
    """
    key = ("op_calls", col_slots)
    got = batch.cache.get(key)
    if got is not None:
        return got
    groups: dict[tuple[str, bool], tuple[list[int], list[tuple[int, int]]]] = {}
    at = 0
    for (_, _, n), slot in zip(batch.seqs, batch.seq_delta_slots):
        mode = "col" if slot in col_slots else "row"
        long = n >= SEGMENT_MIN_TOKENS
        rows, segs = groups.setdefault((mode, long), ([], []))
        if long:
            segs.append((len(rows), slot))
        rows.extend(range(at, at + n))
        at += n
    # One flat host buffer -> one copy; each call's tensors are views into it.
    # One group holds every row in order: it needs no index.
    flat: list[int] = []
    layout = []

    def put(values: list[int]) -> tuple[int, int]:
        flat.extend(values)
        return len(flat) - len(values), len(values)

    tables = {}
    for (mode, long), (rows, segs) in groups.items():
        spans = [None if len(groups) == 1 else put(rows)]
        if long:
            starts, slots = [s for s, _ in segs] + [len(rows)], [slot for _, slot in segs]
            spans += [put(starts), put(slots)]
            tables[mode] = SegmentTable(starts, slots)
        layout.append((mode, long, spans))
    dev = batch.tokens.device
    buf = torch.tensor(flat, dtype=torch.long)
    buf = buf.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else buf.to(dev)

    def view(span):
        return None if span is None else buf[span[0]:span[0] + span[1]]

    calls = []
    for mode, long, spans in layout:
        rows = view(spans[0])
        segments = (view(spans[1]).to(torch.int32), view(spans[2]).to(torch.int32)) if long else None
        calls.append(OpCall(mode, rows, segments, tables.get(mode) if long else None))
    batch.cache[key] = calls
    return calls
